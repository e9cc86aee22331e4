"""FFCV `.beton` files: writing one from an ImageFolder, and opening one with errors a user can act on.

A fastssl `.beton` has two fields, `image` (ffcv RGBImageField: JPEG or raw pixels, longest side capped at
`max_resolution`) and `label` (IntField, the ImageFolder class index). ffcv itself is imported lazily so
that this module (and `--help`) work without the optional extra.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import re
import signal
import sys
import threading
import _thread
from multiprocessing import shared_memory
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from fastssl.data.imagefolder import check_images, load_rgb, scan_image_folder
from fastssl.data.workers import children_ignore_stop_signals, kill_children_since
from fastssl.fileio import check_creatable, stale_temporaries
from fastssl.errors import UserError

IMAGE_FIELD, LABEL_FIELD = "image", "label"
WRITE_MODES = ("jpg", "raw", "smart", "proportion")
FFCV_INSTALL_HINT = ("ffcv is not installed; install it with `bash .ci/install_ffcv.sh .venv` (apt packages "
                     "pkg-config libturbojpeg0-dev libopencv-dev, then pip install '.[ffcv]')")


def import_ffcv():
    """Import ffcv or raise the one-line install hint (its C extension needs system libraries first)."""
    try:
        import ffcv  # noqa: F401
        import ffcv.libffcv  # noqa: F401  (fails when the extension was built without libturbojpeg)
    except ImportError as e:
        raise UserError(f"{FFCV_INSTALL_HINT} [{type(e).__name__}: {e}]") from None
    return ffcv


@dataclass
class ConvertSummary:
    path: Path
    images: int
    classes: int
    bytes: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of corrupt images


class _Samples:
    """The indexable dataset ffcv's writer processes read: (H x W x 3 uint8, label)."""

    def __init__(self, samples, errors, failures):
        self.samples = samples
        self.errors = errors  # multiprocessing.Queue back to the parent: the messages
        self.failures = failures  # multiprocessing.Value: how many, visible to the parent at once

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        # write_mode="proportion" draws np.random.rand() in this worker right after this call; seeding per
        # sample makes the JPEG/raw choice, and so the file, independent of how chunks reach workers.
        np.random.seed(i)
        try:
            return load_rgb(path), label
        except UserError as e:
            # An image that passed the up-front check and fails now (changed or removed meanwhile). Raising
            # would kill this worker, and ffcv's writer would wait forever for its samples; so report it,
            # write a placeholder, and let the parent discard the whole file once the writer returns.
            with self.failures.get_lock():
                self.failures.value += 1
            self.errors.put(str(e))
            return _PLACEHOLDER, label


_PLACEHOLDER = np.zeros((8, 8, 3), np.uint8)


def _cannot_write(out: Path, error: OSError) -> str:
    where = f" ({error.filename})" if error.filename else ""
    return f"cannot write {out}: {error.strerror or error}{where}; expected a writable folder with free space"


def _writer_process(reasons, out: Path, job, *args) -> None:
    """ffcv's writer job `job(*args)`, in one of its writer processes. An OSError (the disk filling up as a page is
    written) is the user's to fix: its one-line message goes to the parent through `reasons`, and the process
    exits with status 1 instead of printing multiprocessing's traceback. Any other error is a bug and keeps it."""
    try:
        job(*args)
    except OSError as e:
        reasons.put(_cannot_write(out, e))
        sys.exit(1)  # multiprocessing exits silently on SystemExit, after its queues have sent what was put


def _watch_workers(stop: threading.Event, failed: list[str], reasons, root) -> None:
    """Interrupt the main thread when one of ffcv's writer processes dies (disk full, killed, out of memory): ffcv
    would wait forever for its samples or its page table. `failed` gets the error message a writer sent on
    `reasons` before exiting (see _writer_process), else one with the bare exit status. The message also covers a
    writer that exited before the first look: active_children() reaps an exited process, so exit statuses are
    best effort. Failing images do not kill workers (see _Samples)."""
    seen: dict[int, multiprocessing.Process] = {}
    while not stop.wait(0.2):
        for p in multiprocessing.active_children():
            seen[p.pid] = p
        dead = [p for p in seen.values() if p.exitcode not in (None, 0)]
        try:  # a message sent before the exit is in the pipe once the exit is seen
            failed.append(reasons.get(timeout=1.0) if dead else reasons.get_nowait())
        except queue.Empty:
            if not dead:
                continue
            failed.append(f"conversion of {root} stopped: writer process {dead[0].pid} died with exit code "
                          f"{dead[0].exitcode}")
        if callable(signal.getsignal(signal.SIGINT)):
            # A real SIGINT: interrupt_main() only sets a flag, which a main thread blocked in a read never checks,
            # and a writer failing on its last page does so while ffcv waits for the page tables.
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        else:
            _thread.interrupt_main()  # SIGINT ignored or default: a no-op (a real one would kill or be lost)
        return


