"""The deterministic single view for kNN and linear-probe evaluation (the standard ImageNet protocol).

Resize the shorter side to round(size / 0.875) with PIL's antialiased bilinear filter, centre-crop
size x size, normalise: exactly torchvision's Resize(round(size / 0.875)) + CenterCrop(size) on PIL
images (tests/test_torch_backend.py checks it). The geometry is done on the host, in workers, since the
output has a fixed size and the same work would be repeated every evaluation anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fastssl.data.imagefolder import ImageFolderIndex, as_index, load_rgb
from fastssl.errors import UserError
from fastssl.preempt import ignore_in_workers
from pipelines import ops

# 224 / 256: the centre crop keeps 87.5% of the resized side (AlexNet/ResNet evaluation protocol).
CROP_FRACTION = 0.875


def resized_shape(height: int, width: int, short: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes `short`, the longer one is truncated, not rounded."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def centre_crop(img: Image.Image, size: int) -> np.ndarray:
    top = int(round((img.height - size) / 2.0))  # torchvision's CenterCrop offsets (round half to even)
    left = int(round((img.width - size) / 2.0))
    return np.asarray(img)[top:top + size, left:left + size]


@dataclass
class _EvalBatch:
    pixels: torch.Tensor  # uint8 N x 3 x size x size
    labels: torch.Tensor
    indices: torch.Tensor
    error: str = ""

    def pin_memory(self) -> _EvalBatch:
        return _EvalBatch(self.pixels.pin_memory(), self.labels.pin_memory(), self.indices.pin_memory(), self.error)


class _CentreCrops(Dataset):
    def __init__(self, index: ImageFolderIndex, size: int):
        self.paths = [p for p, _ in index.samples]
        self.labels = index.labels
        self.size = size
        self.short = int(round(size / CROP_FRACTION))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: np.ndarray) -> _EvalBatch:
        labels, indices = torch.from_numpy(self.labels[idx]), torch.from_numpy(idx)
        out = np.empty((len(idx), 3, self.size, self.size), dtype=np.uint8)
        for k, i in enumerate(idx):
            try:
                rgb = load_rgb(self.paths[i])
            except UserError as e:  # shipped as a marker: DataLoader would wrap it in a traceback
                return _EvalBatch(torch.empty(0, dtype=torch.uint8), labels, indices, error=str(e))
            h, w = resized_shape(rgb.shape[0], rgb.shape[1], self.short)
            img = Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR)
            out[k] = centre_crop(img, self.size).transpose(2, 0, 1)
        return _EvalBatch(torch.from_numpy(out), labels, indices)


def _as_is(batch):
    return batch


class EvalLoader:
    """Yields (images N x 3 x size x size float, labels, dataset indices) on `device`, in dataset order."""

    def __init__(self, index: ImageFolderIndex, image_size: int, batch_size: int, workers: int,
                 device: torch.device, mean, std):
        self.device, self.mean, self.std = device, mean, std
        n = len(index)
        self._batches = [np.arange(s, min(s + batch_size, n), dtype=np.int64) for s in range(0, n, batch_size)]
        # Its own generator: the kNN monitor runs between training steps, and a draw from torch's global one
        # (each iterator's worker seed) would change the model's later random draws.
        self._loader = DataLoader(_CentreCrops(index, image_size), sampler=self._batches, batch_size=None,
                                  collate_fn=_as_is, num_workers=workers, pin_memory=device.type == "cuda",
                                  worker_init_fn=ignore_in_workers, generator=torch.Generator())

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        for raw in self._loader:
            if raw.error:
                raise UserError(raw.error)
            x = raw.pixels.to(self.device, non_blocking=True).float().div_(255.0)
            yield (ops.normalize(x, self.mean, self.std), raw.labels.to(self.device, non_blocking=True),
                   raw.indices.to(self.device, non_blocking=True))


def build_eval_loader(root_or_index: str | os.PathLike | ImageFolderIndex, image_size: int, batch_size: int,
                      workers: int, device: torch.device | str, mean, std) -> EvalLoader:
    index = as_index(root_or_index)
    if image_size < 1 or batch_size < 1:
        raise UserError(f"eval image_size={image_size}, batch_size={batch_size}; expected positive integers")
    if workers < 0:
        raise UserError(f"eval workers={workers}; expected 0 (decode in-process) or more")
    return EvalLoader(index, image_size, batch_size, workers, torch.device(device), mean, std)
