"""The loader most SSL code uses, as the baseline fastssl's backends are measured against.

Per sample, in DataLoader workers: PIL opens and decodes the JPEG, then torchvision's transforms make each
view on the CPU (the "TwoCropsTransform" of the MoCo and SimCLR reference code), and the default collate
stacks them; the training device only receives finished float views. It decodes each image once and runs
the augmentations twice per image, on PIL images, one sample at a time.

The transforms are compiled from the same AugmentSpec as the backends (same crop scale and ratio, jitter
strengths and probabilities, blur kernel, solarise), so the work is the same; only where and how it runs
differs. Not a training backend: its random streams follow torchvision's global RNG, not `batch_seed`.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fastssl.data.imagefolder import scan_image_folder
from fastssl.errors import UserError

from pipelines.augment import AugmentSpec, ViewSpec
from pipelines.base import ViewBatch, steps_per_epoch
from pipelines.torch import PREFETCH_FACTOR


def view_transform(view: ViewSpec, size: int, mean, std):
    """One view of the spec as the torchvision.transforms pipeline of the papers' reference code."""
    import torchvision.transforms.v2 as T

    steps = [T.RandomResizedCrop(size, scale=view.crop_scale, ratio=view.crop_ratio, antialias=True)]
    if view.flip_p > 0:
        steps.append(T.RandomHorizontalFlip(view.flip_p))
    gray = [T.RandomGrayscale(view.gray_p)] if view.gray_p > 0 else []
    if view.gray_first:
        steps += gray
    if view.jitter_p > 0:
        steps.append(T.RandomApply([T.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)],
                                   p=view.jitter_p))
    if not view.gray_first:
        steps += gray
    if view.blur_p > 0:
        steps.append(T.RandomApply([T.GaussianBlur(view.blur_kernel_size(size), view.blur_sigma)], p=view.blur_p))
    if view.solarize_p > 0:  # on uint8 PIL pixels, as MoCo v3's ImageOps.solarize(img, 128)
        steps.append(T.RandomSolarize(round(view.solarize_threshold * 255), p=view.solarize_p))
    steps += [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)


class _TwoViewFolder(Dataset):
    def __init__(self, root: str, spec: AugmentSpec):
        index = scan_image_folder(root)
        self.samples = index.samples
        self.transforms = [view_transform(v, spec.size, spec.mean, spec.std) for v in spec.views]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with open(path, "rb") as f:  # torchvision.datasets.folder.pil_loader
            image = Image.open(f).convert("RGB")
        return tuple(t(image) for t in self.transforms), label, i


class BaselineLoader:
    """PIL + torchvision per-sample views in DataLoader workers, batches moved to `device`."""

    def __init__(self, root: str, spec: AugmentSpec, batch_size: int, workers: int, device: torch.device,
                 seed: int = 0):
        if workers < 0:
            raise UserError(f"workers={workers}; expected 0 (decode in-process) or more")
        self.dataset = _TwoViewFolder(root, spec)
        if len(self.dataset) < batch_size:
            raise UserError(f"{root} holds {len(self.dataset)} images, fewer than one batch of {batch_size}")
        self.device, self.batch_size = device, batch_size
        self._generator = torch.Generator().manual_seed(seed)
        self._loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                  num_workers=workers, generator=self._generator,
                                  pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                  prefetch_factor=PREFETCH_FACTOR if workers else None)
        self._seed = seed
        self.batches_ahead = workers * PREFETCH_FACTOR

    def __len__(self) -> int:
        return steps_per_epoch(len(self.dataset), self.batch_size, True)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        # Reshuffles per epoch; start_batch is ignored (a benchmark never resumes).
        self._generator.manual_seed(int(np.random.SeedSequence([self._seed, epoch]).generate_state(1)[0]))

    def __iter__(self):
        for views, labels, indices in self._loader:
            yield ViewBatch(tuple(v.to(self.device, non_blocking=True) for v in views),
                            labels.to(self.device, non_blocking=True), indices.to(self.device, non_blocking=True))
