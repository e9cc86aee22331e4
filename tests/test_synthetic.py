"""The embedded dataset. Oracles: the ImageFolder layout rules, sha256 of the files (determinism), the
closed-form mean of the area distribution, Hu's moment invariants (Hu 1962, computed here in float64
numpy) for the shape signal, and binomial chance bounds for what colour alone can decode."""

from __future__ import annotations

import hashlib
import signal
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_user_error, run_tool, signal_mid_conversion
from fastssl.data import synthetic
from fastssl.data.imagefolder import load_rgb, scan_image_folder
from fastssl.data.synthetic import (AREA_SIDE_RANGE, FAMILY_NAMES, STRETCH_RANGE, encode_jpeg,
                                    make_synthetic_dataset, render_alpha, render_image, sample_rng)
from fastssl.errors import UserError


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "data"
    make_synthetic_dataset(out, classes=10, train_per_class=40, val_per_class=40, size=32, seed=3)
    return out


def test_layout_counts_and_summary(tmp_path):
    summary = make_synthetic_dataset(tmp_path / "d", classes=3, train_per_class=4, val_per_class=2, size=24,
                                     seed=1)
    assert summary.classes == FAMILY_NAMES[:3]
    assert (summary.train_images, summary.val_images, summary.size) == (12, 6, 24)
    assert str(tmp_path / "d") in str(summary) and "12 train + 6 val" in str(summary)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["train", "val"]
    for split, n in (("train", 4), ("val", 2)):
        index = scan_image_folder(tmp_path / "d" / split)
        assert index.classes == tuple(sorted(FAMILY_NAMES[:3]))
        np.testing.assert_array_equal(np.bincount(index.labels), [n] * 3)
        assert all(Path(p).suffix == ".jpg" for p, _ in index.samples)
        for p, _ in index.samples:
            assert load_rgb(p).shape == (24, 24, 3)
    assert list(tmp_path.iterdir()) == [tmp_path / "d"]  # no temp folder left beside it


def test_same_arguments_give_identical_bytes(tmp_path):
    args = dict(classes=2, train_per_class=3, val_per_class=2, size=20, seed=7)
    make_synthetic_dataset(tmp_path / "a", **args)
    make_synthetic_dataset(tmp_path / "b", **args)
    make_synthetic_dataset(tmp_path / "c", **{**args, "seed": 8})
    a, b, c = (_hashes(tmp_path / n) for n in "abc")
    assert len(a) == 10 and a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_files_are_the_documented_per_image_draws(tmp_path):
    # Each file is render_image under default_rng([seed, split, family, i]) whatever --classes is, so a
    # 2-class and a 20-class dataset share their images.
    make_synthetic_dataset(tmp_path / "two", classes=2, train_per_class=2, val_per_class=1, size=16, seed=5)
    make_synthetic_dataset(tmp_path / "all", classes=len(FAMILY_NAMES), train_per_class=1, val_per_class=1,
                           size=16, seed=5)
    family = FAMILY_NAMES[1]
    for root in ("two", "all"):
        for split in ("train", "val"):
            expected = encode_jpeg(render_image(family, sample_rng(5, split, family, 0), 16)[0])
            assert (tmp_path / root / split / family / "00000.jpg").read_bytes() == expected


def test_every_family_has_the_same_area():
    # Area fraction = q^2 with q ~ U(a, b): E[q^2] = (b^3 - a^3) / (3 (b - a)), and every image lies in
    # [a^2, b^2]. Equal areas are what make colour class-blind. Tolerances: 4 standard errors of n = 64
    # samples, plus rasterisation: PIL fills the pixels an edge passes through, up to half a 4x pixel along a
    # perimeter of at most 9 unit-area lengths (bars), 0.5 * 9 * b / (64 * 4) = 0.008 of the image at b.
    a, b = AREA_SIDE_RANGE
    expected, n, size = (b**3 - a**3) / (3 * (b - a)), 64, 64
    raster = 0.5 * 9 * b / (size * synthetic.SUPERSAMPLE)
    for f_id, family in enumerate(FAMILY_NAMES):
        areas = np.array([render_alpha(family, np.random.default_rng([11, f_id, i]), size).sum() / size**2
                          for i in range(n)])
        se = areas.std(ddof=1) / np.sqrt(n)
        assert abs(areas.mean() - expected) < 4 * se + raster, (family, areas.mean(), expected)
        assert a**2 - raster < areas.min() and areas.max() < b**2 + raster, family  # each image, not on average