def _validate(out: Path, overwrite: bool, max_resolution, jpeg_quality, write_mode, compress_probability,
              smart_threshold, workers, chunk_size) -> None:
    if out.suffix != ".beton":
        raise UserError(f"output {out} must end in .beton")
    check_creatable(out, "output")
    if out.is_dir():
        raise UserError(f"output {out} is a folder; expected the path of a .beton file")
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; expected a new path (or --overwrite to replace it)")
    if max_resolution is not None and max_resolution < 8:
        raise UserError(f"--max-resolution {max_resolution}; expected at least 8 pixels (or 0 for no cap)")
    if not 1 <= jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality {jpeg_quality}; expected an integer in 1..100")
    if write_mode not in WRITE_MODES:
        raise UserError(f"--write-mode {write_mode!r}; expected one of {', '.join(WRITE_MODES)}")
    if not 0.0 <= compress_probability <= 1.0:
        raise UserError(f"--compress-probability {compress_probability}; expected a value in [0, 1]")
    if smart_threshold is not None and smart_threshold < 0:
        raise UserError(f"--smart-threshold {smart_threshold}; expected a size in bytes >= 0")
    if workers < 1 or chunk_size < 1:
        raise UserError(f"--workers {workers} / --chunk-size {chunk_size}; expected integers >= 1")


def convert_image_folder(src, out, *, max_resolution: int | None = None, jpeg_quality: int = 90,
                         write_mode: str = "jpg", compress_probability: float = 0.5,
                         smart_threshold: int | None = None, workers: int = 1, chunk_size: int = 100,
                         page_mib: int = 8, overwrite: bool = False, report=None) -> ConvertSummary:
    """Write ImageFolder `src` as `out` (.beton); corrupt images are skipped and listed in the summary.

    write_mode (ffcv's RGBImageField): "jpg" re-encodes every image at `jpeg_quality`; "raw" stores pixels
    (decodes ~10x faster, files ~10x larger); "smart" stores raw unless the raw image is larger than
    `smart_threshold` bytes; "proportion" JPEG-encodes a random `compress_probability` fraction.
    `page_mib` is ffcv's page size (a power of two >= 2 MiB; each writer process fills whole pages, and
    quasi-random order shuffles within a few pages at a time). `report(path, reason)` is called for each
    skipped image as soon as it is found. An existing `out` is replaced only with `overwrite`, and only once
    the new file is complete.
    """
    out = Path(out).expanduser().absolute()
    max_resolution = max_resolution or None
    _validate(out, overwrite, max_resolution, jpeg_quality, write_mode, compress_probability, smart_threshold, workers,
              chunk_size)
    if page_mib < 2 or page_mib & (page_mib - 1):
        raise UserError(f"--page-mib {page_mib}; expected a power of two >= 2")
    for leftover, _ in stale_temporaries(out.parent, rf"\.{re.escape(out.name)}\.tmp-(?P<pid>\d{{1,9}})"):
        if leftover.is_file():  # of a conversion that was killed: never usable, never renamed into place
            leftover.unlink(missing_ok=True)
    index = scan_image_folder(src)
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    # Decoding everything once up front is the only way to skip a file: ffcv's writer fixes the sample
    # count before its workers start and cannot leave a hole.
    skipped = check_images(index, workers=workers)
    for path, reason in skipped:
        if report is not None:
            report(path, reason)
    bad = {p for p, _ in skipped}
    samples = [(p, c) for p, c in index.samples if p not in bad]
    if not samples:
        raise UserError(f"no readable images in {index.root}: all {len(index)} failed to decode")

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder of {out}: {e.strerror or e}") from None
    image_field = RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                jpeg_quality=jpeg_quality, compress_probability=compress_probability,
                                smart_threshold=smart_threshold)
    writer = DatasetWriter(str(tmp), {IMAGE_FIELD: image_field, LABEL_FIELD: IntField()},
                           page_size=page_mib << 20, num_workers=workers)
    ctx = multiprocessing.get_context("fork")
    errors, failures, reasons = ctx.Queue(), ctx.Value("i", 0), ctx.Queue()
    stop, failed = threading.Event(), []
    watchdog = threading.Thread(target=_watch_workers, args=(stop, failed, reasons, index.root),
                                daemon=True)
    watchdog.start()
    before = set(multiprocessing.active_children())
    try:
        with children_ignore_stop_signals():  # ffcv's writer processes; killed below on an interrupt
            _write_indexed(writer, _Samples(samples, errors, failures), chunk_size,
                           partial(_writer_process, reasons, out))
        stop.set()
        if failures.value:
            try:  # the count is shared memory; the message follows through the queue's pipe
                message = errors.get(timeout=10.0)
            except queue.Empty:
                message = f"{failures.value} image(s) failed to load while writing"
            raise UserError(f"conversion of {index.root} stopped: {message}; nothing was written to {out}")
        os.replace(tmp, out)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM (fastssl.errors.Terminated), or a writer that died
        stop.set()
        watchdog.join()  # before the kills, which it would take for a writer dying and report
        kill_children_since(before)
        _free_shared_memory(writer)
        if not failed:
            raise
        raise UserError(failed[0]) from None
    except OSError as e:  # disk full, permissions, a path the OS refuses: the user can fix these
        raise UserError(_cannot_write(out, e)) from None
    finally:
        stop.set()
        tmp.unlink(missing_ok=True)
    return ConvertSummary(out, len(samples), len(index.classes), out.stat().st_size, skipped)


