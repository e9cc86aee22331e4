"""The training loop end to end on a tiny embedded dataset: run directory contents, exact resume, atomic
checkpoints, and the one-line errors a user meets."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from fastssl import checkpoint as ckpt_mod
from fastssl.checkpoint import latest_checkpoint, list_checkpoints
from fastssl.config import load_config
from fastssl.errors import UserError
from fastssl.train import train

from conftest import ROOT, assert_user_error, run_tool

RECIPE = ROOT / "recipes/simclr_resnet18_synthetic.yaml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from fastssl.data.synthetic import make_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic") / "ds"
    make_synthetic_dataset(out, classes=4, train_per_class=10, val_per_class=4, size=32, seed=0)
    return out


def _overrides(data, out, *extra):
    return [f"data.path={data}/train", f"eval.knn_val_path={data}/val", f"output_dir={out}", "data.image_size=32",
            "data.batch_size=8", "data.workers=0", "train.max_steps=4", "train.log_every=1",
            "train.progress=false", "optim.warmup_epochs=0.5", "method.proj_hidden=64", "method.proj_dim=32",
            *extra]


def _cfg(data, out, *extra):
    return load_config(RECIPE, _overrides(data, out, *extra))


def test_cli_run_writes_config_metrics_checkpoint_and_summary(tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = run_tool("tools/train.py", str(RECIPE), *_overrides(tiny_data, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kNN top-1" in proc.stdout and "random init" in proc.stdout
    saved = load_config(out / "config.yaml")
    assert saved == load_config(RECIPE, _overrides(tiny_data, out))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert latest_checkpoint(out).name == "step_00000004"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    for key in ("knn_top1", "knn_top1_random_init"):
        assert 0.0 <= summary[key] <= 100.0


def _state(run_dir):
    return torch.load(latest_checkpoint(run_dir) / "pytorch_model.bin", map_location="cpu", weights_only=True)


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tiny_data, tmp_path):
    # Oracle: the uninterrupted run. The schedule is a function of the step and the views of a batch are
    # seeded by (seed, epoch, step, rank), so stopping after 3 steps and resuming must change nothing.
    extra = ["train.max_steps=5", "eval.knn_val_path="]
    train(_cfg(tiny_data, tmp_path / "full", *extra))
    stopped = train(_cfg(tiny_data, tmp_path / "part", *extra, "train.stop_after_steps=3"))
    assert stopped == {"stopped_at_step": 3}
    assert latest_checkpoint(tmp_path / "part").name == "step_00000003"
    train(_cfg(tiny_data, tmp_path / "part", *extra, f"resume={tmp_path / 'part'}"))
    full, resumed = _state(tmp_path / "full"), _state(tmp_path / "part")
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-6, msg=k)
    steps = [json.loads(x)["step"] for x in (tmp_path / "part/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(_cfg(tiny_data, out, "train.max_steps=4", "train.stop_after_steps=2", "eval.knn_val_path="))
    good = latest_checkpoint(out)
    before = {p.name: p.stat().st_size for p in good.iterdir()}

    real_save = torch.save

    def crash_on_encoder(obj, f, *a, **kw):
        if str(f).endswith(ckpt_mod.ENCODER_FILE):
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt_mod.torch, "save", crash_on_encoder)
    with pytest.raises(OSError, match="simulated"):
        train(_cfg(tiny_data, out, "train.max_steps=4", "eval.knn_val_path=", f"resume={out}"))
    assert latest_checkpoint(out) == good
    assert [p.name for p in list_checkpoints(out)] == [good.name]
    assert {p.name: p.stat().st_size for p in good.iterdir()} == before
    assert not any(p.name.startswith(".tmp") for p in (out / "checkpoints").iterdir())


def test_run_dir_guards(tiny_data, tmp_path):
    out = tmp_path / "run"
    train(_cfg(tiny_data, out, "train.max_steps=2", "eval.knn_val_path="))
    with pytest.raises(UserError, match="already holds a run; pass resume="):
        train(_cfg(tiny_data, out, "train.max_steps=2", "eval.knn_val_path="))
    with pytest.raises(UserError, match=r"different config \(optim.lr: 1.0 -> 0.5\)"):
        train(_cfg(tiny_data, out, "train.max_steps=2", "eval.knn_val_path=", "optim.lr=0.5", f"resume={out}"))
    with pytest.raises(UserError, match="not a fastssl run directory"):
        train(_cfg(tiny_data, out, f"resume={tmp_path}"))
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 1.0  # untouched


def test_bad_inputs_are_one_line_errors_and_write_nothing(tiny_data, tmp_path):
    def run(*extra):
        out = tmp_path / "out"
        proc = run_tool("tools/train.py", str(RECIPE), *_overrides(tiny_data, out), *extra)
        return proc, out

    proc, out = run(f"data.path={tmp_path / 'nope'}")
    assert_user_error(proc, f"data.path '{tmp_path / 'nope'}' does not exist")
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run(f"data.path={empty}")[0], "empty")
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next((tiny_data / "train").rglob("*.jpg")), flat / "a.jpg")
    assert_user_error(run(f"data.path={flat}")[0], "flat")
    assert_user_error(run("eval.knn_val_path=/no/such/val")[0], "/no/such/val")
    assert_user_error(run("model.encoder=resnet9000")[0], "resnet9000", "resnet18")
    assert_user_error(run("data.backend=nosuch")[0], "nosuch", "torch")


def test_corrupt_jpeg_stops_training_naming_the_file(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data / "train", data)
    victim = sorted(data.rglob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    for workers in ("0", "1"):
        proc = run_tool("tools/train.py", str(RECIPE), *_overrides(tiny_data, tmp_path / f"out{workers}"),
                        f"data.path={data}", f"data.workers={workers}", "data.drop_last=false",
                        "train.max_steps=0", "train.epochs=1")
        assert_user_error(proc, victim.name)


def test_a_checkpoint_whose_weights_do_not_fit_its_encoder_says_what_they_are(tmp_path):
    from fastssl.checkpoint import load_encoder
    from fastssl.config import config_to_dict
    from fastssl.encoders import create_encoder

    cfg = load_config(None, ["model.encoder=resnet18", "data.image_size=32", "method.name=simclr"])
    vit = create_encoder(load_config(None, ["model.encoder=vit_tiny"]).model, 32)
    torch.save({"encoder": vit.state_dict(), "config": config_to_dict(cfg), "step": 1}, tmp_path / "encoder.pt")
    with pytest.raises(UserError, match=r"simclr run\) holds ViT \(depth 12, width 192\) weights.*'resnet18'"):
        load_encoder(tmp_path / "encoder.pt")
    torch.save({"encoder.conv1.weight": torch.zeros(1)}, tmp_path / "state.pt")
    with pytest.raises(UserError, match="accelerate's training state"):
        load_encoder(tmp_path / "state.pt")
