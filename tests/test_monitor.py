"""The online kNN monitor: its fixed class-balanced subsets, its schedule, its errors, and its figure on an
encoder whose kNN accuracy is known (mean colour of solid-colour classes, two of them swapped in the val
folder: 1/3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch import nn

from fastssl.config import config_from_dict
from fastssl.data.imagefolder import ImageFolderIndex
from fastssl.errors import UserError
from fastssl.eval.monitor import KnnMonitor, balanced_subset


def _index(sizes: list[int]) -> ImageFolderIndex:
    samples = tuple((f"/x/c{c}/{i:03d}.jpg", c) for c, n in enumerate(sizes) for i in range(n))
    return ImageFolderIndex(root=Path("/x"), classes=tuple(f"c{c}" for c in range(len(sizes))),
                            samples=samples)


@pytest.mark.parametrize("sizes,n", [([10, 10, 10], 7), ([50, 3, 20], 30), ([5, 5], 10), ([4, 9], 100)])
def test_balanced_subset_deals_classes_evenly_and_is_fixed_by_seed(sizes, n):
    index = _index(sizes)
    sub = balanced_subset(index, n, seed=3)
    # Oracle: a card dealer going round the classes in order, skipping empty ones, stopping after n cards.
    deals = [c for r in range(max(sizes)) for c, size in enumerate(sizes) if size > r][:n]
    np.testing.assert_array_equal(np.bincount(sub.labels, minlength=len(sizes)),
                                  np.bincount(deals, minlength=len(sizes)))
    positions = [index.samples.index(s) for s in sub.samples]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    assert balanced_subset(index, n, seed=3) == sub
    if n < sum(sizes) and min(sizes) > 1:
        assert any(balanced_subset(index, n, seed=s) != sub for s in range(4, 8))


def _colour_folder(root, per_class: int, seed: int, swap_blue_and_red: bool = False):
    rng = np.random.default_rng(seed)
    colours = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}
    if swap_blue_and_red:
        colours["blue"], colours["red"] = colours["red"], colours["blue"]
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            px = np.clip(np.array(rgb) + rng.normal(0, 20, size=(16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / name / f"{i}.png")
    return str(root)


class _MeanColour(nn.Module):
    def forward(self, x):
        return x.mean((2, 3)) + 3.0  # the offset keeps cosine similarity meaningful after normalisation


def _cfg(train, val, **ev):
    return config_from_dict({"data": {"path": train, "image_size": 16, "workers": 0},
                             "eval": {"knn_val_path": val, "knn_k": 3, "batch_size": 4, **ev}})


def test_monitor_runs_every_n_epochs_on_its_subsets(tmp_path):
    # The val folder's blue and red images carry each other's colour: the mean-colour encoder gets only green
    # right there (top-1 1/3; top-5 too, as k=3 neighbours all vote for the colour's class), where queries
    # from the monitor's own bank would score 100%.
    train = _colour_folder(tmp_path / "train", 6, 0)
    val = _colour_folder(tmp_path / "val", 4, 1, swap_blue_and_red=True)
    mon = KnnMonitor(_cfg(train, val, knn_every_epochs=2, knn_monitor_train_samples=9,
                          knn_monitor_val_samples=6), "cpu")
    assert len(mon.train) == 9 and len(mon.val) == 6
    assert [e for e in range(7) if mon.due(e)] == [2, 4, 6]
    enc = _MeanColour().train()
    assert mon.maybe_run(1, enc) is None
    res = mon.maybe_run(2, enc)
    assert res["knn_top1"] == pytest.approx(100 / 3) and res["knn_top5"] == pytest.approx(100 / 3) and enc.training


def test_monitor_off_by_default_and_bad_settings_are_user_errors(tmp_path):
    train = _colour_folder(tmp_path / "train", 2, 0)
    assert not KnnMonitor(_cfg(train, ""), "cpu").due(5)
    with pytest.raises(UserError, match="knn_val_path"):
        KnnMonitor(_cfg(train, "", knn_every_epochs=1))
    with pytest.raises(UserError, match=r"^eval.knn_every_epochs=-1; expected >= 0 \(0: off\)$"):
        KnnMonitor(_cfg(train, train, knn_every_epochs=-1))
    with pytest.raises(UserError, match=r"^eval.knn_monitor_val_samples=0; expected >= 1$"):
        KnnMonitor(_cfg(train, train, knn_every_epochs=1, knn_monitor_val_samples=0))
    with pytest.raises(UserError, match="does not exist"):
        KnnMonitor(_cfg(train, str(tmp_path / "nope"), knn_every_epochs=1))


def test_monitor_checks_k_temperature_and_classes_before_training(tmp_path):
    # The monitor is built before the first step; a bad k or T would otherwise surface at the first epoch's end.
    train = _colour_folder(tmp_path / "train", 2, 0)
    with pytest.raises(UserError, match=r"^eval.knn_k=0; expected >= 1$"):
        KnnMonitor(_cfg(train, train, knn_every_epochs=1, knn_k=0))
    with pytest.raises(UserError, match=r"^eval.knn_t=-1.0; expected a finite number > 0$"):
        KnnMonitor(_cfg(train, train, knn_every_epochs=1, knn_t=-1.0))
    val = Path(_colour_folder(tmp_path / "val", 2, 1))
    (val / "red").rename(val / "yellow")
    with pytest.raises(UserError, match=r"\[blue, green, yellow\] .* \[blue, green, red\]"):
        KnnMonitor(_cfg(train, str(val), knn_every_epochs=1))
