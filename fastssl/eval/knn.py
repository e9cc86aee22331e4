"""Weighted kNN classifier on L2-normalised features (Wu et al. 2018, sec. 3.4; k=20, T=0.07 in
InstDisc / MoCo / DINO monitors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl.eval.linear import topk_accuracy


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
    """kNN top-1/top-5 (%) of `val_feats` against the memory bank `train_feats`; top-5 is top-C below 5 classes."""
    return topk_accuracy(knn_predict(train_feats, train_labels, val_feats, num_classes, k, temperature), val_labels)


def knn_eval(encoder, train_data, val_data, image_size: int, *, k: int = 20, temperature: float = 0.07,
             batch_size: int = 256, device="cpu", workers: int = 2) -> dict[str, float]:
    """kNN top-1/top-5 (%) of `encoder` with `train_data` as the memory bank and `val_data` as queries."""
    from fastssl.eval.features import extract_features

    tr, tr_y, num_classes = extract_features(encoder, train_data, image_size, batch_size, device, workers)
    va, va_y, _ = extract_features(encoder, val_data, image_size, batch_size, device, workers)
    return knn_accuracy(tr, tr_y, va, va_y, num_classes, k, temperature)