def test_every_family_fits_at_every_rotation():
    # The widest projection of the unit-area shape, at the largest scale and stretch, must fit the side;
    # otherwise some draws would be clipped and lose area (and colour balance) at random.
    angles = np.linspace(0, np.pi, 721)
    directions = np.stack([np.cos(angles), np.sin(angles)], 1)
    for family in FAMILY_NAMES:
        outline = np.concatenate([p for p, additive in synthetic._unit_family(family) if additive])
        width = np.ptp(outline @ directions.T, axis=0).max()
        assert width * AREA_SIDE_RANGE[1] * STRETCH_RANGE[1] <= 1.0, (family, width)


def _nearest_mean_accuracy(train: np.ndarray, val: np.ndarray) -> float:
    """train, val: (classes, samples, features). Features standardised on train."""
    mu, sd = train.reshape(-1, train.shape[-1]).mean(0), train.reshape(-1, train.shape[-1]).std(0)
    means = ((train - mu) / sd).mean(1)
    d = ((((val - mu) / sd)[:, :, None, :] - means[None, None]) ** 2).sum(-1)
    return float((d.argmin(-1) == np.arange(len(train))[:, None]).mean())


def test_mean_colour_carries_no_class_information(colour_data):
    feats = {split: np.array([[load_rgb(str(p)).reshape(-1, 3).mean(0) for p in sorted(
        (colour_data / split / f).glob("*.jpg"))] for f in FAMILY_NAMES[:10]]) for split in ("train", "val")}
    # Foreground and background colours are exchangeable and areas equal, so the per-image mean RGB has the
    # same distribution for every class: any classifier scores 1/C in expectation on the balanced val split.
    # N = 400 val images -> binomial sd sqrt(0.1 * 0.9 / 400) = 0.015; allow 4 sd.
    acc = _nearest_mean_accuracy(feats["train"], feats["val"])
    assert acc < 0.1 + 4 * np.sqrt(0.1 * 0.9 / 400), acc
    # More sensitive: colours, textures and clipping are symmetric about mid-grey, so every class's expected
    # mean is exactly 127.5 per channel. z-scores of 10 classes x 3 channels with n = 80 images each;
    # |z| < 4.5 has a Bonferroni false-alarm bound of 30 * 6.8e-6 = 2e-4 whatever the channel correlation.
    x = np.concatenate([feats["train"], feats["val"]], axis=1)
    z = (x.mean(1) - 127.5) / (x.std(1, ddof=1) / np.sqrt(x.shape[1]))
    assert np.abs(z).max() < 4.5, z


def _hu_invariants(alpha: np.ndarray) -> np.ndarray:
    """log |Hu 1-4|: invariant to translation, scale, rotation and reflection."""
    y, x = np.mgrid[: alpha.shape[0], : alpha.shape[1]].astype(np.float64)
    m00 = alpha.sum()
    xc, yc = (x * alpha).sum() / m00, (y * alpha).sum() / m00

    def eta(p, q):
        return ((x - xc) ** p * (y - yc) ** q * alpha).sum() / m00 ** (1 + (p + q) / 2)

    n20, n02, n11, n30, n03, n21, n12 = (eta(*pq) for pq in [(2, 0), (0, 2), (1, 1), (3, 0), (0, 3), (2, 1), (1, 2)])
    hu = [n20 + n02, (n20 - n02) ** 2 + 4 * n11**2, (n30 - 3 * n12) ** 2 + (3 * n21 - n03) ** 2,
          (n30 + n12) ** 2 + (n21 + n03) ** 2]
    return np.log(np.abs(hu) + 1e-12)


def test_shape_is_the_class_signal():
    # The same nearest-mean classifier that sits at chance on colour separates the classes from the
    # rotation-invariant moments of the drawn shape. Chance is 0.1 with sd 0.017 for N = 300; 0.5 is far
    # outside anything chance gives, and well below the ~0.8 these four moments reach.
    feats = {split: np.array([[_hu_invariants(render_alpha(f, sample_rng(0, split, f, i), 64)) for i in range(30)]
                              for f in FAMILY_NAMES[:10]]) for split in ("train", "val")}
    assert _nearest_mean_accuracy(feats["train"], feats["val"]) > 0.5


