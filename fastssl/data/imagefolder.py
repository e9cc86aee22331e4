"""Reading an ImageFolder (ROOT/<class>/<image>): the index every backend and converter starts from.

Semantics follow torchvision's `ImageFolder` so a dataset that works there works here: classes are the
sorted sub-folder names, files are found recursively and kept by torchvision's extensions (case-insensitive),
images are decoded with PIL and converted with `convert("RGB")`. Two differences: 16-bit greyscale keeps its
top 8 bits, as DALI's decoder does (PIL's convert clips it at 255, turning almost every pixel white), and
every problem a user can fix (missing root, empty class, corrupt file) is a one-line `UserError` naming the path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fastssl.data.workers import worker_pool
from fastssl.errors import UserError

# torchvision.datasets.folder.IMG_EXTENSIONS; DALI's CPU decoder reads all of them (the converters re-encode
# every non-JPEG as JPEG anyway).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# PIL's modes for 16-bit greyscale ("I": how some PIL versions and formats open it, values 0..65535).
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# What PIL raises on bad bytes: OSError for truncated/unidentified data, SyntaxError and ValueError from
# some format parsers, DecompressionBombError for absurd sizes. Anything else is a bug and keeps its traceback.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageFolderIndex:
    root: Path
    classes: tuple[str, ...]  # sorted class folder names; class index = position here
    samples: tuple[tuple[str, int], ...]  # (absolute file path, class index), by class then relative path

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        # A fresh array each call: the index is frozen and shared, callers may mutate what they get.
        return np.fromiter((c for _, c in self.samples), dtype=np.int64, count=len(self.samples))


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _images_under(class_dir: Path) -> list[str]:
    """Image files below one class folder, recursively (as torchvision), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]  # pruning in place stops os.walk descending
        for name in filenames:
            if not _hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(dirpath, name))
    return sorted(found, key=lambda p: Path(p).relative_to(class_dir).parts)


def scan_image_folder(root: str | os.PathLike) -> ImageFolderIndex:
    """Index ROOT/<class>/<image>; raises UserError when the layout is not that."""
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise UserError(f"image folder {root} does not exist; expected a directory ROOT/<class>/<image>")
    if not root.is_dir():
        raise UserError(f"image folder {root} is not a directory; expected a directory ROOT/<class>/<image>")
    classes = tuple(sorted(e.name for e in os.scandir(root) if e.is_dir() and not _hidden(e.name)))
    if not classes:
        raise UserError(f"image folder {root} has no class sub-folders; expected ROOT/<class>/<image>")
    samples: list[tuple[str, int]] = []
    empty = []
    for c, name in enumerate(classes):
        files = _images_under(root / name)
        if not files:
            empty.append(name)
        samples.extend((f, c) for f in files)
    if empty:
        shown = ", ".join(str(root / n) for n in empty[:5]) + (f" (and {len(empty) - 5} more)" if len(empty) > 5 else "")
        raise UserError(f"no images in class folder(s) {shown}; expected files ending in "
                        f"{'/'.join(IMAGE_EXTENSIONS)} (any case)")
    return ImageFolderIndex(root=root, classes=classes, samples=tuple(samples))


def as_index(folder: str | os.PathLike | ImageFolderIndex) -> ImageFolderIndex:
    """An ImageFolder given as a root path (scanned now) or as an index a caller has already scanned."""
    return folder if isinstance(folder, ImageFolderIndex) else scan_image_folder(folder)


def to_rgb(img: Image.Image) -> np.ndarray:
    """H x W x 3 uint8 RGB of a loaded PIL image: `convert("RGB")`, but 16-bit greyscale keeps its top 8 bits."""
    if img.mode in _WIDE_GREY_MODES:
        # >> 8 rather than / 257: bit-identical to what DALI's decoders give for the same file.
        grey = (np.clip(np.asarray(img), 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _decode(path: str) -> np.ndarray:
    # `load()` forces the full decode: `open()` only reads the header, so a truncated JPEG would pass it.
    # ImageFile.LOAD_TRUNCATED_IMAGES is left at PIL's default (False) so missing bytes raise instead of
    # being filled with grey.
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def load_rgb(path: str) -> np.ndarray:
    """Decode one image fully to H x W x 3 uint8 RGB (L, LA, RGBA, CMYK, P ... converted by PIL; see to_rgb)."""
    try:
        return _decode(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        raise UserError(f"image file {path} not found or not a file ({type(e).__name__}); "
                        f"expected a readable image") from e
    except _DECODE_ERRORS as e:
        raise UserError(f"corrupt or truncated image {path}: {e}") from e


def _problem(path: str) -> tuple[str, str] | None:
    try:
        _decode(path)
    except _DECODE_ERRORS as e:  # FileNotFoundError is an OSError: a file gone since the scan is reported too
        return path, f"{type(e).__name__}: {e}"
    return None


def check_images(index: ImageFolderIndex, workers: int = 1) -> list[tuple[str, str]]:
    """(path, reason) of every image in the index that does not fully decode, in index order."""
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers={workers!r}; expected an integer >= 1")
    paths = [p for p, _ in index.samples]
    if workers == 1 or len(paths) < 2:
        results = map(_problem, paths)
        return [r for r in results if r is not None]
    # Decoding is CPU-bound and PIL holds the GIL for parts of it, so processes rather than threads;
    # large chunks keep the pickling overhead per image small.
    chunk = max(1, min(256, len(paths) // (workers * 4)))
    with worker_pool(workers) as pool:
        return [r for r in pool.map(_problem, paths, chunksize=chunk) if r is not None]
