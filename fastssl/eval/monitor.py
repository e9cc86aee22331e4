"""The online kNN monitor: a cheap weighted-kNN accuracy every N epochs during pre-training.

It runs the same protocol as `tools/eval.py knn` (centre crops, k / T from the recipe) on fixed,
class-balanced subsets of the kNN folders, drawn once from the run's seed, so successive points of the
curve differ only by the encoder. The queries come from `eval.knn_val_path`, images the encoder never
trains on; the memory bank from the kNN train folder. Only the main process calls it: the others wait at
their next collective meanwhile, so the subsets must stay small enough (the defaults take seconds on a GPU)
to finish well within the process group's timeout, 10 minutes by default.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastssl.data.imagefolder import ImageFolderIndex, scan_image_folder
from fastssl.errors import UserError
from fastssl.eval.knn import check_bank_size, check_same_classes
from fastssl.recipe_checks import check_ranges


def balanced_subset(index: ImageFolderIndex, n: int, seed: int = 0) -> ImageFolderIndex:
    """At most `n` samples, as equal per class as the class sizes allow, random but fixed by `seed`;
    kept in dataset order."""
    if n <= 0 or n >= len(index):
        return index
    labels = index.labels
    order = np.random.default_rng([seed, 0x6B6E6E]).permutation(len(index))
    # Rank of each sample within its class in the shuffled order; taking the n smallest (rank, class)
    # pairs deals samples out one class at a time, like a card dealer.
    rank = np.empty(len(index), dtype=np.int64)
    seen = np.zeros(len(index.classes), dtype=np.int64)
    for i in order:
        rank[i] = seen[labels[i]]
        seen[labels[i]] += 1
    picked = np.lexsort((labels, rank))[:n]
    return dataclasses.replace(index, samples=tuple(index.samples[i] for i in sorted(picked)))


class KnnMonitor:
    """`maybe_run(epoch, encoder)` after an epoch ends: a kNN record every `eval.knn_every_epochs` epochs."""

    def __init__(self, cfg, device: torch.device | str = "cpu",
                 folders: tuple[ImageFolderIndex, ImageFolderIndex] | None = None):
        """`folders`: the kNN train and val folders, if the caller has scanned them already (the trainer has,
        for its final evaluation: an ImageNet-sized folder is not scanned twice)."""
        ev = cfg.eval
        check_ranges(cfg, "eval.knn_")
        self.every = ev.knn_every_epochs
        self.enabled = self.every > 0
        if not self.enabled:
            return
        if not ev.knn_val_path:
            raise UserError(f"eval.knn_every_epochs={self.every} needs eval.knn_val_path (held-out ImageFolder "
                            f"whose images are the kNN queries)")
        train_path = ev.knn_train_path or cfg.data.path
        if not Path(train_path).is_dir():
            raise UserError(f"eval.knn_train_path {train_path!r} is not an ImageFolder directory (set it when "
                            f"data.path is not one)")
        # Scanned now, not at the first epoch's end: a wrong path fails before any training time is spent.
        train, val = folders or (scan_image_folder(train_path), scan_image_folder(ev.knn_val_path))
        self.train = balanced_subset(train, ev.knn_monitor_train_samples, cfg.seed)
        self.val = balanced_subset(val, ev.knn_monitor_val_samples, cfg.seed)
        check_same_classes(self.train, self.val, "kNN train folder", "eval.knn_val_path")
        check_bank_size(ev.knn_k, self.train, f" (the monitor's subset: eval.knn_monitor_train_samples="
                                              f"{ev.knn_monitor_train_samples})")
        self.k, self.t = ev.knn_k, ev.knn_t
        self.image_size, self.batch_size = cfg.data.image_size, ev.batch_size
        self.workers, self.device = cfg.data.workers, torch.device(device)

    def due(self, epoch: int) -> bool:
        """`epoch` counts finished epochs (1 after the first)."""
        return self.enabled and epoch > 0 and epoch % self.every == 0

    def run(self, encoder: nn.Module) -> dict[str, float]:
        from fastssl.eval.features import extract_features
        from fastssl.eval.knn import knn_accuracy

        t0 = time.time()
        tr, tr_y, num_classes = extract_features(encoder, self.train, self.image_size, self.batch_size, self.device,
                                                 self.workers)
        va, va_y, _ = extract_features(encoder, self.val, self.image_size, self.batch_size, self.device,
                                       self.workers)
        res = knn_accuracy(tr, tr_y, va, va_y, num_classes, self.k, self.t)
        return {"knn_top1": res["top1"], "knn_top5": res["top5"], "knn_s": time.time() - t0}

    def maybe_run(self, epoch: int, encoder: nn.Module) -> dict[str, float] | None:
        return self.run(encoder) if self.due(epoch) else None
