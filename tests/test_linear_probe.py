"""The linear probe: separable-by-construction features are classified perfectly, features are computed once
per split, top-k matches a numpy count, and a random-label control stays at chance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fastssl.errors import UserError
from fastssl.eval.linear import LinearProbe, linear_eval, probe_accuracy, topk_accuracy, train_linear_probe


def _separable(n_per_class: int, classes: int, dim: int, seed: int):
    """x = 3 e_y + u, u ~ U[-1, 1]^dim, then one fixed affine map with huge scale and offset.
    Before the map, coordinate y is >= 2 and every other coordinate <= 1, so argmax is a perfect linear rule;
    an invertible affine map keeps it linear. The scale/offset (1e3, 500) is what BN-without-affine absorbs."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = rng.uniform(-1, 1, size=(len(y), dim))
    x[np.arange(len(y)), y] += 3.0
    q, _ = np.linalg.qr(np.random.default_rng(1234).normal(size=(dim, dim)))  # the same map for every split
    x = 1e3 * x @ q + 500.0
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def test_probe_separates_linearly_separable_features():
    tr, tr_y = _separable(40, 10, 24, seed=0)
    va, va_y = _separable(20, 10, 24, seed=1)  # a fresh draw: the rule must generalise, not memorise
    probe = train_linear_probe(tr, tr_y, 10, epochs=60, lr=0.1, batch_size=64)
    res = probe_accuracy(probe, va, va_y)
    # 100% is achievable by construction; ~100% allows at most 2 of the 200 val points near the margin.
    assert res["top1"] >= 99.0 and res["top5"] == 100.0


def test_lars_probe_also_separates():
    tr, tr_y = _separable(40, 5, 16, seed=2)
    # LARS steps are relative (lr x eta x ||w||, eta = 0.001), so its lr is orders larger than SGD's.
    probe = train_linear_probe(tr, tr_y, 5, epochs=40, lr=20.0, batch_size=50, optimizer="lars")
    assert probe_accuracy(probe, tr, tr_y)["top1"] >= 99.0


def test_probe_on_random_labels_is_at_chance_on_fresh_data():
    g = torch.Generator().manual_seed(0)
    tr, tr_y = torch.randn(400, 16, generator=g), torch.randint(0, 4, (400,), generator=g)
    va, va_y = torch.randn(1000, 16, generator=g), torch.randint(0, 4, (1000,), generator=g)
    res = probe_accuracy(train_linear_probe(tr, tr_y, 4, epochs=20, batch_size=64), va, va_y)
    # chance 25%; binomial sd over 1000 is 1.4 points, so 25 +- 7 is 5 sd
    assert 18 < res["top1"] < 32


def test_topk_accuracy_matches_numpy_count():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(300, 8))
    labels = rng.integers(0, 8, 300)
    order = np.argsort(-scores, axis=1)
    want1 = 100 * np.mean(order[:, 0] == labels)
    want5 = 100 * np.mean([labels[i] in order[i, :5] for i in range(300)])
    got = topk_accuracy(torch.tensor(scores), torch.tensor(labels))
    assert got["top1"] == pytest.approx(want1) and got["top5"] == pytest.approx(want5)
    # fewer than 5 classes: top-5 is top-C, always a hit
    assert topk_accuracy(torch.tensor(scores[:, :3]), torch.tensor(labels % 3))["top5"] == 100.0


def test_probe_is_bn_without_affine_then_linear():
    probe = LinearProbe(32, 7, generator=torch.Generator().manual_seed(0))
    bn, fc = probe
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine
    assert fc.out_features == 7 and float(fc.bias.detach().abs().max()) == 0.0
    assert 0.005 < float(fc.weight.detach().std()) < 0.015  # N(0, 0.01): 224 weights, sd of the sd estimate ~5%


