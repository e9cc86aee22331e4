"""Encoded images for the DALI backend, read in the exact per-rank order `base.shard_batches` gives.

Two readers: a raw ImageFolder (one file per image) and the tar shards of tools/convert_dali.py (read by
offset from their .idx index files). DALI's own readers are not used for either: they shard by contiguous
ranges and shuffle within a buffer, so the batches of a step would differ from the torch backend's, and
set_epoch(epoch, start_batch) could not resume mid-epoch. Both readers also give every image's height and
width before decoding, which the host needs to draw the crop boxes.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from fastssl.data.imagefolder import load_rgb, scan_image_folder
from fastssl.data.shards import is_shard_dir, open_shards
from fastssl.errors import UserError

# What PIL raises on bytes it cannot parse or decode (as fastssl.data.imagefolder).
_HEADER_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageFolderSource:
    """Files of an ImageFolder; sizes come from each header (PIL reads only the header on open), cached."""

    def __init__(self, root: str):
        index = scan_image_folder(root)
        self.root, self.classes = index.root, index.classes
        self.paths = [p for p, _ in index.samples]
        self.labels = index.labels
        self._hw = np.full((len(self.paths), 2), -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def check_decodes(self, idx: np.ndarray) -> None:
        """Decode the images `idx` fully with PIL; raises UserError naming the first corrupt file."""
        for i in idx:
            load_rgb(self.paths[i])

    def describe(self, idx: np.ndarray) -> str:
        shown = ", ".join(self.paths[i] for i in idx[:3])
        return shown + (f" and {len(idx) - 3} more" if len(idx) > 3 else "")

    def read(self, idx: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Encoded bytes of the images `idx` and their (N, 2) heights and widths."""
        encoded = []
        for i in idx:
            try:
                encoded.append(np.fromfile(self.paths[i], dtype=np.uint8))
            except OSError as e:
                raise UserError(f"image file {self.paths[i]} cannot be read ({type(e).__name__}: {e}); "
                                f"expected a readable image") from None
            if self._hw[i, 0] < 0:
                try:
                    with Image.open(io.BytesIO(encoded[-1].tobytes())) as img:
                        self._hw[i] = img.size[1], img.size[0]
                except _HEADER_ERRORS as e:
                    why = "not a recognised image format" if isinstance(e, Image.UnidentifiedImageError) else e
                    raise UserError(f"corrupt or truncated image {self.paths[i]}: {why}") from None
        return encoded, self._hw[idx]


class ShardSource:
    """Samples of converted tar shards, read with one pread each (sizes come from the conversion)."""

    def __init__(self, root: str):
        shards = open_shards(root)
        self.root, self.classes, self._s = shards.root, shards.classes, shards
        self.labels = shards.labels

    def __len__(self) -> int:
        return len(self.labels)

    def sample_name(self, i: int) -> str:
        """`sample <key> of <tar>`, the key read from the shard's index file (for error messages only)."""
        s = self._s
        tar = s.tars[s.shard[i]]
        line = 1 + int(i - np.searchsorted(s.shard, s.shard[i]))  # samples are in shard order
        try:
            key = tar.with_suffix(".idx").read_text().splitlines()[line].split()[3].rsplit(".", 1)[0]
        except (OSError, IndexError, UnicodeDecodeError):
            key = f"at byte {s.offset[i]}"
        return f"sample {key} of shard {tar}"

    def check_decodes(self, idx: np.ndarray) -> None:
        """Decode the samples `idx` fully with PIL; raises UserError naming the shard and key of the first
        that fails. The conversion decoded every one of them, so a failure means the shard changed since."""
        encoded, _ = self.read(idx)
        for i, data in zip(idx, encoded):
            try:
                with Image.open(io.BytesIO(data.tobytes())) as img:
                    img.load()
            except _HEADER_ERRORS as e:
                why = "not a recognised image format" if isinstance(e, Image.UnidentifiedImageError) else e
                raise UserError(f"corrupt JPEG: {self.sample_name(i)} does not decode ({why}); it decoded when "
                                f"tools/convert_dali.py wrote the shard, so the file was damaged since: convert "
                                f"again") from None

    def describe(self, idx: np.ndarray) -> str:
        s = self._s
        return ", ".join(str(s.tars[k]) for k in np.unique(s.shard[idx]))

    def read(self, idx: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        s = self._s
        encoded: list[np.ndarray | None] = [None] * len(idx)
        order = np.argsort(s.shard[idx], kind="stable")  # one open per shard touched by the batch
        fd, current = -1, -1
        try:
            for j in order:
                i = idx[j]
                if s.shard[i] != current:
                    if fd >= 0:
                        os.close(fd)
                        # If the next open fails, `finally` must not close this number again: by then another
                        # thread's file may have it.
                        fd = -1
                    current = s.shard[i]
                    try:
                        fd = os.open(s.tars[current], os.O_RDONLY)
                    except OSError as e:
                        raise UserError(f"shard {s.tars[current]} cannot be opened ({e.strerror}); expected the "
                                        f"files tools/convert_dali.py wrote: convert again") from None
                data = os.pread(fd, int(s.size[i]), int(s.offset[i]))
                if len(data) != s.size[i]:
                    raise UserError(f"{s.tars[current]} ends before the sample at byte {s.offset[i]}; "
                                    f"the shard was truncated after conversion: convert again")
                encoded[j] = np.frombuffer(data, dtype=np.uint8)
        finally:
            if fd >= 0:
                os.close(fd)
        return encoded, np.stack([s.heights[idx], s.widths[idx]], axis=1)


def open_source(path: str) -> ImageFolderSource | ShardSource:
    """A shard directory (it has a manifest) or else an ImageFolder root."""
    if not path:
        raise UserError("data.path is empty; expected an ImageFolder root or a tools/convert_dali.py output")
    p = Path(path).expanduser()
    if is_shard_dir(p):
        return ShardSource(str(p))
    if p.is_dir() and any(f.suffix in (".tar", ".idx") for f in p.iterdir() if f.is_file()):
        # Tars without a manifest: an interrupted copy or someone else's shards; reading them as an
        # ImageFolder would fail later with a confusing "no class sub-folders".
        raise UserError(f"{p} holds .tar/.idx files but no manifest.json; expected the output of "
                        f"tools/convert_dali.py (or an ImageFolder root)")
    return ImageFolderSource(str(p))
