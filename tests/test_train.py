"""The training loop end to end on a tiny embedded dataset: run directory contents, exact resume, atomic
checkpoints, and the one-line errors a user meets."""

from __future__ import annotations

import json
import math
import shlex
import shutil
import signal

import numpy as np
import pytest
import torch
import yaml

from fastssl import checkpoint as ckpt_mod
from fastssl.checkpoint import latest_checkpoint, list_checkpoints, load_encoder_checkpoint
from fastssl.config import load_config
from fastssl.data.shards import convert_image_folder
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


def _cfg(data, out, *extra, recipe=RECIPE):
    return load_config(recipe, _overrides(data, out, *extra))


def test_an_accelerate_dynamo_backend_is_set_aside_with_a_note():
    # `accelerate config` can set a dynamo backend (ACCELERATE_DYNAMO_BACKEND under `accelerate launch`):
    # accelerate would then torch.compile the whole method in prepare(), beside model.compile's networks.
    code = "from fastssl.step import make_accelerator; print(make_accelerator().state.dynamo_plugin.backend.value)"
    proc = run_tool("-c", code, env={"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["NO"]
    assert "dynamo_backend=INDUCTOR is not used; fastssl compiles with model.compile and data.compile" in proc.stderr


def test_an_accelerate_mixed_precision_that_is_not_given_says_so():
    # `accelerate launch --mixed_precision fp16` (or its config) sets ACCELERATE_MIXED_PRECISION; train.precision
    # decides, and a run that does not get what the launcher asked for is told.
    code = "from fastssl.step import make_accelerator; print(make_accelerator('fp32', 'cpu').mixed_precision)"
    proc = run_tool("-c", code, env={"ACCELERATE_MIXED_PRECISION": "fp16"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["no"]
    assert "note: the accelerate config's mixed_precision=fp16 is not used; train.precision=fp32 decides (no here)" \
        in proc.stderr
    quiet = run_tool("-c", code, env={"ACCELERATE_MIXED_PRECISION": "no"})
    assert quiet.returncode == 0 and "note:" not in quiet.stderr


def test_cli_run_writes_config_metrics_checkpoint_and_summary(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = [*_overrides(tiny_data, out), "train.precision=bf16"]
    proc = run_tool("tools/train.py", str(RECIPE), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kNN top-1" in proc.stdout and "random init" in proc.stdout
    if not torch.cuda.is_available():  # asked for, and not given in silence
        assert "precision no;" in proc.stdout
        assert "note: train.precision=bf16 runs in fp32 here: mixed precision is for CUDA GPUs" in proc.stdout
    # The global-batch arithmetic is printed at start even with train.progress=false (per-step lines off).
    assert "global batch 8 = 1 process(es) x 8; peak lr 0.03125 (1.0 x linear scaling)" in proc.stdout
    assert "device cpu; torch.compile: networks no, views no\n" in proc.stdout  # auto: on CUDA only
    assert "\nstep 1 " not in proc.stdout
    saved = load_config(out / "config.yaml")
    assert saved == load_config(RECIPE, args)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in rows)
    # The schedule as logged, written out: peak = 1.0 x 8 / 256 (linear scaling); 40 images in batches of 8 =
    # 5 steps an epoch, 0.5 epoch of warmup = round(2.5) = 2 steps rising to the peak, then the half cosine to 0
    # over the remaining 2 steps (the lr of step s is logged with step s + 1). That the optimiser steps with
    # these values is checked by test_one_process_stops_after_the_step_the_signal_came_in.
    peak = 1.0 * 8 / 256
    expected = [peak / 2, peak, peak, 0.5 * peak * (1 + math.cos(math.pi / 2))]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12)
    assert latest_checkpoint(out).name == "step_00000004"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    # Images over seconds of the logged windows after the first (one step of 8 images each), not their mean rate.
    assert summary["images_per_s"] == pytest.approx(8 * 3 / sum(8 / r["images_per_s"] for r in rows[1:]), rel=1e-9)
    # The printed figures are the trained and the random-init encoder's: recomputed here by the numpy weighted
    # kNN (k=20, T=0.07) over each encoder's centre-crop features.
    from fastssl.checkpoint import load_encoder
    from fastssl.eval.features import extract_features
    from test_knn import _numpy_knn, _numpy_topk

    def numpy_knn(random_init: bool) -> tuple[float, float]:
        encoder, _ = load_encoder(out, random_init=random_init)
        tr, tr_y, c = extract_features(encoder, str(tiny_data / "train"), 32, 8, workers=0)
        va, va_y, _ = extract_features(encoder, str(tiny_data / "val"), 32, 8, workers=0)
        scores = _numpy_knn(tr.double().numpy(), tr_y.numpy(), va.double().numpy(), c, 20, 0.07)
        srt = -np.sort(-scores, axis=1)  # no query decided by a hair: the trainer extracted in another process
        assert np.all(srt[:, 0] - srt[:, 1] > 1e-4 * srt[:, 0])
        return _numpy_topk(scores, va_y.numpy())

    trained, random = numpy_knn(False), numpy_knn(True)
    assert (summary["knn_top1"], summary["knn_top5"]) == pytest.approx(trained)
    assert (summary["knn_top1_random_init"], summary["knn_top5_random_init"]) == pytest.approx(random)


def test_throughput_is_images_over_seconds_not_the_mean_of_window_rates():
    from fastssl.metrics import images_per_s, logged_windows

    # Windows of 8 images in 1 s (start-up, skipped), 1 s and 3 s: 16 images in 4 s. The mean of the two
    # rates, (8 + 8/3) / 2, would say 5.33.
    assert images_per_s([(8, 1.0), (8, 1.0), (8, 3.0)]) == pytest.approx(4.0)
    assert images_per_s([(8, 2.0)]) == pytest.approx(4.0) and images_per_s([]) == 0.0
    records = [{"step": 2, "images_per_s": 16.0}, {"step": 2, "knn_top1": 1.0}, {"step": 3, "images_per_s": 2.0}]
    assert logged_windows(records, 8) == [(16, 1.0), (8, 4.0)]


def test_only_the_main_process_shows_progress_even_on_a_terminal(monkeypatch):
    # An interactive `accelerate launch` gives every process the terminal: one bar, one set of messages.
    import io
    import sys

    from fastssl.metrics import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    other = Progress(10, 0, enabled=True, main=False)
    other.print("from rank 1")
    assert other._bar is None and sys.stdout.getvalue() == ""
    main = Progress(10, 0, enabled=True, main=True)
    assert main._bar is not None
    main.close()


def _state(run_dir):
    return torch.load(latest_checkpoint(run_dir) / "pytorch_model.bin", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("recipe, method_extra", [
    (RECIPE, []),
    # MoCo v2 draws its shuffle-BN order from torch's generator, which the resumed run must find in the same
    # state: a data loader that drew from it when its iterator started (once more on resume) put it out of step.
    (ROOT / "recipes/mocov2_resnet18_synthetic.yaml", ["method.queue_size=16", "data.workers=1"]),
    # MoCo v3's momentum follows the step (its schedule lives outside the checkpoint): the first resumed step
    # must log the uninterrupted run's value, not the schedule's start.
    (ROOT / "recipes/mocov3_resnet18_synthetic.yaml", ["method.pred_hidden=64"]),
], ids=["simclr", "mocov2", "mocov3"])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tiny_data, tmp_path, recipe, method_extra):
    # Oracle: the uninterrupted run. The schedule is a function of the step and the views of a batch are
    # seeded by (seed, epoch, step, rank), so stopping after 3 steps and resuming must change nothing.
    extra = ["train.max_steps=5", "eval.knn_val_path=", *method_extra]
    train(_cfg(tiny_data, tmp_path / "full", *extra, recipe=recipe))
    stopped = train(_cfg(tiny_data, tmp_path / "part", *extra, "train.stop_after_steps=3", recipe=recipe))
    assert stopped == {"stopped_at_step": 3}
    assert latest_checkpoint(tmp_path / "part").name == "step_00000003"
    # A crash after the step-3 checkpoint: steps 4 and 5 logged (step 5 cut short). The resumed run logs
    # them again; the log keeps one record per step and only whole lines.
    with open(tmp_path / "part/metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.0}\n{"step": 5, "lo')
    train(_cfg(tiny_data, tmp_path / "part", *extra, f"resume={tmp_path / 'part'}", recipe=recipe))
    # The run's config.yaml describes the run, not how it was last launched: a new run made from it starts anew.
    assert load_config(tmp_path / "part/config.yaml").resume == ""
    assert load_encoder_checkpoint(tmp_path / "part")["config"]["resume"] == ""  # nor does encoder.pt's copy
    full, resumed = _state(tmp_path / "full"), _state(tmp_path / "part")
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-6, msg=k)
    records = {d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
               for d in ("full", "part")}
    assert [r["step"] for r in records["part"]] == [1, 2, 3, 4, 5]
    for a, b in zip(records["full"], records["part"]):
        assert a.keys() == b.keys()
        for k in a.keys() - {"images_per_s"}:
            assert b[k] == pytest.approx(a[k], rel=1e-5), (a["step"], k)


def test_weights_that_diverge_between_logged_losses_never_replace_a_good_checkpoint(tiny_data, tmp_path,
                                                                                       monkeypatch):
    """The loss is checked on logging steps only (it costs a sync); weights that turn NaN in between must still
    not be checkpointed: with keep_checkpoints=1, a NaN checkpoint would delete the last good one."""
    import fastssl.train as train_mod

    real_step, calls = train_mod.optimizer_step, []

    def diverging_step(method, *args, **kwargs):
        out = real_step(method, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the third step blows up a projector weight (as an lr far too high would); the
            # fourth step's backward carries the NaN into the encoder
            with torch.no_grad():
                next(p for n, p in method.named_parameters() if "projector" in n).fill_(float("nan"))
        return out

    monkeypatch.setattr(train_mod, "optimizer_step", diverging_step)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"^encoder\.\S+ is not finite at step 4: training diverged, so no "
                                        r"checkpoint is written and the earlier ones are kept"):
        train(_cfg(tiny_data, out, "train.max_steps=6", "train.log_every=100", "train.checkpoint_every=2",
                   "train.keep_checkpoints=1", "eval.knn_val_path="))
    assert [c.name for c in list_checkpoints(out)] == ["step_00000002"]
    assert all(torch.isfinite(v).all() for v in _state(out).values() if v.is_floating_point())


def test_gradient_accumulation_steps_on_the_mean_of_the_micro_batch_losses():
    # Oracle: k micro-batches give the gradient of (1/k) sum_i L(micro-batch i), here one backward of that sum
    # over slices taken by hand, on a copy of the method; the step reports that mean as its loss.
    import copy

    from accelerate import Accelerator

    from fastssl.config import config_from_dict
    from fastssl.methods import build_method
    from fastssl.step import forward_backward
    from pipelines.base import ViewBatch

    torch.manual_seed(0)
    cfg = config_from_dict(dict(data=dict(batch_size=8, image_size=16), model=dict(encoder="resnet18",
                                small_input=True), method=dict(name="simclr", proj_hidden=16, proj_dim=8)))
    method = build_method(cfg)
    ref = copy.deepcopy(method)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
    batch = ViewBatch(tuple(views), torch.zeros(8, dtype=torch.long), torch.arange(8))
    out = forward_backward(method, Accelerator(cpu=True), batch, grad_accum=2)
    losses = [ref(ViewBatch((views[0][i:i + 4], views[1][i:i + 4]), torch.zeros(4, dtype=torch.long),
                            torch.arange(i, i + 4))).loss for i in (0, 4)]
    (sum(losses) / 2).backward()
    torch.testing.assert_close(out.loss, (sum(losses) / 2).detach())
    for (name, p), q in zip(method.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert abs(losses[0].item() - losses[1].item()) > 1e-3  # a last-micro-batch loss would not pass


def test_training_guards(tiny_data, tmp_path, monkeypatch):
    from fastssl import train as train_mod
    from fastssl.methods.base import LossOutput

    with pytest.raises(UserError, match="train.grad_accum=2 changes the negatives"):
        train(_cfg(tiny_data, tmp_path / "a", "train.grad_accum=2", "eval.knn_val_path="))
    with pytest.raises(UserError, match=r"data.batch_size=8 .* train.grad_accum=3"):
        train(_cfg(tiny_data, tmp_path / "b", "train.grad_accum=3", "train.allow_grad_accum=true",
                   "eval.knn_val_path="))
    monkeypatch.setattr(train_mod, "optimizer_step", lambda *a: LossOutput(torch.tensor(float("nan"))))
    with pytest.raises(UserError, match="loss is nan at step 1"):
        train(_cfg(tiny_data, tmp_path / "c", "eval.knn_val_path="))


def test_allowed_grad_accum_says_what_it_changes(tiny_data, tmp_path, capsys):
    train(_cfg(tiny_data, tmp_path / "run", "train.grad_accum=2", "train.allow_grad_accum=true", "train.max_steps=1",
               "eval.knn_val_path="))
    out = capsys.readouterr().out
    assert "global batch 8 = 1 process(es) x 8 in 2 micro-batches of 4" in out, out
    assert "warning: gradient accumulation changes the loss: each micro-batch's negatives are only its own " \
           "samples, not the global batch" in out, out


def test_every_way_out_of_training_tears_the_process_groups_down(tiny_data, tmp_path, monkeypatch):
    # Every return path of train() goes through leave_together once (barrier, then the groups' teardown):
    # a 2-process CPU run that exited with its gloo groups alive aborted at exit now and then (SIGABRT after a
    # good run). The real teardown runs in tests/test_distributed.py's 2-process runs.
    from fastssl import train as train_mod

    calls = []
    monkeypatch.setattr(train_mod, "leave_together", lambda: calls.append(1))
    out = tmp_path / "run"
    ways = [("train.stop_after_steps=2",),  # stopped, asked for
            ("train.stop_after_steps=2", f"resume={out}"),  # already there: nothing to do
            (f"resume={out}",),  # to the end
            (f"resume={out}",)]  # finished before: nothing to do
    for i, extra in enumerate(ways, 1):
        train(_cfg(tiny_data, out, "eval.knn_val_path=", *extra))
        assert len(calls) == i, extra


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
    with pytest.raises(UserError, match=r"disk full \(simulated\); the last complete checkpoint is step_00000002"):
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
        train(_cfg(tiny_data, tmp_path, f"resume={tmp_path}"))
    # A new output_dir beside resume= (e.g. a run's config.yaml reused for a new run) must not extend the old run.
    with pytest.raises(UserError, match=r"continues the run in that folder, but output_dir=.*new.* names another"):
        train(_cfg(tiny_data, tmp_path / "new", "train.max_steps=2", "eval.knn_val_path=", f"resume={out}"))
    assert not (tmp_path / "new").exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 1.0  # untouched


def test_a_knn_k_beyond_the_memory_bank_is_refused_before_training(tiny_data, tmp_path):
    # 40 training images: the final evaluation would refuse k=41 only after the whole run.
    with pytest.raises(UserError, match=r"kNN k=41 .* more than the 40 images of the memory bank"):
        train(_cfg(tiny_data, tmp_path / "run", "eval.knn_k=41"))
    assert not (tmp_path / "run").exists()


def test_a_folder_with_someone_elses_config_yaml_is_not_taken_for_a_run(tiny_data, tmp_path):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: precious\n")
    (mine / "metrics.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(UserError, match=r"is not empty \(config.yaml, metrics.jsonl\) and holds no fastssl run"):
        train(_cfg(tiny_data, mine, "train.max_steps=2", "eval.knn_val_path="))
    assert (mine / "config.yaml").read_text() == "my: precious\n"
    assert (mine / "metrics.jsonl").read_text() == '{"x": 1}\n'


def test_a_run_stopped_before_its_first_checkpoint_starts_again_in_place(tiny_data, tmp_path, monkeypatch):
    from fastssl import train as train_mod

    out = tmp_path / "run"

    def crash(*a):
        raise KeyboardInterrupt  # the user's Ctrl-C during the first step

    with monkeypatch.context() as m:
        m.setattr(train_mod, "optimizer_step", crash)
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(tiny_data, out, "train.max_steps=2", "eval.knn_val_path="))
    assert (out / "config.yaml").is_file() and latest_checkpoint(out) is None
    with pytest.raises(UserError, match="holds no checkpoint yet; start it again without resume"):
        train(_cfg(tiny_data, out, "train.max_steps=2", "eval.knn_val_path=", f"resume={out}"))
    train(_cfg(tiny_data, out, "train.max_steps=2", "eval.knn_val_path="))  # neither refused nor appended to
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(UserError, match="already holds a run"):  # a run with a checkpoint is never restarted
        train(_cfg(tiny_data, out, "train.max_steps=2", "eval.knn_val_path="))


def test_resuming_on_a_dataset_that_changed_size_is_refused(tiny_data, tmp_path):
    # 40 images in batches of 8: 5 steps an epoch. 8 more make 6, which would move every later lr and batch.
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    extra = ["train.epochs=2", "train.max_steps=0", "eval.knn_val_path="]
    train(_cfg(data, tmp_path / "run", *extra, "train.stop_after_steps=3"))
    for i, src in enumerate(sorted((data / "train").rglob("*.jpg"))[:8]):
        shutil.copy(src, src.with_name(f"extra{i}.jpg"))
    with pytest.raises(UserError, match=r"the data now gives 6 steps per epoch \(12 in all\) where the run had "
                                        r"5 \(10\)"):
        train(_cfg(data, tmp_path / "run", *extra, f"resume={tmp_path / 'run'}"))


def test_resuming_a_finished_run_changes_nothing(tiny_data, tmp_path):
    out = tmp_path / "run"
    first = train(_cfg(tiny_data, out, "train.max_steps=2", "eval.knn_val_path="))
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    again = train(_cfg(tiny_data, out, "train.max_steps=2", "eval.knn_val_path=", f"resume={out}"))
    assert again == first
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == files


def test_a_run_killed_during_its_final_evaluation_is_completed_by_resume(tiny_data, tmp_path, monkeypatch):
    import fastssl.eval.knn

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(fastssl.eval.knn, "knn_eval", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            train(_cfg(tiny_data, out, "train.max_steps=2"))
    assert latest_checkpoint(out).name == "step_00000002" and not (out / "summary.json").exists()
    ckpt = {p: p.stat().st_mtime_ns for p in latest_checkpoint(out).iterdir()}
    summary = train(_cfg(tiny_data, out, "train.max_steps=2", f"resume={out}"))
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["steps"] == 2 and 0 <= summary["knn_top1"] <= 100 and summary["images_per_s"] > 0
    assert {p: p.stat().st_mtime_ns for p in latest_checkpoint(out).iterdir()} == ckpt  # not trained or saved again


def test_the_command_a_stopped_run_prints_continues_it_to_the_end(tiny_data, tmp_path):
    """What a user reads after train.stop_after_steps (a preemption drill) must be a command that works: the
    saved config.yaml still holds stop_after_steps, so resuming with it alone changes nothing and says why."""
    out = tmp_path / "run"
    proc = run_tool("tools/train.py", str(RECIPE), *_overrides(tiny_data, out), "train.stop_after_steps=2",
                    "eval.knn_val_path=")
    assert proc.returncode == 0, proc.stderr[-3000:]
    command = shlex.split(proc.stdout.split("`")[1])
    assert command[:2] == ["python", "tools/train.py"]
    resume = ("tools/train.py", str(out / "config.yaml"), f"resume={out}")
    same = run_tool(*resume)
    assert same.returncode == 0 and latest_checkpoint(out).name == "step_00000002"
    assert (f"{out} is already at step 2 of 4 (train.stop_after_steps=2); add train.stop_after_steps=0 to run to "
            f"the end\n") in same.stdout
    ended = run_tool(*command[1:])
    assert ended.returncode == 0, ended.stderr[-3000:]
    assert latest_checkpoint(out).name == "step_00000004" and (out / "summary.json").is_file()
    again = run_tool(*resume, "train.stop_after_steps=0")
    assert again.returncode == 0 and f"{out} is already at step 4 of 4; nothing to do\n" in again.stdout


def test_sigterm_to_the_whole_job_checkpoints_and_resume_ends_like_an_uninterrupted_run(tiny_data, tmp_path):
    """A cluster's preemption: SIGTERM to every process of the job (trainer and DataLoader workers alike), then
    SIGKILL after a grace period. The trainer stops at the next step with a checkpoint and exits 143 (128 +
    SIGTERM, so that `train && eval` stops there); the command it prints continues to the end, where the
    uninterrupted run ends."""
    import os
    import subprocess
    import sys
    import time

    steps = ["train.max_steps=30", "eval.knn_val_path=", "data.workers=1"]
    full_run = run_tool("tools/train.py", str(RECIPE), *_overrides(tiny_data, tmp_path / "full"), *steps)
    assert full_run.returncode == 0, full_run.stderr[-3000:]  # same threads as the runs below: same floats
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "tools/train.py"), str(RECIPE), *_overrides(tiny_data, out), *steps]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a job's
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and proc.poll() is None:
        assert time.time() < deadline, "no third step within 300 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped = int(latest_checkpoint(out).name.split("_")[1])
    assert 3 <= stopped < 30
    assert (f"SIGTERM received: stopped at step {stopped} of 30, checkpoint written; continue with `python "
            f"tools/train.py {out / 'config.yaml'} resume={out}`") in stdout
    assert not (out / "summary.json").exists()
    command = shlex.split(stdout.split("`")[1])
    ended = run_tool(*command[1:])
    assert ended.returncode == 0, ended.stderr[-3000:]
    full, resumed = _state(tmp_path / "full"), _state(out)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-6, msg=k)
    at_stop = torch.load(out / f"checkpoints/step_{stopped:08d}/pytorch_model.bin", weights_only=True)
    assert max((at_stop[k] - v).abs().max().item() for k, v in full.items() if v.is_floating_point()) > 1e-3


def _signal_during_step(monkeypatch, step: int, sig: signal.Signals) -> list[list[float]]:
    """The trainer's process gets `sig` while it runs step `step` (1-based), as a cluster's signal would.
    Returns the list that each step appends its optimiser's param-group lrs to (what the step applies)."""
    import os

    import fastssl.train as train_mod

    real_step, calls = train_mod.optimizer_step, []

    def signalling_step(method, optimizer, *args, **kwargs):
        calls.append([g["lr"] for g in optimizer.param_groups])
        if len(calls) == step:
            os.kill(os.getpid(), sig)
        return real_step(method, optimizer, *args, **kwargs)

    monkeypatch.setattr(train_mod, "optimizer_step", signalling_step)
    return calls


def test_one_process_stops_after_the_step_the_signal_came_in(tiny_data, tmp_path, monkeypatch):
    # One process has nobody to agree with: it checks after every step, not every AGREE_EVERY steps.
    applied = _signal_during_step(monkeypatch, 7, signal.SIGUSR1)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    out = tmp_path / "run"
    result = train(_cfg(tiny_data, out, "train.max_steps=12", "train.log_every=5", "optim.min_lr=0.002"))
    assert result == {"stopped_at_step": 7, "signal": "SIGUSR1"}
    # The lr each optimiser step used (every param group), against warmup + cosine written out: peak = 1.0 x
    # 8 / 256 (linear scaling); 5 steps an epoch, so 0.5 epoch of warmup = round(2.5) = 2 steps rising linearly
    # to the peak, then the half cosine from the peak to min_lr over the remaining 10 of 12 steps.
    peak, min_lr = 1.0 * 8 / 256, 0.002
    expected = [peak * (s + 1) / 2 if s < 2 else
                min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * (s - 2) / 10)) for s in range(7)]
    assert len(applied[0]) == 2  # LARS: decayed weights, and biases and norms
    assert applied == [[pytest.approx(e, rel=1e-12)] * 2 for e in expected]
    assert latest_checkpoint(out).name == "step_00000007" and not (out / "summary.json").exists()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before  # handlers put back


def test_ctrl_c_says_which_checkpoint_is_kept_and_how_to_continue(tiny_data, tmp_path, monkeypatch, capsys):
    import fastssl.train as train_mod

    real_step, calls = train_mod.optimizer_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as Python raises it for Ctrl-C
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "optimizer_step", interrupted_step)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_data, out, "train.max_steps=8", "train.checkpoint_every=3", "eval.knn_val_path="))
    assert (f"interrupted after step 4; the last checkpoint is step_00000003; continue with `python tools/train.py "
            f"{out / 'config.yaml'} resume={out}`\n") in capsys.readouterr().out
    assert latest_checkpoint(out).name == "step_00000003"


