"""Tar shards in the webdataset layout, with the index files DALI's webdataset reader needs.

    OUT_DIR/shard-000000.tar  members <key>.jpg (the source JPEG's bytes, unchanged) and <key>.cls (class, ASCII)
    OUT_DIR/shard-000000.idx  DALI's index, format v1.2: a line "v1.2 <samples>", then one line per sample,
                              "jpg <data offset> <size> <member> cls <data offset> <size> <member>"
    OUT_DIR/samples.npy       int64 (N, 3): class, height, width of every sample, in shard order
    OUT_DIR/manifest.json     written last: counts, classes, per-shard sizes and SHA-256, skipped files

A sample's dataset index is its position in shard order. The loader samples crop boxes on the original
image before decoding (torchvision's RandomResizedCrop semantics need the size), so the sizes measured
here save it a header parse per image. The whole dataset is built in a hidden sibling folder
(.OUT_DIR.partial-<pid>) and renamed into place, so an interrupted conversion leaves nothing at OUT_DIR (and
the loader requires the manifest); --overwrite moves the previous dataset aside (.OUT_DIR.old-<pid>) only
for the instant between two renames. What a killed conversion leaves there is cleaned up by the next
conversion to the same OUT_DIR: partial folders are removed, and a previous dataset caught between the two
renames is put back at OUT_DIR.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fastssl.data.imagefolder import scan_image_folder, to_rgb
from fastssl.data.workers import worker_pool
from fastssl.fileio import build_in_place, check_creatable, clean_up_killed_builds
from fastssl.errors import UserError

FORMAT = "fastssl-webdataset"
VERSION = 1
MANIFEST = "manifest.json"
SAMPLES = "samples.npy"
_INDEX_VERSION = "v1.2"  # the index layout DALI's readers.webdataset parses (its wds2idx tool writes it)
_SHUFFLE_SEED = 0
_REENCODE_QUALITY = 95
# What PIL raises on bad bytes (as fastssl.data.imagefolder): anything else is a bug and keeps its traceback.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ConversionSummary:
    out_dir: Path
    num_samples: int
    num_shards: int
    classes: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (source path, reason) of every image left out
    reencoded: int  # non-JPEG (or CMYK) sources stored as RGB JPEGs


@dataclass(frozen=True)
class ShardSet:
    """A converted dataset, ready for random access: where every sample's JPEG bytes lie."""

    root: Path
    classes: tuple[str, ...]
    tars: tuple[Path, ...]
    labels: np.ndarray  # (N,) int64
    heights: np.ndarray  # (N,) int64
    widths: np.ndarray  # (N,) int64
    shard: np.ndarray  # (N,) int64: which tar
    offset: np.ndarray  # (N,) int64: byte offset of the JPEG inside its tar
    size: np.ndarray  # (N,) int64: JPEG length in bytes

    def __len__(self) -> int:
        return len(self.labels)


def _shard_name(i: int) -> str:
    return f"shard-{i:06d}"


