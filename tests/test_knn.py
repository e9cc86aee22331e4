"""Weighted kNN against a brute-force numpy re-implementation of Wu et al. 2018's vote, down to the figure
that `tools/eval.py knn` reports for a saved checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastssl.errors import UserError
from fastssl.eval.knn import knn_accuracy, knn_predict


def _numpy_knn(train, labels, query, c, k, t):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    out = np.zeros((len(query), c))
    for i, q in enumerate(query):
        sim = train @ q
        nn_idx = np.argsort(-sim, kind="stable")[:k]
        for j in nn_idx:
            out[i, labels[j]] += np.exp(sim[j] / t)
    return out


def test_knn_votes_match_numpy():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 16))
    labels = rng.integers(0, 5, 200)
    query = rng.normal(size=(37, 16))
    got = knn_predict(torch.tensor(train), torch.tensor(labels), torch.tensor(query), 5, k=20, temperature=0.07,
                      chunk=8)
    np.testing.assert_allclose(got.double().numpy(), _numpy_knn(train, labels, query, 5, 20, 0.07), rtol=1e-4)


def test_knn_accuracy_on_clustered_features_is_perfect_and_random_is_near_chance():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, 32)) * 5
    ytr, yva = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    tr = centers[ytr] + rng.normal(size=(400, 32))
    va = centers[yva] + rng.normal(size=(400, 32))
    res = knn_accuracy(torch.tensor(tr), torch.tensor(ytr), torch.tensor(va), torch.tensor(yva), 4)
    assert res["top1"] == 100.0
    noise = knn_accuracy(torch.tensor(rng.normal(size=(400, 32))), torch.tensor(ytr),
                         torch.tensor(rng.normal(size=(400, 32))), torch.tensor(yva), 4)
    # chance is 25%; binomial sd over 400 queries is ~2.2 points, so 25 +- 11 is > 4.5 sd
    assert 14 < noise["top1"] < 36


def _numpy_topk(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    order = np.argsort(-scores, axis=1, kind="stable")
    return 100 * np.mean(order[:, 0] == labels), 100 * np.mean([y in o[:5] for y, o in zip(labels, order)])


def _twelve_clusters(seed: int, n_train: int, n_val: int):
    """12 overlapping Gaussian clusters in 16-d: features (train, val) and labels (train, val)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(12, 16))
    ytr, yva = rng.integers(0, 12, n_train), rng.integers(0, 12, n_val)
    return centers[ytr] + 2.0 * rng.normal(size=(n_train, 16)), centers[yva] + 2.0 * rng.normal(size=(n_val, 16)), \
        ytr, yva


def test_knn_top5_with_twelve_classes_matches_numpy():
    # With <= 5 classes top-5 is always 100%; 12 overlapping clusters make it an informative number.
    tr, va, ytr, yva = _twelve_clusters(2, 600, 150)
    want = _numpy_knn(tr, ytr, va, 12, 100, 0.07)
    # Every query's 5th class has votes and beats the 6th by far more than float32 rounding (1e-4 relative), so
    # the top-5 sets depend neither on precision nor on how ties are broken.
    srt = -np.sort(-want, axis=1)
    assert np.all((srt[:, 4] > 0) & (srt[:, 4] - srt[:, 5] > 1e-4 * srt[:, 4]))
    want1, want5 = _numpy_topk(want, yva)
    res = knn_accuracy(torch.tensor(tr), torch.tensor(ytr), torch.tensor(va), torch.tensor(yva), 12, k=100)
    assert res["top1"] == pytest.approx(want1) and res["top5"] == pytest.approx(want5)
    assert 0 < want1 < want5 < 100  # neither figure is a trivial bound (measured 45.3 and 86.7)


def test_a_class_without_votes_is_never_a_top5_hit():
    # k=3 neighbours vote for at most 3 of 12 classes: the other 9 tie at 0, and counting whichever of them
    # topk lists would add free top-5 hits. Oracle: a query is a top-5 hit exactly when its class got a vote.
    tr, va, ytr, yva = _twelve_clusters(3, 300, 200)
    want = _numpy_knn(tr, ytr, va, 12, 3, 0.07)
    res = knn_accuracy(torch.tensor(tr), torch.tensor(ytr), torch.tensor(va), torch.tensor(yva), 12, k=3)
    voted = want[np.arange(len(yva)), yva] > 0
    assert res["top5"] == pytest.approx(100 * voted.mean())
    assert res["top1"] == pytest.approx(_numpy_topk(want, yva)[0])
    assert 0 < res["top1"] < res["top5"] < 100


def test_k_beyond_the_memory_bank_is_refused_not_shrunk(tmp_path, monkeypatch):
    from fastssl.eval import features
    from fastssl.eval.knn import knn_eval

    _image_folder(tmp_path / "train", 1, seed=0)  # 4 images
    _image_folder(tmp_path / "val", 1, seed=1)
    monkeypatch.setattr(features, "extract_features", _no_features)
    with pytest.raises(UserError, match=r"kNN k=20 \(--k / eval.knn_k\) is more than the 4 images of the memory "
                                        r"bank .*train; expected k <= 4"):
        knn_eval(None, str(tmp_path / "train"), str(tmp_path / "val"), 32)


