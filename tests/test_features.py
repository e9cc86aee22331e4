"""fastssl/eval/features.py against torchvision: the features of a frozen encoder are those of the encoder in
eval mode on torchvision's ImageFolder with Resize + CenterCrop + Normalize, and extracting them leaves the
encoder as it was."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from fastssl.eval.features import extract_features


def _image_folder(root) -> None:
    """Two classes of smooth random PNGs (lossless: both sides decode the same pixels), of shapes that make
    the resize and the centre crop do work: portrait, landscape and square."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i, (h, w) in enumerate([(52, 40), (40, 52), (36, 36), (45, 60)]):
            coarse = rng.integers(0, 256, size=(h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
            img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
            img.save(root / f"c{c}" / f"{i}.png")


def _bn_encoder() -> nn.Module:
    """A tiny ResNet-like stem whose BatchNorm running statistics are far from any batch's: its features in
    train mode (batch statistics) and in eval mode (running statistics) differ."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten())
    bn = enc[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(8))
        bn.running_var.copy_(torch.rand(8) * 3 + 0.5)
        bn.weight.copy_(torch.rand(8) + 0.5)
        bn.bias.copy_(torch.randn(8))
    bn.num_batches_tracked.fill_(100)
    return enc


def test_features_are_the_eval_mode_encoders_on_torchvisions_centre_crop_and_the_encoder_is_left_as_it_was(
        tmp_path):
    from torchvision import datasets, transforms

    _image_folder(tmp_path / "data")
    # The standard evaluation view at 32 px: shorter side to round(32 / 0.875) = 37, centre 32 x 32, ImageNet
    # mean and std.
    view = transforms.Compose([transforms.Resize(37), transforms.CenterCrop(32), transforms.ToTensor(),
                               transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    oracle = datasets.ImageFolder(str(tmp_path / "data"), transform=view)
    x = torch.stack([img for img, _ in oracle])
    encoder = _bn_encoder()
    before = copy.deepcopy(encoder.state_dict())
    with torch.no_grad():
        want = copy.deepcopy(encoder).eval()(x)
        batch_stats = copy.deepcopy(encoder).train()(x)
    assert (want - batch_stats).abs().max() > 0.1  # the test tells the two modes apart

    encoder.train()  # as the kNN monitor finds it, between training steps
    feats, labels, classes = extract_features(encoder, str(tmp_path / "data"), 32, batch_size=3, workers=0)
    torch.testing.assert_close(feats, want, rtol=1e-5, atol=1e-5)
    assert labels.tolist() == oracle.targets and classes == 2
    assert encoder.training and all(m.training for m in encoder.modules())  # put back in train mode
    after = encoder.state_dict()  # running mean, var and count untouched: the images are not training data
    assert all(torch.equal(after[k], v) for k, v in before.items())

    encoder.eval()  # an encoder in eval mode stays in eval mode
    torch.testing.assert_close(extract_features(encoder, str(tmp_path / "data"), 32, 8, workers=0)[0], want,
                               rtol=1e-5, atol=1e-5)
    assert not any(m.training for m in encoder.modules())
