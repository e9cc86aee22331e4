"""The linear probe: a linear classifier on frozen, cached centre-crop features.

Protocol (MoCo v3's linear classification, as restated in MAE appendix A.2): the encoder is frozen and in
eval mode; a BatchNorm without affine parameters sits in front of the linear layer, which normalises feature
magnitudes across encoders (so one learning rate fits ResNets and ViTs alike) and keeps the classifier
linear at test time (running statistics fold into the weights); SGD with momentum (or LARS), no weight decay,
cosine learning rate. Evaluation is on centre crops. Unlike the papers we train without augmentation: features
are computed once and the probe iterates over the cache, so 100 epochs cost seconds, not GPU-days.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastssl.errors import UserError

OPTIMIZERS = ("sgd", "lars")


class LinearProbe(nn.Sequential):
    def __init__(self, num_features: int, num_classes: int, generator: torch.Generator | None = None):
        bn = nn.BatchNorm1d(num_features, affine=False, eps=1e-6)
        fc = nn.Linear(num_features, num_classes)
        # MoCo v3 main_lincls.py: weights ~ N(0, 0.01), zero bias.
        nn.init.normal_(fc.weight, std=0.01, generator=generator)
        nn.init.zeros_(fc.bias)
        super().__init__(bn, fc)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1 / top-5 (%) of class scores (N, C); top-5 is top-C when there are fewer than 5 classes. A score of
    -inf is no prediction: it never counts as a hit, wherever topk's tie order lists it."""
    top = scores.topk(min(5, scores.shape[1]), dim=1)
    hit = (top.indices == labels[:, None]) & (top.values > float("-inf"))
    return {"top1": 100.0 * hit[:, 0].float().mean().item(), "top5": 100.0 * hit.any(1).float().mean().item()}


def short_list(names, n: int = 4) -> str:
    """'[a, b, c, d, ...]': enough of a class list to see where two folders differ, on one line."""
    return "[" + ", ".join(names[:n]) + (", ...]" if len(names) > n else "]")


def _check(num_samples: int, epochs: int, lr: float, batch_size: int, optimizer: str) -> None:
    if num_samples < 2:
        raise UserError(f"the linear probe needs at least 2 training images, got {num_samples}")
    if epochs < 1:
        raise UserError(f"linear-probe epochs must be >= 1, got {epochs}")
    if not lr > 0:
        raise UserError(f"linear-probe lr must be > 0, got {lr}")
    if batch_size < 2:
        raise UserError(f"linear-probe batch size must be >= 2 (BatchNorm needs a batch), got {batch_size}")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown linear-probe optimiser {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")


def train_linear_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int = 100,
                       lr: float = 0.1, batch_size: int = 256, optimizer: str = "sgd", weight_decay: float = 0.0,
                       momentum: float = 0.9, seed: int = 0) -> LinearProbe:
    """Fit a LinearProbe on cached features (N, F) with integer labels (N,). `lr` is per 256 samples.

    With `optimizer="lars"` each step is lr x 0.001 x ||w|| along the normalised gradient (trust ratio,
    eta = 0.001), so sensible lrs are ~100x those of SGD (e.g. 10-20 where SGD takes 0.1)."""
    _check(feats.shape[0], epochs, lr, batch_size, optimizer)
    n, device = feats.shape[0], feats.device
    batch_size = min(batch_size, n)
    feats = feats.float()
    gen = torch.Generator().manual_seed(seed)
    probe = LinearProbe(feats.shape[1], num_classes, generator=gen).to(device)
    peak = lr * batch_size / 256  # Goyal et al. 2017 linear scaling, as main_lincls.py
    if optimizer == "sgd":
        opt = torch.optim.SGD(probe.parameters(), lr=peak, momentum=momentum, weight_decay=weight_decay)
    else:
        from fastssl.optim import LARS, param_groups

        opt = LARS(param_groups(probe, weight_decay), lr=peak, momentum=momentum)
    # A last batch of one sample would make BatchNorm's batch variance undefined: drop the remainder
    # (it is a different random remainder each epoch, so every sample is still seen).
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch
    loss_fn = nn.CrossEntropyLoss()
    probe.train()
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for s in range(steps_per_epoch):
            idx = order[s * batch_size:(s + 1) * batch_size]
            for g in opt.param_groups:  # half-cosine to zero, per step
                g["lr"] = 0.5 * peak * (1 + math.cos(math.pi * step / total))
            loss = loss_fn(probe(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return probe.eval()


@torch.no_grad()
def probe_accuracy(probe: LinearProbe, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    probe.eval()
    return topk_accuracy(probe(feats.float()), labels)


def linear_eval(encoder: nn.Module, train_path, val_path, image_size: int, *, batch_size: int = 256,
                device="cpu", workers: int = 2, epochs: int = 100, lr: float = 0.1, optimizer: str = "sgd",
                weight_decay: float = 0.0, seed: int = 0) -> dict:
    """Linear-probe top-1/top-5 (%) on `val_path` of a probe trained on `train_path` (ImageFolders or
    ImageFolderIndex), both seen as centre crops through the frozen `encoder`."""
    from fastssl.eval.features import extract_features
    from fastssl.eval.knn import paired_folders

    _check(2, epochs, lr, batch_size, optimizer)  # fail before the (slow) feature extraction
    train, val = paired_folders(train_path, val_path, "probe's train folder", "val folder")
    # Cached once (no_grad, eval mode): the encoder is frozen, so every probe epoch would see the same features.
    tr, tr_y, num_classes = extract_features(encoder, train, image_size, batch_size, device, workers)
    va, va_y, _ = extract_features(encoder, val, image_size, batch_size, device, workers)
    probe = train_linear_probe(tr, tr_y, num_classes, epochs=epochs, lr=lr, batch_size=batch_size,
                               optimizer=optimizer, weight_decay=weight_decay, seed=seed)
    res = probe_accuracy(probe, va, va_y)
    train_res = probe_accuracy(probe, tr, tr_y)
    return {**res, "train_top1": train_res["top1"], "epochs": epochs, "lr": lr, "optimizer": optimizer,
            "num_train": int(tr.shape[0]), "num_val": int(va.shape[0]), "num_features": int(tr.shape[1])}
