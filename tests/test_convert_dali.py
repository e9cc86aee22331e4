"""tools/convert_dali.py and fastssl/data/shards.py. Oracles: the source files themselves (byte equality for
JPEGs, PIL's decode for re-encoded formats, PIL's sizes), Python's tarfile for member offsets, and DALI's own
readers.webdataset for the index files (when DALI is installed)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastssl.data import shards
from fastssl.data.shards import convert_image_folder, open_shards, verify_shards
from fastssl.errors import UserError
from conftest import assert_user_error, dead_pid, run_tool, signal_mid_conversion


def _jpeg(path: Path, h: int, w: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG", quality=90)
    return path.read_bytes()


def _folder(root: Path, per_class: int = 7, classes=("cat", "dog", "emu")) -> dict[str, tuple[bytes, int]]:
    """An ImageFolder of JPEGs of assorted sizes; returns sha256 -> (bytes, label) of every image."""
    out = {}
    for c, name in enumerate(classes):
        for i in range(per_class):
            data = _jpeg(root / name / f"{i:03d}.jpg", 24 + 3 * i, 40 - 2 * i, seed=100 * c + i)
            out[hashlib.sha256(data).hexdigest()] = (data, c)
    return out


def _read_back(out: Path) -> list[tuple[bytes, int, str]]:
    """(jpg bytes, label, key) of every sample, read with tarfile in shard order: an independent reader."""
    m = json.loads((out / "manifest.json").read_text())
    samples = []
    for s in m["shards"]:
        with tarfile.open(out / s["tar"]) as tar:
            members = {t.name: tar.extractfile(t).read() for t in tar.getmembers()}
        keys = sorted({n.split(".")[0] for n in members})
        samples += [(members[k + ".jpg"], int(members[k + ".cls"].decode()), k) for k in keys]
    return samples


def test_round_trip_keeps_every_image_and_label(tmp_path):
    src = _folder(tmp_path / "src")
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "src" / "emu" / "red.png")  # not a JPEG
    summary = convert_image_folder(tmp_path / "src", tmp_path / "out", shard_size=5)

    got = _read_back(tmp_path / "out")
    assert summary.num_samples == len(got) == len(src) + 1 and summary.num_shards == 5
    assert summary.classes == ("cat", "dog", "emu") and summary.skipped == () and summary.reencoded == 1
    jpegs = {hashlib.sha256(d).hexdigest(): c for d, c, _ in got}
    assert all(jpegs.get(h) == c for h, (_, c) in src.items())  # JPEG sources: byte-identical, same label
    png = [Image.open(io.BytesIO(d)) for d, c, _ in got if hashlib.sha256(d).hexdigest() not in src]
    assert len(png) == 1 and png[0].format == "JPEG" and png[0].size == (30, 20)
    assert np.abs(np.asarray(png[0], np.int16) - [200, 10, 10]).max() <= 8  # re-encoded at quality 95

    s = open_shards(tmp_path / "out")
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["num_samples"] == len(s) and m["class_counts"] == [7, 7, 8] and m["classes"] == ["cat", "dog", "emu"]
    for i, (data, label, _) in enumerate(got):  # the index offsets point at the same bytes tarfile reads
        with open(s.tars[s.shard[i]], "rb") as f:
            f.seek(s.offset[i])
            assert f.read(s.size[i]) == data
        assert s.labels[i] == label
        assert (s.widths[i], s.heights[i]) == Image.open(io.BytesIO(data)).size
    verify_shards(tmp_path / "out")


def test_tiff_and_16_bit_sources_are_re_encoded_with_their_top_8_bits(tmp_path):
    # Oracle: a .tif is an image (torchvision's extensions), and a 16-bit 0..65535 ramp stores v >> 8 (what
    # DALI decodes from the source file), within JPEG quality 95's error on a smooth ramp; PIL's convert("RGB")
    # would clip it to a mean of ~254.
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.fromarray(ramp).save(tmp_path / "src" / "a" / "ramp.png")
    Image.fromarray(ramp).save(tmp_path / "src" / "a" / "ramp.TIF")
    summary = convert_image_folder(tmp_path / "src", tmp_path / "out")
    assert summary.num_samples == 2 and summary.reencoded == 2 and summary.skipped == ()
    expected = np.repeat((ramp >> 8)[..., None], 3, axis=2).astype(np.int16)
    for data, _, _ in _read_back(tmp_path / "out"):
        got = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
        assert np.abs(got - expected).max() <= 4 and abs(got.mean() - 127.5) < 0.5


def test_shards_are_shuffled_and_conversion_is_deterministic(tmp_path):
    _folder(tmp_path / "src", per_class=10)
    convert_image_folder(tmp_path / "src", tmp_path / "a", shard_size=8, workers=1)
    convert_image_folder(tmp_path / "src", tmp_path / "b", shard_size=8, workers=2)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:  # parallel workers write the same bytes as one process
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    first = [c for _, c, _ in _read_back(tmp_path / "a")][:8]
    assert len(set(first)) > 1  # class-sorted shards would put a single class in the first shard


def test_dali_webdataset_reader_reads_the_index_files(tmp_path):
    pytest.importorskip("nvidia.dali")
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    src = _folder(tmp_path / "src")
    convert_image_folder(tmp_path / "src", tmp_path / "out", shard_size=6)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    tars = [str(tmp_path / "out" / s["tar"]) for s in m["shards"]]
    idxs = [str(tmp_path / "out" / s["index"]) for s in m["shards"]]

    @pipeline_def(batch_size=len(src), num_threads=1, device_id=None)
    def read():
        jpg, cls = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "cls"],
                                         missing_component_behavior="error")
        return jpg, cls

    pipe = read()
    pipe.build()
    jpg, cls = pipe.run()
    got = {hashlib.sha256(np.array(j).tobytes()).hexdigest(): int(np.array(c).tobytes()) for j, c in zip(jpg, cls)}
    assert got == {h: c for h, (_, c) in src.items()}


def test_corrupt_images_are_reported_by_name_and_skipped(tmp_path):
    src = _folder(tmp_path / "src")
    (tmp_path / "src" / "dog" / "garbage.jpg").write_bytes(b"not a jpeg at all")
    good = (tmp_path / "src" / "cat" / "000.jpg").read_bytes()
    (tmp_path / "src" / "cat" / "truncated.jpg").write_bytes(good[: int(len(good) * 0.8)])
    proc = run_tool("tools/convert_dali.py", str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "4",
                    "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    reported = [ln for ln in proc.stderr.splitlines() if ln.startswith("skipped corrupt image")]
    assert sorted(ln.split()[3].rstrip(":") for ln in reported) == sorted(
        [str(tmp_path / "src" / "cat" / "truncated.jpg"), str(tmp_path / "src" / "dog" / "garbage.jpg")])
    assert "skipped 2 corrupt" in proc.stdout and f"wrote {len(src)} images" in proc.stdout
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["num_samples"] == len(src) and len(m["skipped"]) == 2


def test_interrupted_conversion_leaves_nothing_usable(tmp_path, monkeypatch):
    _folder(tmp_path / "src")
    real = shards._write_shard

    def interrupted(job):
        if job[0] == 2:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(shards, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_image_folder(tmp_path / "src", tmp_path / "out", shard_size=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no OUT_DIR, no partial folder left


@pytest.mark.parametrize("sig, code, message, workers", [
    (signal.SIGTERM, 143, "terminated (SIGTERM)", 2), (signal.SIGTERM, 143, "terminated (SIGTERM)", 1),
    (signal.SIGINT, 130, "interrupted", 2)])
def test_a_signal_mid_conversion_leaves_no_partial_folder_and_the_previous_dataset(tmp_path, sig, code, message,
                                                                                    workers):
    # Oracle: the tool's contract (OUT_DIR whole or untouched, one error line) under what a scheduler's time limit
    # or Ctrl-C sends: the signal to every process of the tool. A real process, signalled while shard tars are
    # being written (each image slowed by 50 ms), with a previous conversion at OUT_DIR to be replaced.
    _folder(tmp_path / "src", per_class=20)
    convert_image_folder(tmp_path / "src", tmp_path / "out", shard_size=10)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}

    def writing() -> bool:
        return any(p.name.startswith(".out.partial-") and any(p.glob("*.tar")) for p in tmp_path.iterdir())

    rc, stderr = signal_mid_conversion("convert_dali.py", "fastssl.data.shards:_jpeg_bytes", writing,
                                       [str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "10",
                                        "--workers", str(workers), "--overwrite"], sig)
    assert rc == code and stderr.strip() == f"error: {message}", stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no .out.partial-<pid>, no .out.old-<pid>
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_a_killed_conversion_is_refused_by_the_loader(tmp_path):
    # A SIGKILL leaves the hidden partial folder with tars and indexes but never a manifest.
    _folder(tmp_path / "src")
    convert_image_folder(tmp_path / "src", tmp_path / "out", shard_size=4)
    (tmp_path / "out" / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest.json"):
        open_shards(tmp_path / "out")
    from pipelines.dali_sources import open_source

    with pytest.raises(UserError, match="no manifest.json"):
        open_source(str(tmp_path / "out"))


@pytest.mark.parametrize("damage, message", [
    ("drop_index", "shard-000001.idx listed in"),
    ("edit_manifest", "checksum does not match"),
    ("truncate_tar", "truncated or replaced"),
    ("short_index", "does not match the manifest"),
    ("drop_samples", "samples.npy is missing"),
    ("truncate_samples", "samples.npy does not match the SHA-256"),
    ("garble_index", "without a leading 'jpg OFFSET SIZE'"),
    ("drop_classes", "lacks a field"),
])
def test_damaged_shard_directories_give_clear_errors(tmp_path, damage, message):
    _folder(tmp_path / "src")
    out = tmp_path / "out"
    convert_image_folder(tmp_path / "src", out, shard_size=4)
    if damage == "drop_index":
        (out / "shard-000001.idx").unlink()
    elif damage == "edit_manifest":
        m = json.loads((out / "manifest.json").read_text())
        m["shards"][0]["num_samples"] += 1
        (out / "manifest.json").write_text(json.dumps(m))
    elif damage == "truncate_tar":
        data = (out / "shard-000002.tar").read_bytes()
        (out / "shard-000002.tar").write_bytes(data[:-1024])
    elif damage == "short_index":
        lines = (out / "shard-000000.idx").read_text().splitlines()
        (out / "shard-000000.idx").write_text("\n".join(lines[:-1]) + "\n")
    elif damage == "truncate_samples":
        (out / "samples.npy").write_bytes((out / "samples.npy").read_bytes()[:100])
    elif damage == "garble_index":
        idx = out / "shard-000000.idx"
        lines = idx.read_text().splitlines()
        lines[1] = lines[1].replace("jpg ", "jpg x", 1)
        idx.write_text("\n".join(lines) + "\n")
    elif damage == "drop_classes":
        m = json.loads((out / "manifest.json").read_text())
        del m["classes"]  # outside the checksum, which covers the file lists
        (out / "manifest.json").write_text(json.dumps(m))
    else:
        (out / "samples.npy").unlink()
    with pytest.raises(UserError, match=message) as e:
        open_shards(out)
    assert "\n" not in str(e.value)


def test_a_shard_gone_after_opening_is_named_and_no_descriptor_is_closed_twice(tmp_path, monkeypatch):
    import os

    from pipelines.dali_sources import ShardSource

    _folder(tmp_path / "src")
    convert_image_folder(tmp_path / "src", tmp_path / "out", shard_size=4)
    source = ShardSource(str(tmp_path / "out"))
    (tmp_path / "out" / "shard-000001.tar").unlink()  # e.g. a dataset folder cleaned up under a running job
    closed, real_close = [], os.close
    monkeypatch.setattr(os, "close", lambda fd: (closed.append(fd), real_close(fd))[1])
    with pytest.raises(UserError, match=r"shard .*shard-000001.tar cannot be opened \(No such file") as e:
        source.read(np.arange(len(source)))
    assert "\n" not in str(e.value)
    # Shard 0 was open and closed once; closing its number again could close another thread's file.
    assert len(closed) == 1


def test_a_shard_cut_short_after_opening_names_the_shard(tmp_path):
    from pipelines.dali_sources import ShardSource

    _folder(tmp_path / "src")
    convert_image_folder(tmp_path / "src", tmp_path / "out", shard_size=4)
    source = ShardSource(str(tmp_path / "out"))  # sizes checked against the manifest here
    tar = tmp_path / "out" / "shard-000001.tar"
    os.truncate(tar, 1024)  # e.g. a sync of the dataset folder rewriting it under a running job
    with pytest.raises(UserError, match=r"shard-000001.tar ends before the sample at byte \d+; the shard was "
                                        r"truncated after conversion: convert again") as e:
        source.read(np.arange(len(source)))
    assert "\n" not in str(e.value)


def test_verify_detects_a_changed_byte(tmp_path):
    _folder(tmp_path / "src")
    convert_image_folder(tmp_path / "src", tmp_path / "out", shard_size=4)
    tar = tmp_path / "out" / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # inside the first JPEG: sizes still match, so only the hash can tell
    tar.write_bytes(bytes(data))
    open_shards(tmp_path / "out")
    with pytest.raises(UserError, match="shard-000001.tar does not match the SHA-256"):
        verify_shards(tmp_path / "out")


def test_cli_bad_input_and_overwrite(tmp_path):
    assert run_tool("tools/convert_dali.py", "--help").returncode == 0
    assert_user_error(run_tool("tools/convert_dali.py", str(tmp_path / "missing"), str(tmp_path / "out")),
                      "missing", "does not exist")
    _folder(tmp_path / "src", per_class=2)
    assert_user_error(run_tool("tools/convert_dali.py", str(tmp_path / "src"), str(tmp_path / "o"),
                               "--shard-size", "0"), "shard size 0")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("user data")
    assert_user_error(run_tool("tools/convert_dali.py", str(tmp_path / "src"), str(tmp_path / "busy")), "busy",
                      "already exists")
    assert_user_error(run_tool("tools/convert_dali.py", str(tmp_path / "src"), str(tmp_path / "busy"),
                               "--overwrite"), "not a previous conversion")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "user data"
    (tmp_path / "afile").write_text("user data")
    for overwrite in ([], ["--overwrite"]):  # a file is never a previous conversion: refused, and kept
        assert_user_error(run_tool("tools/convert_dali.py", str(tmp_path / "src"), str(tmp_path / "afile"),
                                   *overwrite), f"output {tmp_path / 'afile'} is a file", "expected a folder path")
    assert (tmp_path / "afile").read_text() == "user data"

    assert run_tool("tools/convert_dali.py", str(tmp_path / "src"), str(tmp_path / "out")).returncode == 0
    _jpeg(tmp_path / "src" / "cat" / "new.jpg", 30, 30, seed=9)
    proc = run_tool("tools/convert_dali.py", str(tmp_path / "src"), str(tmp_path / "out"), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert len(open_shards(tmp_path / "out")) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "busy", "out", "src"]  # no old/partial folders


def test_output_and_source_may_not_nest(tmp_path):
    _folder(tmp_path / "src", per_class=2)
    proc = run_tool("tools/convert_dali.py", str(tmp_path / "src"), str(tmp_path / "src" / "newcls"))
    assert_user_error(proc, str(tmp_path / "src" / "newcls"), "inside the source image folder")
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["cat", "dog", "emu"]
    # A source inside a previous conversion: --overwrite would delete the source with the old shards.
    convert_image_folder(tmp_path / "src", tmp_path / "out")
    _folder(tmp_path / "out" / "inner", per_class=1)
    with pytest.raises(UserError, match="source image folder .*inner is inside the output"):
        convert_image_folder(tmp_path / "out" / "inner", tmp_path / "out", overwrite=True)
    assert len(list((tmp_path / "out" / "inner").rglob("*.jpg"))) == 3


def test_overwrite_interrupted_between_its_renames_keeps_the_old_dataset(tmp_path, monkeypatch):
    _folder(tmp_path / "src", per_class=2)
    convert_image_folder(tmp_path / "src", tmp_path / "out")
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    _jpeg(tmp_path / "src" / "cat" / "new.jpg", 30, 30, seed=9)
    real, calls = shards.os.replace, []

    def replace(a, b):
        calls.append((Path(a).name, Path(b).name))
        if len(calls) == 2:  # the old dataset is aside, the new one not yet in place
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(shards.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        convert_image_folder(tmp_path / "src", tmp_path / "out", overwrite=True)
    assert calls[0][0] == "out" and calls[1][1] == "out"
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before
    assert len(open_shards(tmp_path / "out")) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_unusable_output_paths_are_one_line_errors(tmp_path, monkeypatch):
    _folder(tmp_path / "src", per_class=1)
    (tmp_path / "afile").write_text("")
    for out, fragment in [(tmp_path / "afile" / "x", "afile' is a file, not a folder"),
                          (tmp_path / "afile" / "y" / "x", "afile' is a file, not a folder")]:
        with pytest.raises(UserError, match=fragment) as e:
            convert_image_folder(tmp_path / "src", out)
        assert "\n" not in str(e.value)
    def refused(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(UserError, match=f"cannot create files in folder '{tmp_path}'"):
        convert_image_folder(tmp_path / "src", tmp_path / "out")
    monkeypatch.undo()

    def disk_full(job):
        raise OSError(28, "No space left on device", job[1])

    monkeypatch.setattr(shards, "_write_shard", disk_full)
    with pytest.raises(UserError, match="cannot write the shards to .*out: No space left on device"):
        convert_image_folder(tmp_path / "src", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "src"]


def test_cli_output_the_os_refuses(tmp_path):
    _folder(tmp_path / "src", per_class=1)
    proc = run_tool("tools/convert_dali.py", str(tmp_path / "src"), "/proc/fastssl-shards")
    assert_user_error(proc, "cannot create files in folder '/proc'")  # as root too, where os.access says yes


def test_temporaries_of_killed_conversions_are_cleaned_up(tmp_path):
    import os

    _folder(tmp_path / "src", per_class=2)
    dead, alive = dead_pid(), os.getppid()
    for name in [f".out.partial-{dead}", f".out.partial-{alive}", ".out.partial-x1y2", f".other.partial-{dead}"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard-000000.tar").write_bytes(b"half")
    convert_image_folder(tmp_path / "src", tmp_path / "out")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([".out.partial-x1y2", f".out.partial-{alive}", f".other.partial-{dead}", "out", "src"])

    # Killed between the two renames of --overwrite: the previous dataset comes back, nothing is lost.
    os.rename(tmp_path / "out", tmp_path / f".out.old-{dead}")
    with pytest.raises(UserError, match="already exists"):
        convert_image_folder(tmp_path / "src", tmp_path / "out")
    assert len(open_shards(tmp_path / "out")) == 6 and not (tmp_path / f".out.old-{dead}").exists()
    (tmp_path / f".out.old-{dead}").mkdir()  # killed while deleting it, after the new dataset was in place
    convert_image_folder(tmp_path / "src", tmp_path / "out", overwrite=True)
    assert not (tmp_path / f".out.old-{dead}").exists()