def _image_folder(root, per_class: int, seed: int):
    """Four classes of 32 px JPEGs: grey noise (sd 60) around a class colour only 5 levels off grey, so kNN is
    neither at chance nor at 100% and its figure depends on the encoder's weights."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, shift in enumerate([(1, -1, 0), (-1, 1, 0), (0, -1, 1), (1, 1, -1)]):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            px = np.clip(128 + 5 * np.array(shift) + rng.normal(0, 60, size=(32, 32, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(root / f"c{c}" / f"{i}.jpg")


def test_eval_tool_knn_matches_an_independent_knn_of_the_saved_weights(tmp_path, capsys):
    from conftest import run_tool, save_perturbed_encoder

    from fastssl.config import config_from_dict
    from fastssl.encoders import create_encoder
    from fastssl.eval.features import extract_features
    from tools.eval import main

    _image_folder(tmp_path / "data" / "train", 6, seed=0)
    _image_folder(tmp_path / "data" / "val", 6, seed=1)
    cfg = config_from_dict({"model": {"encoder": "vit_pico"}, "data": {"image_size": 32}, "seed": 5})
    # saved weights != the config seed's random init, which --random-init rebuilds
    trained = save_perturbed_encoder(tmp_path / "run/checkpoints/step_00000004/encoder.pt", cfg, 32, step=4)
    torch.manual_seed(cfg.seed)
    untrained = create_encoder(cfg.model, 32)

    def oracle_top1(encoder) -> float:
        """Centre-crop features of `encoder`, then the numpy weighted kNN (k=5, T=0.07) above."""
        tr, tr_y, _ = extract_features(encoder, str(tmp_path / "data" / "train"), 32, 8, workers=0)
        va, va_y, _ = extract_features(encoder, str(tmp_path / "data" / "val"), 32, 8, workers=0)
        scores = _numpy_knn(tr.double().numpy(), tr_y.numpy(), va.double().numpy(), 4, 5, 0.07)
        srt = -np.sort(-scores, axis=1)  # no query decided by a hair (the tool ran with other thread counts)
        assert np.all(srt[:, 0] - srt[:, 1] > 1e-4 * srt[:, 0])
        return _numpy_topk(scores, va_y.numpy())[0]

    args = ["knn", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--k", "5",
            "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    proc = run_tool("tools/eval.py", *args, "--json", str(tmp_path / "a.json"))  # as a user runs it
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "a.json").read_text())
    assert res["protocol"] == "knn" and res["encoder"] == "vit_pico" and res["random_init"] is False
    assert res["k"] == 5 and res["temperature"] == 0.07  # what the figure depends on
    assert main([*args, "--random-init", "--json", str(tmp_path / "b.json")]) == 0  # in-process: no second import
    rand = json.loads((tmp_path / "b.json").read_text())
    assert rand["random_init"] is True
    want, want_rand = oracle_top1(trained), oracle_top1(untrained)
    assert res["top1"] == pytest.approx(want) and rand["top1"] == pytest.approx(want_rand)
    assert want != want_rand  # the two runs read different weights, and the figures show it

    capsys.readouterr()
    for splits in ([], ["--train", str(tmp_path / "data" / "train")]):  # no --data, and --train without --val
        assert main(["knn", "--checkpoint", str(tmp_path / "run"), *splits]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pass --data IMAGEFOLDER" in err[0] and "--val" in err[0], err


# --- user errors, before any feature is extracted -------------------------------------------------------------

def _no_features(*args, **kwargs):
    raise AssertionError("features extracted before the settings were checked")


@pytest.mark.parametrize("kw, fragment", [({"k": 0}, "k (--k / eval.knn_k) 0"), ({"k": -3}, "-3"),
                                         ({"temperature": 0.0}, "temperature (--temperature / eval.knn_t) 0.0"),
                                         ({"temperature": float("nan")}, "nan")])
def test_knn_eval_refuses_bad_k_and_temperature_up_front(kw, fragment, monkeypatch):
    from fastssl.eval import features
    from fastssl.eval.knn import knn_eval

    monkeypatch.setattr(features, "extract_features", _no_features)
    with pytest.raises(UserError) as e:
        knn_eval(None, "/nonexistent/train", "/nonexistent/val", 32, **kw)  # the trainer's call, eval.knn_k/_t
    assert fragment in str(e.value)


def test_knn_eval_refuses_folders_with_different_classes(tmp_path, monkeypatch):
    from fastssl.eval import features
    from fastssl.eval.knn import knn_eval

    _image_folder(tmp_path / "train", 1, seed=0)  # c0..c3
    _image_folder(tmp_path / "val", 1, seed=1)
    (tmp_path / "val" / "c3").rename(tmp_path / "val" / "other")
    monkeypatch.setattr(features, "extract_features", _no_features)
    with pytest.raises(UserError) as e:
        knn_eval(None, str(tmp_path / "train"), str(tmp_path / "val"), 32)
    msg = str(e.value)
    assert "[c0, c1, c2, other]" in msg and "[c0, c1, c2, c3]" in msg and "same class folders" in msg


@pytest.mark.parametrize("extra, fragment", [
    (["--k", "-3"], "--k / eval.knn_k) -3"),
    (["--temperature", "0"], "(--temperature / eval.knn_t) 0.0"),
    (["--device", "banana"], "--device 'banana'; expected auto, cpu or cuda"),
    (["--device", "cuda"], "--device cuda but torch sees no CUDA GPU"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--json", "/proc/knn.json"], "--json '/proc/knn.json'"),
    (["--json", "FOLDER"], "is a folder"),
])
def test_eval_tool_checks_options_before_loading_the_checkpoint(extra, fragment, tmp_path, monkeypatch, capsys):
    import fastssl.checkpoint
    from conftest import forbid
    from tools.eval import main

    forbid(monkeypatch, fastssl.checkpoint, "load_encoder", "checkpoint loaded before the options were checked")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    extra = [str(tmp_path) if a == "FOLDER" else a for a in extra]
    assert main(["knn", "--checkpoint", "ckpt", "--data", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