@pytest.mark.parametrize("error, raised", [(RuntimeError("bug"), RuntimeError), (KeyboardInterrupt(), KeyboardInterrupt),
                                           (OSError(28, "No space left on device"), UserError)])
def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch, error, raised):
    calls = []

    def failing_encode(rgb):
        calls.append(1)
        if len(calls) == 5:
            raise error
        return encode_jpeg(rgb)

    monkeypatch.setattr(synthetic, "encode_jpeg", failing_encode)
    with pytest.raises(raised):  # an OSError (disk full, permissions) is the user's to fix: one line
        make_synthetic_dataset(tmp_path / "out", classes=2, train_per_class=3, val_per_class=1, size=16)
    assert len(calls) == 5 and list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_or_replaced_only_when_complete(tmp_path, monkeypatch):
    out = tmp_path / "out"
    make_synthetic_dataset(out, classes=2, train_per_class=1, val_per_class=1, size=16, seed=0)
    before = _hashes(out)
    with pytest.raises(UserError, match="not empty"):
        make_synthetic_dataset(out, classes=2, train_per_class=1, val_per_class=1, size=16, seed=1)
    assert _hashes(out) == before

    monkeypatch.setattr(synthetic, "encode_jpeg", lambda rgb: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        make_synthetic_dataset(out, classes=2, train_per_class=1, val_per_class=1, size=16, seed=1, force=True)
    assert _hashes(out) == before and list(tmp_path.iterdir()) == [out]  # the old dataset survives a failure
    monkeypatch.undo()

    make_synthetic_dataset(out, classes=3, train_per_class=1, val_per_class=1, size=16, seed=1, force=True)
    assert _hashes(out) != before and len(_hashes(out)) == 6 and list(tmp_path.iterdir()) == [out]

    (tmp_path / "empty").mkdir()  # an empty folder is as good as none
    make_synthetic_dataset(tmp_path / "empty", classes=2, train_per_class=1, val_per_class=1, size=16)
    assert len(_hashes(tmp_path / "empty")) == 4


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


@pytest.mark.parametrize("foreign, named", [("notes.txt", "notes.txt"), ("papers/a.pdf", "papers"),
                                            ("train/readme.md", "readme.md"), ("val/cat/photo.png", "photo.png")])
def test_force_replaces_only_a_previous_dataset(tmp_path, foreign, named):
    # Oracle: what the generator writes (train/ and val/ class folders of .jpg) plus the Makefile's
    # OUT/.complete is replaceable; one entry it would not have written makes --force refuse and delete nothing.
    out = tmp_path / "out"
    make_synthetic_dataset(out, classes=2, train_per_class=1, val_per_class=1, size=16, seed=0)
    seed0 = _hashes(out)
    (out / ".complete").touch()
    made_folder = not (out / foreign).parent.exists()
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    (out / foreign).write_text("the user's")
    before = _tree(out)
    with pytest.raises(UserError) as e:
        make_synthetic_dataset(out, classes=2, train_per_class=1, val_per_class=1, size=16, seed=1, force=True)
    assert named in str(e.value) and "not a previous synthetic dataset" in str(e.value)
    assert "\n" not in str(e.value)
    assert _tree(out) == before and list(tmp_path.iterdir()) == [out]

    (out / foreign).unlink()
    if made_folder:
        (out / foreign).parent.rmdir()
    make_synthetic_dataset(out, classes=2, train_per_class=1, val_per_class=1, size=16, seed=1, force=True)
    assert sorted(_hashes(out)) == sorted(seed0) and _hashes(out) != seed0  # the seed-1 images, no marker


def test_cli_force_refuses_a_folder_of_the_users(tmp_path):
    (tmp_path / "d" / "drafts").mkdir(parents=True)
    (tmp_path / "d" / "notes.txt").write_text("mine")
    proc = run_tool("tools/make_synthetic.py", str(tmp_path / "d"), "--classes", "2", "--train-per-class", "1",
                    "--val-per-class", "1", "--size", "16", "--force")
    assert_user_error(proc, str(tmp_path / "d"), "drafts", "not a previous synthetic dataset", "train/ and val/")
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine" and (tmp_path / "d" / "drafts").is_dir()


def test_leftovers_of_a_killed_run_are_cleaned_and_a_caught_dataset_returns(tmp_path):
    # SIGKILL skips the clean-up: a half-built .OUT.partial-<pid>, or (killed between --force's two renames) the
    # previous dataset as .OUT.old-<pid> with no OUT. The next run removes the first and restores the second.
    from conftest import dead_pid

    out, gone = tmp_path / "out", dead_pid()
    make_synthetic_dataset(tmp_path / f".out.old-{gone}", classes=2, train_per_class=1, val_per_class=1, size=16)
    before = _hashes(tmp_path / f".out.old-{gone}")
    (tmp_path / f".out.partial-{gone}" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="not empty"):  # the restored dataset is not replaced without --force
        make_synthetic_dataset(out, classes=2, train_per_class=1, val_per_class=1, size=16, seed=1)
    assert _hashes(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("sig, code, message", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                  (signal.SIGINT, 130, "interrupted")])
def test_a_signal_mid_run_leaves_no_partial_folder_and_the_previous_dataset(tmp_path, sig, code, message):
    # Oracle: the tool's contract (OUT whole or untouched, one error line, the exit status the convert tools give)
    # under a scheduler's time limit or Ctrl-C. A real process, signalled while its partial folder fills (each
    # image slowed by 50 ms), with a previous dataset at OUT that --force would replace.
    out = tmp_path / "out"
    make_synthetic_dataset(out, classes=2, train_per_class=1, val_per_class=1, size=16)
    before = _hashes(out)

    def writing() -> bool:
        return any(p.name.startswith(".out.partial-") and any(p.rglob("*.jpg")) for p in tmp_path.iterdir())

    rc, stderr = signal_mid_conversion("make_synthetic.py", "fastssl.data.synthetic:encode_jpeg", writing,
                                       [str(out), "--classes", "2", "--train-per-class", "100", "--size", "16",
                                        "--force"], sig)
    assert rc == code and stderr.strip() == f"error: {message}", stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.partial-<pid>, no .out.old-<pid>
    assert _hashes(out) == before


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(classes=1), "classes=1"), (dict(classes=len(FAMILY_NAMES) + 1), f"[2, {len(FAMILY_NAMES)}]"),
    (dict(train_per_class=0), "train_per_class=0"), (dict(val_per_class=-1), "val_per_class=-1"),
    (dict(size=15), "size=15"), (dict(seed=-1), "seed=-1"),
])
def test_bad_arguments(tmp_path, kwargs, fragment):
    with pytest.raises(UserError, match=fragment.replace("[", r"\[")):
        make_synthetic_dataset(tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_one_line_summary(tmp_path):
    proc = run_tool("tools/make_synthetic.py", str(tmp_path / "d"), "--classes", "2", "--train-per-class", "2",
                    "--val-per-class", "1", "--size", "16", env={"PYTHONPATH": ""})  # runs uninstalled
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().count("\n") == 0 and "4 train + 2 val" in proc.stdout
    assert len(_hashes(tmp_path / "d")) == 6


@pytest.mark.parametrize("args, fragment", [
    (["--classes", "1"], "classes=1"), (["--size", "8"], "size=8"), (["--train-per-class", "0"], "train_per_class=0"),
    (["--classes", "ten"], "invalid int value"),
])
def test_cli_errors(tmp_path, args, fragment):
    proc = run_tool("tools/make_synthetic.py", str(tmp_path / "d"), *args)
    assert proc.returncode == 2
    if fragment != "invalid int value":  # argparse's own usage errors print a usage line first
        assert_user_error(proc, fragment)
        assert proc.stderr.strip().count("\n") == 0
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()


def test_cli_refuses_non_empty_output(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    proc = run_tool("tools/make_synthetic.py", str(tmp_path / "d"), "--classes", "2")
    assert_user_error(proc, str(tmp_path / "d"), "not empty", "--force")
    assert proc.returncode == 2 and (tmp_path / "d" / "keep.txt").read_text() == "mine"