def test_bad_probe_settings_are_user_errors():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
    for kwargs, frag in [({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"), ({"optimizer": "adam"}, "adam"),
                         ({"batch_size": 1}, "batch size")]:
        with pytest.raises(UserError, match=frag):
            train_linear_probe(x, y, 2, **kwargs)
    with pytest.raises(UserError, match="the linear probe needs at least 2 training images, got 1"):
        train_linear_probe(x[:1], y[:1], 2)


def _colour_folder(root, colours, per_class: int, seed: int):
    """Solid-colour classes with pixel noise: the mean colour separates them linearly."""
    rng = np.random.default_rng(seed)
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            px = np.clip(np.array(rgb) + rng.normal(0, 20, size=(20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / name / f"{i}.png")
    return root


class _MeanColour(nn.Module):
    """A frozen 'encoder' whose features are the mean colour; counts its forward calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        self.calls += 1
        return x.mean((2, 3)) * self.scale


def test_linear_eval_caches_features_once_and_reaches_100_percent(tmp_path):
    colours = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}
    train = _colour_folder(tmp_path / "train", colours, 6, seed=0)
    val = _colour_folder(tmp_path / "val", colours, 3, seed=1)
    enc = _MeanColour().train()
    res = linear_eval(enc, train, val, 16, batch_size=8, workers=0, epochs=30)
    assert res["top1"] == 100.0 and res["num_train"] == 18 and res["num_val"] == 9 and res["num_features"] == 3
    assert enc.calls == 3 + 2  # ceil(18 / 8) + ceil(9 / 8) batches, once each: not once per probe epoch
    assert enc.training and enc.scale.grad is None  # mode restored, no gradient reached the encoder


def test_linear_eval_rejects_different_classes(tmp_path):
    train = _colour_folder(tmp_path / "train", {"a": (0, 0, 0), "b": (255, 255, 255)}, 2, seed=0)
    val = _colour_folder(tmp_path / "val", {"a": (0, 0, 0), "c": (255, 255, 255)}, 2, seed=0)
    with pytest.raises(UserError, match="same class folders"):
        linear_eval(_MeanColour(), train, val, 16, batch_size=4, workers=0, epochs=1)


@pytest.mark.slow  # two tool runs (one a process importing torch and timm), each a 100-epoch probe
def test_eval_tool_linear_writes_json_for_a_checkpoint_and_its_random_init(tmp_path):
    from conftest import run_tool, save_perturbed_encoder
    from test_knn import _image_folder, _numpy_topk

    from fastssl.config import config_from_dict
    from fastssl.encoders import create_encoder
    from fastssl.eval.features import extract_features
    from tools.eval import main

    # Noisy classes only 5 grey levels apart: the probe is neither at chance nor at 100%, so its figure depends
    # on the encoder's weights.
    _image_folder(tmp_path / "data" / "train", 6, seed=0)
    _image_folder(tmp_path / "data" / "val", 6, seed=1)
    cfg = config_from_dict({"model": {"encoder": "vit_pico"}, "data": {"image_size": 32}, "seed": 5})
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000003"
    # saved weights != the config seed's random init, which --random-init rebuilds
    trained = save_perturbed_encoder(ckpt / "encoder.pt", cfg, 32, step=3)
    torch.manual_seed(cfg.seed)
    untrained = create_encoder(cfg.model, 32)
    ev = cfg.eval

    def oracle(encoder) -> tuple[float, float, float]:
        """Centre-crop features of `encoder`, a probe fitted with the recipe's settings and seed, and top-1 /
        top-5 on val (and top-1 on train) counted in numpy from the probe's scores."""
        feats = {s: extract_features(encoder, str(tmp_path / "data" / s), 32, 256, workers=0)
                 for s in ("train", "val")}
        (tr, tr_y, c), (va, va_y, _) = feats["train"], feats["val"]
        probe = train_linear_probe(tr, tr_y, c, epochs=ev.linear_epochs, lr=ev.linear_lr, batch_size=256,
                                   optimizer=ev.linear_optimizer, weight_decay=ev.linear_weight_decay,
                                   seed=cfg.seed)
        with torch.no_grad():
            val_scores, train_scores = probe(va).double().numpy(), probe(tr).double().numpy()
        for scores in (val_scores, train_scores):  # no image decided by a hair (the tool runs on other threads)
            srt = -np.sort(-scores, axis=1)
            assert np.all(srt[:, 0] - srt[:, 1] > 1e-4 * np.abs(srt).max())
        return (*_numpy_topk(val_scores, va_y.numpy()), _numpy_topk(train_scores, tr_y.numpy())[0])

    args = ["linear", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--device", "cpu",
            "--workers", "0"]
    proc = run_tool("tools/eval.py", *args, "--json", str(tmp_path / "a.json"))  # as a user runs it
    assert proc.returncode == 0, proc.stderr
    assert main([*args, "--random-init", "--json", str(tmp_path / "b.json")]) == 0  # in-process: no second import
    res, rand = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    for r, random_init in ((res, False), (rand, True)):
        assert r["protocol"] == "linear" and r["encoder"] == "vit_pico" and r["random_init"] is random_init
        assert (r["epochs"], r["lr"], r["optimizer"]) == (ev.linear_epochs, ev.linear_lr, ev.linear_optimizer)
        assert r["num_train"] == 24 and r["num_val"] == 24 and r["num_features"] == trained.num_features
    want, want_rand = oracle(trained), oracle(untrained)
    assert (res["top1"], res["top5"], res["train_top1"]) == pytest.approx(want)
    assert (rand["top1"], rand["top5"], rand["train_top1"]) == pytest.approx(want_rand)
    assert want[0] != want_rand[0]  # the two runs read different weights, and the figures show it
    assert 25 < want[0] < 100 and want[1] == 100.0  # a figure a wrong probe could miss; 4 classes: top-5 is all


@pytest.mark.parametrize("extra, fragment", [(["--epochs", "0"], "--epochs 0; expected >= 1"),
                                             (["--lr", "0"], "--lr 0.0; expected > 0"),
                                             (["--epochs", "-2"], "--epochs -2")])
def test_eval_tool_refuses_zero_epochs_and_lr_instead_of_using_the_recipes(extra, fragment, tmp_path, monkeypatch,
                                                                          capsys):
    # `args.epochs or recipe` read --epochs 0 as "not given" and trained the recipe's 100 epochs.
    import fastssl.checkpoint
    from conftest import forbid
    from tools.eval import main

    forbid(monkeypatch, fastssl.checkpoint, "load_encoder", "checkpoint loaded before the options were checked")
    assert main(["linear", "--checkpoint", "ckpt", "--data", str(tmp_path), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