def _jpeg_bytes(path: str) -> tuple[bytes, int, int, bool]:
    """The bytes to store for one source image, its height and width, and whether it was re-encoded."""
    data = Path(path).read_bytes()
    # load() decodes fully so truncated files fail here, not in the middle of a training run.
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        width, height = img.size
        if img.format == "JPEG" and img.mode in ("RGB", "L"):
            return data, height, width, False
        # Other formats, and CMYK/YCCK JPEGs that GPU decoders handle inconsistently, become RGB JPEGs.
        buf = io.BytesIO()
        Image.fromarray(to_rgb(img)).save(buf, format="JPEG", quality=_REENCODE_QUALITY)
        return buf.getvalue(), height, width, True


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one regular file with fixed metadata (byte-identical conversions); returns its data offset."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    start = tar.offset
    header_len = len(info.tobuf(tar.format, tar.encoding, tar.errors))
    tar.addfile(info, io.BytesIO(data))
    return start + header_len


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_shard(job: tuple[int, str, list[tuple[str, int]]]) -> dict:
    shard_no, folder, samples = job
    name = _shard_name(shard_no)
    tar_path, idx_path = Path(folder, name + ".tar"), Path(folder, name + ".idx")
    lines, meta, skipped, reencoded = [], [], [], 0
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for path, label in samples:
            try:
                data, height, width, converted = _jpeg_bytes(path)
            except _DECODE_ERRORS as e:  # FileNotFoundError is an OSError: a file gone since the scan
                why = "not a recognised image format" if isinstance(e, Image.UnidentifiedImageError) else e
                skipped.append((path, f"{type(e).__name__}: {why}"))
                continue
            key = f"{shard_no:06d}_{len(meta):06d}"
            cls = str(label).encode()
            jpg_at = _add_member(tar, key + ".jpg", data)
            cls_at = _add_member(tar, key + ".cls", cls)
            lines.append(f"jpg {jpg_at} {len(data)} {key}.jpg cls {cls_at} {len(cls)} {key}.cls")
            meta.append((label, height, width))
            reencoded += converted
    idx_path.write_text(f"{_INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines))
    return {"tar": tar_path.name, "index": idx_path.name, "num_samples": len(meta), "bytes": tar_path.stat().st_size,
            "sha256": _sha256(tar_path), "meta": meta, "skipped": skipped, "reencoded": reencoded}


def _checksum(entries: dict) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def _check_not_nested(src: Path, out: Path) -> None:
    # Shards written inside the source would be a class folder without images at the next scan (and an
    # --overwrite of a folder holding the source would delete it).
    src, out = src.resolve(), out.resolve()
    if out == src or src in out.parents:
        where = "is" if out == src else "is inside"
        raise UserError(f"output {out} {where} the source image folder {src}; expected a folder outside it, "
                        f"where the shards cannot become part of the dataset they were made from")
    if out in src.parents:
        raise UserError(f"source image folder {src} is inside the output {out}; expected an output folder "
                        f"outside the source")


def convert_image_folder(src: str | os.PathLike, out_dir: str | os.PathLike, shard_size: int = 1000,
                         workers: int = 1, overwrite: bool = False) -> ConversionSummary:
    """Write the ImageFolder at `src` as shards in `out_dir`; corrupt images are skipped and listed."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise UserError(f"shard size {shard_size!r}; expected an integer >= 1")
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"workers={workers!r}; expected an integer >= 1")
    out = Path(out_dir).expanduser().absolute()
    check_creatable(out, "output")
    _check_not_nested(Path(src).expanduser().absolute(), out)
    index = scan_image_folder(src)
    clean_up_killed_builds(out, complete=is_shard_dir)
    if out.exists() and not out.is_dir():  # never a previous conversion, so --overwrite does not replace it either
        raise UserError(f"output {out} is a file; expected a folder path for the shards (a new or empty folder, or a "
                        f"previous conversion with --overwrite)")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"output {out} already exists and is not an empty directory; expected a new path "
                            f"(or --overwrite to replace a previous conversion)")
        if not is_shard_dir(out):  # --overwrite deletes: only ever a dataset this tool wrote
            raise UserError(f"output {out} exists but holds no {MANIFEST}, so it is not a previous conversion; "
                            f"refusing to replace it")
    # A fixed shuffle: DALI's own webdataset reader shards by contiguous ranges and shuffles within a
    # small buffer, so class-sorted shards would give each rank some classes and each batch one class.
    order = np.random.default_rng(_SHUFFLE_SEED).permutation(len(index))
    chunks = [order[i:i + shard_size] for i in range(0, len(order), shard_size)]
    with build_in_place(out, "the shards") as tmp:
        jobs = [(k, str(tmp), [index.samples[i] for i in chunk]) for k, chunk in enumerate(chunks)]
        if workers == 1 or len(jobs) == 1:
            results = [_write_shard(j) for j in jobs]
        else:
            with worker_pool(min(workers, len(jobs))) as pool:
                results = list(pool.map(_write_shard, jobs))
        summary = _finish(tmp, out, index.root, index.classes, results)
    return summary


def _finish(tmp: Path, out: Path, root: Path, classes, results: list[dict]) -> ConversionSummary:
    skipped = tuple(s for r in results for s in r["skipped"])
    meta = np.array([m for r in results for m in r["meta"]], dtype=np.int64).reshape(-1, 3)
    if len(meta) == 0:
        raise UserError(f"no readable image in {root}: all {len(skipped)} failed to decode "
                        f"(first: {skipped[0][0]}: {skipped[0][1]})")
    shards = []
    for r in results:
        if r["num_samples"] == 0:  # every image of this shard was corrupt: an empty tar helps no reader
            os.remove(tmp / r["tar"])
            os.remove(tmp / r["index"])
        else:
            shards.append({k: r[k] for k in ("tar", "index", "num_samples", "bytes", "sha256")})
    np.save(tmp / SAMPLES, meta)
    entries = {"shards": shards, "samples": {"file": SAMPLES, "sha256": _sha256(tmp / SAMPLES)}}
    manifest = {"format": FORMAT, "version": VERSION, "num_samples": int(len(meta)), "classes": list(classes),
                "class_counts": np.bincount(meta[:, 0], minlength=len(classes)).tolist(),
                "source": str(root), "reencoded": sum(r["reencoded"] for r in results),
                "skipped": [{"path": p, "reason": why} for p, why in skipped],
                **entries, "checksum": _checksum(entries)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return ConversionSummary(out, int(len(meta)), len(shards), tuple(classes), skipped, manifest["reencoded"])


def is_shard_dir(path: str | os.PathLike) -> bool:
    return Path(path, MANIFEST).is_file()


def _load_manifest(root: Path) -> dict:
    where = f"shard directory {root}"
    if not root.is_dir():
        raise UserError(f"{where} does not exist or is not a directory; expected the output of tools/convert_dali.py")
    if not (root / MANIFEST).is_file():
        raise UserError(f"{where} has no {MANIFEST}; expected the output of tools/convert_dali.py "
                        f"(an interrupted conversion leaves none: convert again)")
    try:
        m = json.loads((root / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{root / MANIFEST} is not valid JSON ({e}); convert again with "
                        f"tools/convert_dali.py") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise UserError(f"{root / MANIFEST} is not a {FORMAT} v{VERSION} manifest; convert again with "
                        f"tools/convert_dali.py")
    if m.get("checksum") != _checksum({"shards": m.get("shards"), "samples": m.get("samples")}):
        raise UserError(f"{root / MANIFEST} checksum does not match its shard list (edited or damaged); "
                        f"convert again with tools/convert_dali.py")
    # The checksum covers the file lists; the fields beside them are checked for shape (a hand edit, a merge).
    shard_keys = {"tar", "index", "num_samples", "bytes", "sha256"}
    if (not isinstance(m.get("classes"), list) or not all(isinstance(c, str) for c in m["classes"])
            or not isinstance(m.get("num_samples"), int) or not isinstance(m.get("shards"), list)
            or not all(isinstance(e, dict) and shard_keys <= e.keys() for e in m["shards"])
            or not isinstance(m.get("samples"), dict) or not {"file", "sha256"} <= m["samples"].keys()):
        raise UserError(f"{root / MANIFEST} lacks a field or has one of the wrong type (expected classes, "
                        f"num_samples, shards and samples as tools/convert_dali.py writes them); convert again")
    return m


def _parse_index(path: Path, expected: int, tar_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    lines = path.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != _INDEX_VERSION or head[1] != str(expected) or len(lines) != expected + 1:
        raise UserError(f"index file {path} does not match the manifest (expected {_INDEX_VERSION} with "
                        f"{expected} samples); convert again with tools/convert_dali.py")
    fields = [ln.split() for ln in lines[1:]]
    if any(len(f) < 4 or f[0] != "jpg" or not (f[1].isdigit() and f[2].isdigit()) for f in fields):
        raise UserError(f"index file {path} has a line without a leading 'jpg OFFSET SIZE' entry; convert again")
    offset = np.array([int(f[1]) for f in fields], dtype=np.int64)
    size = np.array([int(f[2]) for f in fields], dtype=np.int64)
    if len(offset) and (offset.min() < 0 or (offset + size).max() > tar_bytes):
        raise UserError(f"index file {path} points past the end of its tar; convert again")
    return offset, size


def open_shards(path: str | os.PathLike) -> ShardSet:
    """Check a converted dataset against its manifest (sizes and counts; `verify_shards` hashes) and index it."""
    root = Path(path).expanduser().absolute()
    m = _load_manifest(root)
    tars, shard, offsets, sizes = [], [], [], []
    for k, s in enumerate(m["shards"]):
        tar, idx = root / s["tar"], root / s["index"]
        for f in (tar, idx):
            if not f.is_file():
                raise UserError(f"{f} listed in {root / MANIFEST} is missing; DALI needs every tar and its "
                                f".idx index: convert again with tools/convert_dali.py")
        if tar.stat().st_size != s["bytes"]:
            raise UserError(f"{tar} has {tar.stat().st_size} bytes but the manifest says {s['bytes']}; "
                            f"the shard is truncated or replaced: convert again")
        o, z = _parse_index(idx, s["num_samples"], s["bytes"])
        tars.append(tar)
        shard.append(np.full(len(o), k, dtype=np.int64))
        offsets.append(o)
        sizes.append(z)
    samples = root / SAMPLES
    if not samples.is_file():
        raise UserError(f"{samples} is missing; convert again with tools/convert_dali.py")
    # N x 24 bytes: hashing it on every open is cheap, and a damaged table would mislabel samples silently.
    if _sha256(samples) != m["samples"]["sha256"]:
        raise UserError(f"{samples} does not match the SHA-256 in {root / MANIFEST} (damaged or replaced); "
                        f"convert again with tools/convert_dali.py")
    meta = np.load(samples)
    if (meta.shape != (m["num_samples"], 3) or meta.dtype != np.int64 or sum(map(len, offsets)) != m["num_samples"]
            or (len(meta) and not 0 <= meta[:, 0].min() <= meta[:, 0].max() < len(m["classes"]))):
        raise UserError(f"{samples} does not hold the manifest's {m['num_samples']} samples of "
                        f"{len(m['classes'])} classes; convert again with tools/convert_dali.py")
    return ShardSet(root, tuple(m["classes"]), tuple(tars), meta[:, 0].copy(), meta[:, 1].copy(),
                    meta[:, 2].copy(), np.concatenate(shard), np.concatenate(offsets), np.concatenate(sizes))


def verify_shards(path: str | os.PathLike) -> None:
    """Hash every file against the manifest; raises UserError naming the first that differs."""
    root = Path(path).expanduser().absolute()
    m = _load_manifest(root)
    open_shards(root)
    for name, want in [(s["tar"], s["sha256"]) for s in m["shards"]] + [(m["samples"]["file"], m["samples"]["sha256"])]:
        if _sha256(root / name) != want:
            raise UserError(f"{root / name} does not match the SHA-256 in {root / MANIFEST}; convert again")