def _write_indexed(writer, dataset, chunk_size: int, wrap) -> None:
    """writer.from_indexed_dataset(dataset, chunksize=chunk_size), with each writer process running
    wrap(job, *args) instead of ffcv's job(*args). ffcv (pinned at 1.0.2) offers no hook into its processes, so
    this calls the private _write_common exactly as from_indexed_dataset does."""
    from ffcv.utils import chunks
    from ffcv.writer import worker_job_indexed_dataset

    indices = list(enumerate(range(len(dataset))))  # (place in the file, sample index)
    writer._write_common(len(indices), chunks(indices, chunk_size), partial(wrap, worker_job_indexed_dataset),
                         (dataset,))


def _free_shared_memory(writer) -> None:
    # ffcv unlinks its metadata segment only when the writer finishes; otherwise the resource tracker warns of a
    # leak at exit.
    segment = getattr(writer, "metadata_sm", None)
    if isinstance(segment, shared_memory.SharedMemory):
        segment.close()
        try:
            segment.unlink()
        except FileNotFoundError:
            pass


def open_beton(path):
    """ffcv's Reader over `path`, after checks that name the file when it is missing, truncated or foreign.

    ffcv reads the header, field table and metadata eagerly but trusts the allocation table, which its
    writer puts last: a file cut short loses that first and would fail later inside a JIT-compiled decoder.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f".beton file {p} is a folder; the ffcv backend expects a .beton file made by "
                        f"tools/convert_ffcv.py (data.path=OUT.beton)")
    if not p.is_file():
        raise UserError(f".beton file {p} does not exist (data.path must be a file written by "
                        f"tools/convert_ffcv.py)")
    import_ffcv()
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType

    size = p.stat().st_size
    if size < HeaderType.itemsize:
        raise UserError(f".beton file {p} is truncated or not a .beton ({size} bytes, shorter than the header)")
    header = np.fromfile(p, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise UserError(f"{p} is not a .beton of ffcv format version {CURRENT_VERSION} "
                        f"(header says version {int(header['version'])})")
    num_samples, table_at = int(header["num_samples"]), int(header["alloc_table_ptr"])
    fields_end = HeaderType.itemsize + int(header["num_fields"]) * FieldDescType.itemsize
    if table_at < fields_end or table_at > size or (size - table_at) % ALLOC_TABLE_TYPE.itemsize:
        raise UserError(f".beton file {p} is truncated or was not finished ({size} bytes; its allocation "
                        f"table should start at byte {table_at})")
    reader = Reader(str(p))
    table = reader.alloc_table
    if num_samples == 0 or len(table) == 0 or int((table["ptr"] + table["size"]).max()) > table_at:
        raise UserError(f".beton file {p} is truncated or empty ({num_samples} samples, {size} bytes)")
    # A cut inside the table on an entry boundary passes the size check above; the samples it lost would be
    # looked up past the table's end by compiled (unchecked) code and decode some other sample's bytes.
    listed = np.unique(table["sample_id"])
    if not np.array_equal(listed, np.arange(num_samples)):
        raise UserError(f".beton file {p} is truncated or damaged: its allocation table lists {len(listed)} of its "
                        f"{num_samples} samples")
    return reader


def require_fields(reader, path) -> None:
    """The fields fastssl reads, with their ffcv types; otherwise list what the file has."""
    from ffcv.fields import IntField, RGBImageField

    expected = {IMAGE_FIELD: RGBImageField, LABEL_FIELD: IntField}
    ok = all(isinstance(reader.handlers.get(n), t) for n, t in expected.items())
    if not ok:
        have = ", ".join(f"{n} ({type(h).__name__})" for n, h in reader.handlers.items())
        raise UserError(f".beton file {path} has fields [{have}]; expected image (RGBImageField) and "
                        f"label (IntField), as written by tools/convert_ffcv.py")


def describe(path) -> dict:
    """Sample count, image sizes and storage mix of a .beton (for the tool's summary and tests)."""
    reader = open_beton(path)
    require_fields(reader, path)
    meta = reader.metadata[f"f{list(reader.handlers).index(IMAGE_FIELD)}"]
    return {"images": int(reader.num_samples), "max_height": int(meta["height"].max()),
            "max_width": int(meta["width"].max()), "jpeg": int((meta["mode"] == 0).sum())}


def print_skipped(path: str, reason: str) -> None:
    print(f"skipped corrupt image {path}: {reason}", file=sys.stderr)