@pytest.mark.parametrize("knn", [True, False])
def test_a_signal_in_the_last_step_leaves_only_the_final_evaluation(knn, tiny_data, tmp_path, monkeypatch):
    """The final kNN reads the whole train set (minutes on ImageNet, beyond a grace period): a signal in the last
    step stops before it, and the resume runs it. Without a kNN evaluation the run simply ends."""
    _signal_during_step(monkeypatch, 4, signal.SIGTERM)
    out = tmp_path / "run"
    extra = () if knn else ("eval.knn_val_path=",)
    result = train(_cfg(tiny_data, out, *extra))
    assert latest_checkpoint(out).name == "step_00000004"
    if not knn:
        assert result["steps"] == 4 and (out / "summary.json").is_file()
        return
    assert result == {"stopped_at_step": 4, "signal": "SIGTERM"} and not (out / "summary.json").exists()
    monkeypatch.undo()
    summary = train(_cfg(tiny_data, out, *extra, f"resume={out}"))
    assert summary["steps"] == 4 and "knn_top1" in summary and (out / "summary.json").is_file()


@pytest.mark.parametrize("damaged", ["pytorch_model.bin", "random_states_0.pkl"])
def test_resuming_from_a_damaged_checkpoint_is_one_line_naming_it(tiny_data, tmp_path, damaged):
    # random_states_0.pkl: accelerate would skip it with a log line and resume with other random draws.
    out = tmp_path / "run"
    train(_cfg(tiny_data, out, "train.max_steps=4", "train.stop_after_steps=2", "eval.knn_val_path="))
    ckpt = latest_checkpoint(out)
    part = ckpt / damaged
    part.write_bytes(part.read_bytes()[:len(part.read_bytes()) // 2])
    proc = run_tool("tools/train.py", str(RECIPE), *_overrides(tiny_data, out), "train.max_steps=4",
                    "eval.knn_val_path=", f"resume={out}")
    assert_user_error(proc, f"cannot resume from '{ckpt}'", "remove that step folder")


def test_paths_that_cannot_work_fail_before_training(tiny_data, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match=f"output_dir '{afile}/run': '{afile}' is a file, not a folder"):
        train(_cfg(tiny_data, afile / "run"))
    with pytest.raises(UserError, match="data.path is empty"):
        train(_cfg(tiny_data, tmp_path / "a", "data.path="))
    with pytest.raises(UserError, match=f"data.path '{afile}' is a file, not an ImageFolder.*eval.knn_train_path"):
        train(_cfg(tiny_data, tmp_path / "b", f"data.path={afile}"))
    # DALI shards train, but the kNN memory bank reads an ImageFolder (it once said "no class sub-folders")
    shards = tmp_path / "shards"
    convert_image_folder(tiny_data / "train", shards, shard_size=16)
    with pytest.raises(UserError, match=f"data.path '{shards}' is a DALI shard folder, not an ImageFolder, .*"
                                        f"set eval.knn_train_path to an ImageFolder$"):
        train(_cfg(tiny_data, tmp_path / "c", "data.backend=dali", "data.device=cpu", f"data.path={shards}"))
    assert not any((tmp_path / d).exists() for d in "abc")
    # Inside the ImageFolder the run would become a class folder without images, breaking the dataset.
    for key, folder, inside in (("data.path", tiny_data / "train", ("runs", "x")),
                                ("eval.knn_val_path", tiny_data / "val", ("r",))):
        out = folder.joinpath(*inside)
        with pytest.raises(UserError, match=f"output_dir '{out}' is inside {key} '{folder}'; expected a folder "
                                            f"outside the dataset"):
            train(_cfg(tiny_data, out))
        assert not (folder / inside[0]).exists()


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
    r18 = create_encoder(cfg.model, 32)  # the same tensor names as a resnet50, other shapes
    wide = load_config(None, ["model.encoder=resnet50", "data.image_size=32", "method.name=simclr"])
    torch.save({"encoder": r18.state_dict(), "config": config_to_dict(wide), "step": 1}, tmp_path / "encoder.pt")
    with pytest.raises(UserError, match=r"holds ResNet weights, which do not fit .*'resnet50': \d+ tensors of another"):
        load_encoder(tmp_path / "encoder.pt")
    torch.save({"encoder.conv1.weight": torch.zeros(1)}, tmp_path / "state.pt")
    with pytest.raises(UserError, match="accelerate's training state"):
        load_encoder(tmp_path / "state.pt")
