"""Weighted kNN classifier on L2-normalised features (Wu et al. 2018, sec. 3.4; k=20, T=0.07 in
InstDisc / MoCo / DINO monitors)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastssl.errors import UserError
from fastssl.eval.linear import short_list, topk_accuracy


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores (Q, C): each of the k nearest training features (cosine) votes exp(sim / T) for its class."""
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for q in F.normalize(query_feats.float(), dim=1).split(chunk):  # bounded memory: Q x N in row blocks
        sim, idx = (q @ train.t()).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_feats, train_labels, val_feats, val_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07) -> dict[str, float]:
    """kNN top-1/top-5 (%) of `val_feats` against the memory bank `train_feats`; top-5 is top-C below 5 classes.
    A class none of the k neighbours voted for is not predicted: when fewer than 5 classes get votes, top-5
    would otherwise count whichever zero-score classes the tie order lists (k=5 on 10 classes: +4 points)."""
    scores = knn_predict(train_feats, train_labels, val_feats, num_classes, k, temperature)
    return topk_accuracy(scores.masked_fill_(scores == 0, float("-inf")), val_labels)


def check_knn_settings(k, temperature) -> None:
    """k and T as the user gave them (tools/eval.py --k / --temperature, recipe eval.knn_k / eval.knn_t)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"kNN k (--k / eval.knn_k) {k!r}; expected an integer >= 1")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise UserError(f"kNN temperature (--temperature / eval.knn_t) {temperature!r}; expected a number > 0")


def check_bank_size(k: int, bank, what: str = "") -> None:
    """k neighbours need as many images in the memory bank (an ImageFolderIndex); fewer would be a silent
    smaller k."""
    if k > len(bank):
        raise UserError(f"kNN k={k} (--k / eval.knn_k) is more than the {len(bank)} images of the memory bank "
                        f"{bank.root}{what}; expected k <= {len(bank)}")


def check_same_classes(train, val, train_what: str = "kNN train folder", val_what: str = "kNN val folder") -> None:
    """Labels are class indices into each folder's sorted class names: different names make them incomparable."""
    if train.classes != val.classes:
        raise UserError(f"{val_what} {val.root} has {len(val.classes)} classes {short_list(val.classes)} but the "
                        f"{train_what} {train.root} has {len(train.classes)} {short_list(train.classes)}; "
                        f"expected the same class folders")


def paired_folders(train, val, train_what: str, val_what: str):
    """The two ImageFolders of an evaluation (roots or scanned indexes) as indexes holding the same classes."""
    from fastssl.data.imagefolder import as_index

    train, val = as_index(train), as_index(val)
    check_same_classes(train, val, train_what, val_what)
    return train, val


def knn_eval(encoder, train_data, val_data, image_size: int, *, k: int = 20, temperature: float = 0.07,
             batch_size: int = 256, device="cpu", workers: int = 2) -> dict[str, float]:
    """kNN top-1/top-5 (%) of `encoder` with `train_data` as the memory bank and `val_data` as queries
    (ImageFolders or ImageFolderIndex); both must hold the same class names."""
    from fastssl.eval.features import extract_features

    check_knn_settings(k, temperature)  # before the (slow) feature extraction
    train, val = paired_folders(train_data, val_data, "kNN train folder", "kNN val folder")
    check_bank_size(k, train)
    tr, tr_y, num_classes = extract_features(encoder, train, image_size, batch_size, device, workers)
    va, va_y, _ = extract_features(encoder, val, image_size, batch_size, device, workers)
    return knn_accuracy(tr, tr_y, va, va_y, num_classes, k, temperature)
