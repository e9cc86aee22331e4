"""tools/convert_ffcv.py and fastssl.data.beton: ImageFolder -> .beton round trips, and every bad input.

Oracle for what was stored: the .beton is read back here without ffcv's decoder (the header, metadata and
allocation table give each image's bytes; PIL decodes the JPEGs) and compared with the source images
decoded by PIL. JPEG tolerance: smooth images re-encoded at quality 95 stay within a mean absolute error
of 2 grey levels (measured ~0.5-1.0 here); raw mode must be exact.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, assert_user_error, run_tool, signal_mid_conversion

SIZES = [(20, 36), (40, 24), (33, 33), (48, 30)]  # (h, w): mixed aspect ratios, odd sides


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-frequency colour pattern: JPEG keeps it within a couple of grey levels."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    c = rng.random((3, 3))
    img = np.stack([0.5 + 0.4 * np.sin(3 * xx * c[k, 0] + 6 * c[k, 1]) * np.cos(2 * yy + 3 * c[k, 2])
                    for k in range(3)], -1)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def make_image_folder(root, classes=3, per_class=4, corrupt=True, seed=0):
    """ROOT/c<k>/<i>.png (lossless, so the source pixels are exact) plus one corrupt JPEG in class 0."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(root / f"c{c}", exist_ok=True)
        for i in range(per_class):
            h, w = SIZES[(c + i) % len(SIZES)]
            Image.fromarray(smooth_image(rng, h, w)).save(root / f"c{c}" / f"{i}.png")
    if corrupt:
        (root / "c0" / "zz_bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def stored_samples(beton):
    """(image H x W x 3 uint8, label, mode) per sample, read without ffcv's decoder."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    blob = np.fromfile(beton, dtype=np.uint8)
    out = []
    for meta, label in zip(reader.metadata["f0"], reader.metadata["f1"]):
        ptr = int(meta["data_ptr"])
        data = blob[ptr:ptr + sizes[ptr]]
        if meta["mode"] == 0:
            img = np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB"))
        else:
            img = data.reshape(int(meta["height"]), int(meta["width"]), 3)
        out.append((img, int(label), int(meta["mode"])))
    return out


def source_samples(root):
    from fastssl.data.imagefolder import load_rgb, scan_image_folder

    index = scan_image_folder(root)
    return [(load_rgb(p), c) for p, c in index.samples if not p.endswith("zz_bad.jpg")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("if"))


@pytest.mark.ffcv
def test_round_trip_jpeg_keeps_labels_and_pixels(folder, tmp_path):
    pytest.importorskip("ffcv")
    out = tmp_path / "d.beton"
    proc = run_tool("tools/convert_ffcv.py", str(folder), str(out), "--workers", "2", "--page-mib", "2",
                    "--jpeg-quality", "95")
    assert proc.returncode == 0, proc.stderr
    assert "12 images in 3 classes" in proc.stdout and "skipped 1 corrupt" in proc.stdout, proc.stdout
    assert f"skipped corrupt image {folder / 'c0' / 'zz_bad.jpg'}" in proc.stderr
    assert not [p for p in os.listdir(tmp_path) if p != "d.beton"], "temporary file left behind"
    assert f"{out.stat().st_size / 2**20:.1f} MiB" in proc.stdout, proc.stdout  # the size of what it wrote
    assert "12/12" in proc.stderr, proc.stderr  # ffcv's progress bar reached every image
    stored, source = stored_samples(out), source_samples(folder)
    assert len(stored) == len(source) == 12
    for (img, label, mode), (src, src_label) in zip(stored, source):
        assert label == src_label and mode == 0 and img.shape == src.shape
        assert np.abs(img.astype(float) - src).mean() < 2.0


@pytest.mark.ffcv
def test_raw_mode_is_exact_and_max_resolution_caps_the_longest_side(folder, tmp_path):
    pytest.importorskip("ffcv")
    from fastssl.data.beton import convert_image_folder

    raw = convert_image_folder(folder, tmp_path / "raw.beton", write_mode="raw", page_mib=2)
    assert raw.images == 12 and [p for p, _ in raw.skipped] == [str(folder / "c0" / "zz_bad.jpg")]
    for (img, label, mode), (src, src_label) in zip(stored_samples(raw.path), source_samples(folder)):
        assert mode == 1 and label == src_label and np.array_equal(img, src)

    capped = convert_image_folder(folder, tmp_path / "cap.beton", write_mode="raw", max_resolution=32, page_mib=2)
    for (img, _, _), (src, _) in zip(stored_samples(capped.path), source_samples(folder)):
        h, w = src.shape[:2]
        r = min(1.0, 32 / max(h, w))  # ffcv's resizer: sides scaled by R / longest side, truncated
        assert img.shape[:2] == (int(r * h), int(r * w))


@pytest.mark.ffcv
def test_proportion_mode_mixes_jpeg_and_raw_reproducibly(folder, tmp_path):
    pytest.importorskip("ffcv")
    from fastssl.data.beton import convert_image_folder

    s = convert_image_folder(folder, tmp_path / "p.beton", write_mode="proportion", compress_probability=0.5,
                             workers=2, chunk_size=3, page_mib=2)
    modes = [m for _, _, m in stored_samples(s.path)]
    # Each sample's choice is np.random.rand() < p right after np.random.seed(sample index).
    expected = [0 if np.random.RandomState(i).rand() < 0.5 else 1 for i in range(12)]
    assert modes == expected and 0 < sum(modes) < 12


@pytest.mark.ffcv
def test_worker_failure_stops_with_the_file_name_instead_of_hanging(folder, tmp_path, monkeypatch):
    pytest.importorskip("ffcv")
    from fastssl.data import beton
    from fastssl.errors import UserError

    victim, load_rgb = str(folder / "c1" / "2.png"), beton.load_rgb

    def failing_load(path):  # passes the up-front check, then fails in a writer process (inherited by fork)
        if path == victim:
            raise UserError(f"corrupt or truncated image {path}: vanished")
        return load_rgb(path)

    monkeypatch.setattr(beton, "load_rgb", failing_load)
    with pytest.raises(UserError, match="2.png: vanished"):
        beton.convert_image_folder(folder, tmp_path / "x.beton", workers=2, chunk_size=2, page_mib=2)
    assert os.listdir(tmp_path) == []


def test_bad_arguments_are_one_line_errors(tmp_path):
    folder = make_image_folder(tmp_path / "if", classes=2, per_class=1, corrupt=False)
    (tmp_path / "afile").write_text("")
    (tmp_path / "d.beton").mkdir()
    (tmp_path / "old.beton").write_bytes(b"a previous conversion")
    cases = [
        ((str(tmp_path / "missing"), str(tmp_path / "o.beton")), "does not exist"),
        ((str(folder), str(tmp_path / "o.bin")), "must end in .beton"),
        ((str(folder), str(tmp_path / "afile" / "o.beton")), "afile' is a file, not a folder"),
        ((str(folder), str(tmp_path / "d.beton")), "d.beton is a folder; expected the path of a .beton file"),
        ((str(folder), str(tmp_path / "old.beton")), "old.beton already exists; expected a new path (or --overwrite"),
        ((str(folder), str(tmp_path / "o.beton"), "--jpeg-quality", "0"), "--jpeg-quality 0"),
        ((str(folder), str(tmp_path / "o.beton"), "--max-resolution", "4"), "--max-resolution 4"),
        ((str(folder), str(tmp_path / "o.beton"), "--page-mib", "3"), "--page-mib 3"),
        ((str(folder), str(tmp_path / "o.beton"), "--write-mode", "smart", "--smart-threshold", "-1"),
         "--smart-threshold -1; expected a size in bytes >= 0"),
    ]
    for args, fragment in cases:
        assert_user_error(run_tool("tools/convert_ffcv.py", *args), fragment)
    assert (tmp_path / "old.beton").read_bytes() == b"a previous conversion"


@pytest.mark.ffcv
def test_overwrite_replaces_only_when_asked_and_the_os_refusing_is_one_line(folder, tmp_path, monkeypatch):
    pytest.importorskip("ffcv")
    from ffcv.writer import DatasetWriter

    from fastssl.data.beton import convert_image_folder, describe
    from fastssl.errors import UserError

    (tmp_path / "d.beton").write_bytes(b"a previous conversion")
    with pytest.raises(UserError, match="--overwrite"):
        convert_image_folder(folder, tmp_path / "d.beton", page_mib=2)
    assert (tmp_path / "d.beton").read_bytes() == b"a previous conversion"
    convert_image_folder(folder, tmp_path / "d.beton", page_mib=2, overwrite=True)
    assert describe(tmp_path / "d.beton")["images"] == 12 and os.listdir(tmp_path) == ["d.beton"]

    proc = run_tool("tools/convert_ffcv.py", str(folder), "/proc/fastssl.beton")
    assert_user_error(proc, "cannot create files in folder '/proc'")  # as root too, where os.access says yes

    def disk_full(self):
        raise OSError(28, "No space left on device", self.fname)

    monkeypatch.setattr(DatasetWriter, "prepare", disk_full)
    with pytest.raises(UserError, match=r"cannot write .*d\.beton: No space left on device \(.*\.d\.beton\.tmp-"):
        convert_image_folder(folder, tmp_path / "d.beton", page_mib=2, overwrite=True)
    assert describe(tmp_path / "d.beton")["images"] == 12 and os.listdir(tmp_path) == ["d.beton"]


_DISK_FULL_TOOL = """
import runpy, signal, sys, time
from ffcv.memory_allocator import MemoryAllocator
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under a shell that ignores it
def disk_full(self):  # ffcv's page write, in the writer processes (forked: they inherit this)
    if self.my_page >= 0:
        time.sleep(0.5)  # the parent, having counted every sample, now waits in a blocking read for page tables
        raise OSError(28, "No space left on device")  # as write(2) says it: errno, no file name
MemoryAllocator.flush_page = disk_full
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.ffcv
def test_disk_full_in_a_writer_process_is_one_line_and_keeps_the_previous_file(folder, tmp_path):
    # Oracle: the tool's contract (one error line naming OUT and the OS's reason, no traceback, OUT untouched, no
    # temporary left) when the disk fills up as ffcv's writer processes write their last pages: both workers
    # fail (each holds a page), and neither may print multiprocessing's traceback.
    pytest.importorskip("ffcv")
    from fastssl.data.beton import convert_image_folder

    out = convert_image_folder(folder, tmp_path / "good.beton", page_mib=2).path
    before = out.read_bytes()
    proc = run_tool("-c", _DISK_FULL_TOOL, "tools/convert_ffcv.py", str(folder), str(out), "--workers", "2",
                    "--chunk-size", "6", "--page-mib", "2", "--overwrite", timeout=60)
    assert_user_error(proc, f"cannot write {out}: No space left on device")
    assert "leaked shared_memory" not in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == ["good.beton"] and out.read_bytes() == before


@pytest.mark.ffcv
@pytest.mark.parametrize("sig, code, message", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_a_signal_mid_conversion_removes_the_partial_file_with_one_line(tmp_path, sig, code, message):
    # Oracle: the tool's contract (OUT whole or untouched, one error line) under what a scheduler's time limit or
    # Ctrl-C sends: the signal to every process of the tool, ffcv's writer processes included (they printed a
    # traceback each, and the parent a leaked shared_memory warning). A real process, signalled while its
    # .OUT.tmp-<pid> is being written (each image slowed by 50 ms), with a previous OUT to be replaced.
    pytest.importorskip("ffcv")
    from fastssl.data.beton import convert_image_folder

    src = make_image_folder(tmp_path / "src", classes=2, per_class=60, corrupt=False)
    convert_image_folder(src, tmp_path / "x.beton", page_mib=2)
    before = (tmp_path / "x.beton").read_bytes()

    def writing() -> bool:
        return any(p.name.startswith(".x.beton.tmp-") for p in tmp_path.iterdir())

    rc, stderr = signal_mid_conversion("convert_ffcv.py", "fastssl.data.beton:load_rgb", writing,
                                       [str(src), str(tmp_path / "x.beton"), "--workers", "2", "--chunk-size", "5",
                                        "--page-mib", "2", "--overwrite"], sig)
    rest = re.sub(r"\s*\d+%\|[^\]]*\]", "", stderr).split()  # without ffcv's tqdm progress bars
    assert rc == code and " ".join(rest) == f"error: {message}", stderr
    assert sorted(os.listdir(tmp_path)) == ["src", "x.beton"] and (tmp_path / "x.beton").read_bytes() == before


@pytest.mark.ffcv
def test_temporaries_of_killed_conversions_are_removed(folder, tmp_path):
    pytest.importorskip("ffcv")
    from conftest import dead_pid
    from fastssl.data.beton import convert_image_folder

    dead, alive = dead_pid(), os.getppid()
    names = [f".x.beton.tmp-{dead}", f".x.beton.tmp-{alive}", f".y.beton.tmp-{dead}", ".x.beton.tmp-12a"]
    for name in names:
        (tmp_path / name).write_bytes(b"half a beton")
    convert_image_folder(folder, tmp_path / "x.beton", page_mib=2)
    assert sorted(os.listdir(tmp_path)) == sorted(["x.beton", *names[1:]])


def test_a_folder_given_as_the_beton_is_named(tmp_path):
    from fastssl.data.beton import open_beton
    from fastssl.errors import UserError

    with pytest.raises(UserError, match=f"{tmp_path} is a folder; the ffcv backend expects a .beton file made by "
                                        f"tools/convert_ffcv.py"):
        open_beton(tmp_path)


@pytest.mark.ffcv
def test_all_corrupt_folder_is_an_error(tmp_path):
    pytest.importorskip("ffcv")
    from fastssl.data.beton import convert_image_folder
    from fastssl.errors import UserError

    (tmp_path / "if" / "a").mkdir(parents=True)
    (tmp_path / "if" / "a" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(UserError, match="no readable images in .*: all 1 failed to decode"):
        convert_image_folder(tmp_path / "if", tmp_path / "o.beton")


def test_missing_ffcv_gives_the_install_line(tmp_path, monkeypatch):
    from fastssl.config import DataConfig
    from fastssl.errors import UserError
    from pipelines.augment import preset
    from pipelines.base import LoaderContext, build_loader

    monkeypatch.setitem(sys.modules, "ffcv", None)  # import ffcv now raises ImportError
    cfg = DataConfig(backend="ffcv", path=str(tmp_path / "d.beton"), image_size=16, batch_size=4)
    with pytest.raises(UserError, match=r"ffcv is not installed; install it with `bash \.ci/install_ffcv\.sh"):
        build_loader(cfg, preset("simclr", 16), LoaderContext(device="cpu"))


@pytest.mark.ffcv
def test_unusable_beton_files_are_named(folder, tmp_path):
    pytest.importorskip("ffcv")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from fastssl.data.beton import convert_image_folder, describe
    from fastssl.errors import UserError

    good = convert_image_folder(folder, tmp_path / "good.beton", page_mib=2).path
    assert describe(good) == {"images": 12, "max_height": 48, "max_width": 36, "jpeg": 12}

    cut = tmp_path / "cut.beton"
    shutil.copy(good, cut)
    os.truncate(cut, os.path.getsize(good) // 2)
    header_only = tmp_path / "tiny.beton"
    header_only.write_bytes(good.read_bytes()[:10])
    # Cut inside the allocation table on an entry boundary (an interrupted copy): sizes still add up.
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    short_table = tmp_path / "short_table.beton"
    table_at = int(np.fromfile(good, dtype=HeaderType, count=1)[0]["alloc_table_ptr"])
    short_table.write_bytes(good.read_bytes()[:table_at + 5 * ALLOC_TABLE_TYPE.itemsize])
    with pytest.raises(UserError, match=r"short_table.beton is truncated or damaged: .* lists 5 of its 12 samples"):
        describe(short_table)
    for path in (cut, header_only, tmp_path / "none.beton"):
        with pytest.raises(UserError, match=str(path)):
            describe(path)

    foreign = tmp_path / "foreign.beton"
    w = DatasetWriter(str(foreign), {"img": RGBImageField(), "y": IntField()}, page_size=1 << 21, num_workers=1)
    w.from_indexed_dataset([(np.zeros((8, 8, 3), np.uint8), 0)] * 2)
    with pytest.raises(UserError, match=r"has fields \[img \(RGBImageField\), y \(IntField\)\]; expected image"):
        describe(foreign)


def test_help_needs_no_ffcv():
    proc = run_tool("tools/convert_ffcv.py", "--help", cwd=ROOT)
    assert proc.returncode == 0 and "--max-resolution" in proc.stdout and "--write-mode" in proc.stdout
