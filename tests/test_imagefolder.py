"""ImageFolder index and decoding. Oracles: torchvision ImageFolder's layout rules (sorted class folders,
extension filter, recursive files) and its own sample list, PIL's own `convert("RGB")`, and closed-form
conversions (grey -> equal channels, RGBA -> its RGB channels, 16-bit grey -> its top 8 bits as DALI decodes it)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fastssl.data.imagefolder import check_images, load_rgb, scan_image_folder
from fastssl.errors import UserError


def _noise(h: int = 32, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path, arr=None, mode: str = "RGB", fmt: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(_noise() if arr is None else arr)
    img.convert(mode).save(path, format=fmt)
    return path


def _truncated_jpeg(path):
    """A real JPEG cut in half: the header parses, the scan data ends early."""
    buf = io.BytesIO()
    Image.fromarray(_noise(64, 64)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def _one_line_error(excinfo, *fragments: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, msg


def test_scan_follows_imagefolder_layout(tmp_path):
    # Created in non-sorted order, with every kind of file the scan must skip.
    for rel in ["zebra/b.png", "zebra/A.JPG", "apple/sub/c.jpeg", "apple/a.webp", "apple/b.BMP", "mango/x.jpg"]:
        _save(tmp_path / rel, fmt={"webp": "WEBP", "bmp": "BMP"}.get(rel.rsplit(".", 1)[1].lower()))
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    _save(tmp_path / "apple" / ".hidden.jpg")
    _save(tmp_path / "apple" / ".cache" / "d.jpg")
    _save(tmp_path / ".trash" / "e.jpg")  # a hidden folder is not a class
    (tmp_path / "readme.jpg").write_text("a file at the root is not a class")

    index = scan_image_folder(tmp_path)
    assert index.root == tmp_path.absolute()
    assert index.classes == ("apple", "mango", "zebra")
    expected = [("apple/a.webp", 0), ("apple/b.BMP", 0), ("apple/sub/c.jpeg", 0), ("mango/x.jpg", 1),
                ("zebra/A.JPG", 2), ("zebra/b.png", 2)]  # code-point order, as sorted() and torchvision
    assert index.samples == tuple((str(tmp_path / rel), c) for rel, c in expected)
    assert len(index) == 6
    assert index.labels.dtype == np.int64
    np.testing.assert_array_equal(index.labels, [c for _, c in expected])
    index.labels[:] = 7  # a caller mutating its copy must not change the index
    np.testing.assert_array_equal(index.labels, [c for _, c in expected])


_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".ppm": "PPM", ".bmp": "BMP", ".pgm": "PPM",
            ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}


def test_every_torchvision_extension_is_found_and_decoded_as_by_pil(tmp_path):
    # Oracle: torchvision.datasets.ImageFolder's own class list and sample list over a folder mixing every
    # extension it accepts (upper case too) with files it skips; each kept file decodes as PIL's convert("RGB").
    datasets = pytest.importorskip("torchvision.datasets")
    for i, (ext, fmt) in enumerate(_FORMATS.items()):
        name = f"c{i % 3}/img{i}{ext.upper() if i % 2 else ext}"
        arr = _noise(seed=i)[..., 0] if ext == ".pgm" else _noise(seed=i)
        _save(tmp_path / name, arr, mode="L" if ext == ".pgm" else "RGB", fmt=fmt)
    _save(tmp_path / "c1" / "nested" / "deep.TIF", fmt="TIFF")
    _save(tmp_path / "c2" / "anim.gif", fmt="GIF")
    (tmp_path / "c0" / "notes.txt").write_text("not an image")

    index = scan_image_folder(tmp_path)
    reference = datasets.ImageFolder(str(tmp_path))
    assert index.classes == tuple(reference.classes)
    assert index.samples == tuple((str(p), c) for p, c in reference.samples)
    assert len(index) == len(_FORMATS) + 1
    for path, _ in index.samples:
        with Image.open(path) as img:
            np.testing.assert_array_equal(load_rgb(path), np.asarray(img.convert("RGB")))


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF"), ("I", "TIFF")])
def test_16_bit_grey_keeps_its_top_8_bits(tmp_path, mode, fmt):
    # Oracle: a 0..65535 gradient has 8-bit values v >> 8 (0..255, mean 127.5 over whole 256-value steps), which
    # is what DALI's decoder gives; PIL's convert("RGB") clips at 255 and turns 99.6% of the pixels white.
    ramp = np.arange(65536, dtype=np.uint32).reshape(256, 256)
    img = Image.fromarray(ramp.astype(np.int32), "I") if mode == "I" else Image.fromarray(ramp.astype(np.uint16))
    if mode == "I;16B":
        img = Image.frombytes("I;16B", img.size, ramp.astype(">u2").tobytes())
    img.save(tmp_path / f"ramp.{fmt.lower()}", format=fmt)
    with Image.open(tmp_path / f"ramp.{fmt.lower()}") as saved:
        assert saved.mode == mode  # the file really is the mode under test
    got = load_rgb(str(tmp_path / f"ramp.{fmt.lower()}"))
    assert got.dtype == np.uint8 and got.shape == (256, 256, 3)
    np.testing.assert_array_equal(got, np.repeat((ramp >> 8).astype(np.uint8)[..., None], 3, axis=2))
    assert got.min() == 0 and got.max() == 255 and got.mean() == 127.5


def test_missing_root(tmp_path):
    with pytest.raises(UserError) as e:
        scan_image_folder(tmp_path / "nope")
    _one_line_error(e, str(tmp_path / "nope"), "does not exist", "ROOT/<class>/<image>")


def test_root_is_a_file(tmp_path):
    f = _save(tmp_path / "x.jpg")
    with pytest.raises(UserError) as e:
        scan_image_folder(f)
    _one_line_error(e, str(f), "not a directory")


def test_no_class_folders(tmp_path):
    _save(tmp_path / "loose.jpg")
    _save(tmp_path / ".hidden" / "a.jpg")
    with pytest.raises(UserError) as e:
        scan_image_folder(tmp_path)
    _one_line_error(e, str(tmp_path), "no class sub-folders", "expected ROOT/<class>/<image>")


def test_class_folder_without_images(tmp_path):
    _save(tmp_path / "good" / "a.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "textonly").mkdir()
    (tmp_path / "textonly" / "a.txt").write_text("x")
    with pytest.raises(UserError) as e:
        scan_image_folder(tmp_path)
    _one_line_error(e, str(tmp_path / "empty"), str(tmp_path / "textonly"), ".jpg")
    assert str(tmp_path / "good") + "," not in str(e.value)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1"])  # 16-bit: test_16_bit_grey_keeps_its_top_8_bits
def test_load_rgb_converts_like_pil(tmp_path, mode):
    path = _save(tmp_path / f"img_{mode.replace(';', '')}.png", mode=mode)
    got = load_rgb(str(path))
    with Image.open(path) as img:
        oracle = np.asarray(img.convert("RGB"))
    assert got.dtype == np.uint8 and got.shape == (32, 40, 3)
    np.testing.assert_array_equal(got, oracle)


def test_load_rgb_closed_form_conversions(tmp_path):
    rgba = np.concatenate([_noise(), _noise(seed=1)[..., :1]], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_rgb(str(tmp_path / "a.png")), rgba[..., :3])  # alpha dropped, not blended
    grey = _noise()[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    np.testing.assert_array_equal(load_rgb(str(tmp_path / "g.png")), np.repeat(grey[..., None], 3, axis=2))


def test_load_rgb_cmyk_jpeg(tmp_path):
    path = tmp_path / "c.jpg"
    Image.fromarray(_noise()).convert("CMYK").save(path, quality=95)
    with Image.open(path) as img:
        assert img.mode == "CMYK"
        oracle = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(load_rgb(str(path)), oracle)


def test_load_rgb_corrupt_file(tmp_path):
    path = tmp_path / "bad.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(UserError) as e:
        load_rgb(str(path))
    _one_line_error(e, f"corrupt or truncated image {path}:")


def test_load_rgb_truncated_jpeg(tmp_path):
    path = _truncated_jpeg(tmp_path / "half.jpg")
    with Image.open(path) as img:  # the header alone is fine: only a full decode can catch this file
        assert img.size == (64, 64)
    with pytest.raises(UserError) as e:
        load_rgb(str(path))
    _one_line_error(e, f"corrupt or truncated image {path}:", "truncated")


def test_load_rgb_missing_file(tmp_path):
    with pytest.raises(UserError) as e:
        load_rgb(str(tmp_path / "gone.jpg"))
    _one_line_error(e, str(tmp_path / "gone.jpg"), "not found")


@pytest.mark.parametrize("workers", [1, 2])
def test_check_images_finds_exactly_the_bad_files(tmp_path, workers):
    for i in range(4):
        _save(tmp_path / "a" / f"ok{i}.jpg")
        _save(tmp_path / "b" / f"ok{i}.png")
    bad = {str(_truncated_jpeg(tmp_path / "a" / "half.jpg")), str(tmp_path / "b" / "junk.png")}
    (tmp_path / "b" / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # PNG magic, broken chunks
    index = scan_image_folder(tmp_path)
    problems = check_images(index, workers=workers)
    assert {p for p, _ in problems} == bad
    assert [p for p, _ in problems] == [p for p, _ in index.samples if p in bad]  # index order
    assert all(reason for _, reason in problems)


def test_check_images_rejects_bad_worker_count(tmp_path):
    _save(tmp_path / "a" / "x.jpg")
    with pytest.raises(UserError) as e:
        check_images(scan_image_folder(tmp_path), workers=0)
    _one_line_error(e, "workers=0", ">= 1")
