"""The few images an analysis looks at: picked from an ImageFolder or named one by one, as centre crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastssl.data.imagefolder import IMAGE_EXTENSIONS, ImageFolderIndex, scan_image_folder
from fastssl.errors import UserError

from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD


def pick_images(data: str | None = None, files: list[str] | None = None, n: int = 8) -> ImageFolderIndex:
    """`n` images spread evenly over the ImageFolder `data` (so every class shows up when n >= classes),
    or exactly the image `files` given."""
    if files is not None:
        if not files:
            raise UserError("the image list is empty; expected one or more image files")
        folders = [f for f in files if Path(f).is_dir()]
        if folders:
            raise UserError(f"--images {folders[0]} is a folder; expected image files (for an ImageFolder use --data)")
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise UserError(f"image file {missing[0]} does not exist ({len(missing)} of {len(files)} missing)")
        odd = [f for f in files if not f.lower().endswith(IMAGE_EXTENSIONS)]
        if odd:
            raise UserError(f"{odd[0]} is not an image file; expected names ending in {'/'.join(IMAGE_EXTENSIONS)}")
        return ImageFolderIndex(root=Path.cwd(), classes=("images",),
                                samples=tuple((str(Path(f).absolute()), 0) for f in files))
    if not data:
        raise UserError("no images given; pass --data IMAGEFOLDER or --images FILE [FILE ...]")
    if n < 1:
        raise UserError(f"number of images must be >= 1, got {n}")
    index = scan_image_folder(data)
    # Samples are sorted by class, so evenly spaced positions visit the classes in turn.
    picked = np.unique(np.linspace(0, len(index) - 1, min(n, len(index))).round().astype(np.int64))
    return ImageFolderIndex(root=index.root, classes=index.classes,
                            samples=tuple(index.samples[i] for i in picked))


def load_images(index: ImageFolderIndex, image_size: int, device: torch.device | str = "cpu",
                mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Normalised centre crops (N, 3, S, S), through the same eval loader as kNN and the linear probe."""
    from pipelines.torch import build_eval_loader

    loader = build_eval_loader(index, image_size, 64, 0, torch.device(device), mean, std)
    return torch.cat([images for images, _, _ in loader])


def unnormalise(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """(N, 3, H, W) normalised tensors -> (N, H, W, 3) floats in [0, 1] for display."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    x = images.detach().float().cpu() * s + m
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()
