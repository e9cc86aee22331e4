"""Features of a frozen encoder over an ImageFolder (centre crop, no augmentation)."""

from __future__ import annotations

import torch
from torch import nn

from fastssl.data.imagefolder import ImageFolderIndex, as_index

from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD


@torch.no_grad()
def extract_features(encoder: nn.Module, data: str | ImageFolderIndex, image_size: int, batch_size: int = 256,
                     device: torch.device | str = "cpu", workers: int = 2) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Returns (features N x F on `device`, labels N, number of classes), in dataset order."""
    from pipelines.torch import build_eval_loader

    index = as_index(data)
    loader = build_eval_loader(index, image_size, batch_size, workers, torch.device(device), IMAGENET_MEAN,
                               IMAGENET_STD)
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for images, y, _ in loader:
        feats.append(encoder(images).float())
        labels.append(y.to(feats[-1].device))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels), len(index.classes)
