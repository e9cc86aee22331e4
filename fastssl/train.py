"""The training loop: read it top to bottom. accelerate owns devices, precision and process groups."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fastssl.checkpoint import UNREADABLE_ERRORS, latest_checkpoint, load_encoder, resume_hint, save_checkpoint
from fastssl.config import Config, config_to_dict, dump_config
from fastssl.data.shards import is_shard_dir
from fastssl.errors import UserError, from_main, raise_together, resolve_compile
from fastssl.fileio import write_atomic
from fastssl.eval.knn import check_bank_size, paired_folders
from fastssl.eval.monitor import KnnMonitor
from fastssl.metrics import MetricsLog, Progress, images_per_s, logged_windows, read_records
from fastssl.optim import build_optimizer
from fastssl.preempt import StopRequest
from fastssl.recipe_checks import check_recipe
from fastssl.rundir import prepare_run_dir, stopped_before_first_checkpoint
from fastssl.schedule import lr_at, scaled_lr
from fastssl.step import (build_training_method, channels_last_views, compile_networks, leave_together,
                          make_accelerator, optimizer_step, step_logs)

from pipelines.augment import spec_for
from pipelines.base import LoaderContext, build_loader


@dataclass
class TrainState:
    """What accelerate checkpoints besides model and optimiser (register_for_checkpointing)."""

    step: int = 0
    world_size: int = 1  # of the run that saved; a resume on another world size keeps the global batch
    # The schedule's shape as the run that saved saw it (0: a checkpoint from before they were recorded). A
    # dataset that grew or shrank under the same path changes both, and with them the lr and the data order.
    steps_per_epoch: int = 0
    total_steps: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "world_size": self.world_size, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps}

    def load_state_dict(self, d: dict) -> None:
        self.step = int(d["step"])
        self.world_size = int(d.get("world_size", 1))
        self.steps_per_epoch = int(d.get("steps_per_epoch", 0))
        self.total_steps = int(d.get("total_steps", 0))


def _knn_sets(cfg: Config):
    """Scan the kNN folders up front: a wrong path fails before training, not after it."""
    if not cfg.eval.knn_val_path:
        return None
    if cfg.eval.knn_train_path:
        if not Path(cfg.eval.knn_train_path).is_dir():
            raise UserError(f"eval.knn_train_path {cfg.eval.knn_train_path!r} is not an ImageFolder directory")
        train_path = cfg.eval.knn_train_path
    else:  # the memory bank defaults to the training data: the user's mistake is data.path
        train_path = cfg.data.path
        if not train_path:
            raise UserError("data.path is empty; expected the training data (an ImageFolder root, a DALI shard "
                            "folder or a .beton)")
        if not Path(train_path).exists():
            raise UserError(f"data.path {train_path!r} does not exist")
        if not Path(train_path).is_dir() or is_shard_dir(train_path):
            what = "a DALI shard folder" if Path(train_path).is_dir() else "a file"
            raise UserError(f"data.path {train_path!r} is {what}, not an ImageFolder, and the kNN evaluation's "
                            f"memory bank defaults to it; set eval.knn_train_path to an ImageFolder")
    train, val = paired_folders(train_path, cfg.eval.knn_val_path, "eval.knn_train_path (or data.path)",
                                "eval.knn_val_path")
    check_bank_size(cfg.eval.knn_k, train)  # now, not when the final evaluation refuses after training
    return train, val


def nonfinite_weights(method: torch.nn.Module, step: int) -> str | None:
    """Before a checkpoint: weights that diverged between two logged losses must not replace a good checkpoint
    (the oldest kept ones are deleted as new ones land). Buffers count: MoCo v2's per-rank key BN statistics
    can turn NaN on one rank alone, so the caller raises on every rank together."""
    for name, t in (*method.named_parameters(), *method.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return (f"{name} is not finite at step {step}: training diverged, so no checkpoint is written and the "
                    f"earlier ones are kept; train again with a lower optim.lr (or train.precision=fp32)")
    return None


@contextlib.contextmanager
def _say_where_on_interrupt(state, run_dir: Path, world: int, main: bool):
    """Ctrl-C stops at once (no checkpoint of the steps since the last one): say what is kept and how to go on."""
    try:
        yield
    except KeyboardInterrupt:
        if main:
            last = latest_checkpoint(run_dir)
            print(f"interrupted after step {state.step}; "
                  + (f"the last checkpoint is {last.name}; {resume_hint(run_dir, world)}" if last else
                     "no checkpoint yet: the same command starts the run again"), flush=True)
        raise


def _stopped_by(signal_name: str, step: int, total: int, run_dir: Path, world: int, main: bool) -> dict:
    if main:
        print(f"{signal_name} received: stopped at step {step} of {total}"
              + (", checkpoint written" if step < total else ", before the final evaluation")
              + f"; {resume_hint(run_dir, world)}", flush=True)
    return {"stopped_at_step": step, "signal": signal_name}


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def train(cfg: Config) -> dict:
    from accelerate.utils import set_seed

    check_recipe(cfg)
    restarting = not cfg.resume and stopped_before_first_checkpoint(Path(cfg.output_dir))
    cfg, run_dir, resuming = prepare_run_dir(cfg)
    knn_sets = _knn_sets(cfg)
    accelerator = make_accelerator(cfg.train.precision)
    main = accelerator.is_main_process
    monitor = KnnMonitor(cfg, accelerator.device, knn_sets)  # checks its settings now, not after an epoch

    world = accelerator.num_processes
    if cfg.data.batch_size % (world * cfg.train.grad_accum):
        raise UserError(f"data.batch_size={cfg.data.batch_size} (the global batch) must be divisible by "
                        f"{world} process(es) x train.grad_accum={cfg.train.grad_accum}")

    # Same seed on every process: identical initial weights. View randomness is per rank (batch_seed).
    set_seed(cfg.seed)
    method, channels_last = build_training_method(cfg, accelerator.device)  # checks the config before any data
    networks_compiled = resolve_compile(cfg.model.compile, accelerator.device)
    if networks_compiled:
        compile_networks(method)
    # The model's own draws (drop-path masks, DRLoc's cell pairs) must differ across processes, or every rank
    # drops the same samples' branches: each process after the first moves to a stream of its own.
    if accelerator.process_index:
        set_seed(cfg.seed + accelerator.process_index)
    spec = spec_for(cfg.data)
    ctx = LoaderContext(accelerator.device, accelerator.process_index, accelerator.num_processes, cfg.seed)
    loader = build_loader(cfg.data, spec, ctx)
    steps_per_epoch = len(loader)
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    warmup = min(total, int(round(cfg.optim.warmup_epochs * steps_per_epoch)))
    peak_lr = scaled_lr(cfg.optim.lr, cfg.data.batch_size, cfg.optim.lr_scaling)
    optimizer = build_optimizer(cfg.optim, method, peak_lr)
    method, optimizer = accelerator.prepare(method, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    if main and restarting:
        print(f"output_dir {str(run_dir)!r} holds a run stopped before its first checkpoint: starting it again",
              flush=True)
    failure = None
    if resuming:
        checkpoint = from_main(accelerator, latest_checkpoint(run_dir))  # one choice, whatever each node sees
        try:
            # accelerate skips an unreadable random-state file in silence (it only logs): the model's own draws
            # (drop-path masks, DRLoc's pairs) would then leave the uninterrupted run's path. A missing one is a
            # resume on more processes than were saved, which the notice below describes.
            rng_file = checkpoint / f"random_states_{accelerator.process_index}.pkl"
            if rng_file.exists():
                torch.load(rng_file, weights_only=False)  # fastssl's own checkpoint, as accelerate loads it
            accelerator.load_state(str(checkpoint))
        except UNREADABLE_ERRORS as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            failure = (f"cannot resume from {str(checkpoint)!r} ({why}); its files are incomplete or corrupt: "
                       f"remove that step folder to resume from the one before")
    raise_together(accelerator, failure)  # one rank's unreadable file stops every rank, none waits
    if resuming and state.steps_per_epoch and (state.steps_per_epoch, state.total_steps) != (steps_per_epoch, total):
        raise UserError(f"resume={str(run_dir)!r}: the data now gives {steps_per_epoch} steps per epoch "
                        f"({total} in all) where the run had {state.steps_per_epoch} ({state.total_steps}): "
                        f"data.path {cfg.data.path!r} changed, and with it the lr schedule and the data order; "
                        f"resume with the data the run started with, or start a new run")
    if main and resuming and state.world_size != world:
        print(f"resuming a run saved on {state.world_size} process(es) on {world}: same global batch "
              f"{cfg.data.batch_size}, so the same images in each step and the same loss over them; the "
              f"random views and per-process BN groups are drawn per process, so they differ", flush=True)
    state.world_size, state.steps_per_epoch, state.total_steps = world, steps_per_epoch, total
    if resuming:
        accelerator.unwrap_model(method).resume_at(state.step, total)  # e.g. MoCo v3's logged momentum
    stop_at = cfg.train.stop_after_steps if 0 < cfg.train.stop_after_steps < total else total
    finished = resuming and state.step >= stop_at  # nothing to train (every rank loaded the same step)
    summary_file = run_dir / "summary.json"
    if finished and (state.step < total or from_main(accelerator, summary_file.is_file())):
        leave_together()
        if not main:
            return {"stopped_at_step": state.step} if state.step < total else {"steps": state.step}
        # leave the checkpoints and the summary as they are
        print(f"{run_dir} is already at step {state.step} of {total}"
              + ("" if state.step >= total else f" (train.stop_after_steps={cfg.train.stop_after_steps}); "
                 f"add train.stop_after_steps=0 to run to the end")
              + "; nothing to do" * (state.step >= total), flush=True)
        return json.loads(summary_file.read_text()) if state.step >= total else {"stopped_at_step": state.step}
    # (finished without a summary: killed during the final evaluation; the loop is skipped, the evaluation runs)
    if main and not finished:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            # Without resume=: the saved recipe describes the run, and a new run started from it must not
            # continue this one.
            write_atomic(run_dir / "config.yaml", dump_config(replace(cfg, resume="")))
        except OSError as e:  # changed since check_creatable looked (full disk, removed, read-only)
            failure = f"output_dir {str(run_dir)!r} cannot be written: {e.strerror}"
        except UserError as e:  # write_atomic's refused write
            failure = str(e)
    raise_together(accelerator, failure)

    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=main, resume_step=state.step if resuming else None)
    progress = Progress(total, state.step, enabled=cfg.train.progress, main=main)
    if main:
        per_device = cfg.data.batch_size // world
        progress.print(f"{cfg.method.name} / {cfg.model.encoder}: {total} steps ({steps_per_epoch} per epoch); "
                       f"global batch {cfg.data.batch_size} = {world} process(es) x {per_device}"
                       + (f" in {cfg.train.grad_accum} micro-batches of {per_device // cfg.train.grad_accum}"
                          if cfg.train.grad_accum > 1 else "")
                       + f"; peak lr {peak_lr:.4g} ({cfg.optim.lr} x {cfg.optim.lr_scaling} scaling); "
                       f"precision {accelerator.mixed_precision}; device {accelerator.device}; torch.compile: networks "
                       + _yes_no(networks_compiled)
                       # DALI makes its views in its own graph: no such switch
                       + ("" if getattr(loader, "compiled", None) is None else f", views {_yes_no(loader.compiled)}"))
        if cfg.train.grad_accum > 1:
            progress.print("warning: gradient accumulation changes the loss: each micro-batch's negatives are "
                           "only its own samples, not the global batch")
        if cfg.train.precision in ("bf16", "fp16") and accelerator.mixed_precision == "no":
            progress.print(f"note: train.precision={cfg.train.precision} runs in fp32 here: mixed precision is for "
                           f"CUDA GPUs, and this machine has none")
    unwrapped = accelerator.unwrap_model(method)
    config_dict = config_to_dict(replace(cfg, resume=""))  # as config.yaml: the run, not how it was started

    def checkpoint() -> None:  # never of diverged weights: they would rotate the last good checkpoint out
        raise_together(accelerator, nonfinite_weights(unwrapped, state.step))
        save_checkpoint(accelerator, run_dir, state.step, unwrapped.encoder, config_dict, cfg.train.keep_checkpoints)

    def periodic_checkpoint_step() -> bool:
        return bool(cfg.train.checkpoint_every) and state.step % cfg.train.checkpoint_every == 0

    first_step = state.step
    t_start = t_window = time.time()
    window_steps = 0
    windows = []  # (images, seconds) of each logging window
    method.train()
    stop_signal = None
    with StopRequest() as stop_request, _say_where_on_interrupt(state, run_dir, world, main):
        while state.step < stop_at and not stop_signal:
            epoch = state.step // steps_per_epoch
            loader.set_epoch(epoch, start_batch=state.step % steps_per_epoch)
            for batch in loader:
                lr = lr_at(state.step, total, warmup, peak_lr, cfg.optim.min_lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                if channels_last:
                    batch = channels_last_views(batch)
                out = optimizer_step(method, optimizer, accelerator, batch, cfg.train.grad_accum)
                unwrapped.after_step(state.step, total)
                state.step += 1
                window_steps += 1

                if state.step % cfg.train.log_every == 0 or state.step == stop_at:
                    logs = step_logs(accelerator, out)  # sync point: only on logging steps
                    # The mean over processes: one rank's NaN makes it NaN on every rank, and all stop.
                    if not math.isfinite(logs["loss"]):
                        raise UserError(f"loss is {logs['loss']} at step {state.step}; lower optim.lr or check "
                                        f"the data")
                    now = time.time()
                    windows.append((window_steps * cfg.data.batch_size, max(now - t_window, 1e-9)))
                    ips = windows[-1][0] / windows[-1][1]
                    record = {"step": state.step, "epoch": epoch, "loss": logs.pop("loss"), "lr": lr,
                              "images_per_s": ips, **logs}
                    metrics.write(record)
                    progress.update(state.step, record)
                    t_window, window_steps = now, 0
                if periodic_checkpoint_step():
                    checkpoint()
                if main and state.step % steps_per_epoch == 0:
                    # Only the main process evaluates; the others wait at the next collective.
                    knn = monitor.maybe_run(state.step // steps_per_epoch, unwrapped.encoder)
                    if knn is not None:
                        metrics.write({"step": state.step, "epoch": state.step // steps_per_epoch, **knn})
                        progress.print(f"epoch {state.step // steps_per_epoch}: kNN top-1 {knn['knn_top1']:.2f}%")
                # A stop signal (preemption) ends the run here, on a step every process agrees on.
                stop_signal = stop_request.agreed(accelerator, state.step)
                if stop_signal or state.step >= stop_at:
                    break

        # Still under the handlers: a signal during this save is a request, not the end of the process.
        if not finished and not periodic_checkpoint_step():
            checkpoint()
    progress.close()
    metrics.close()
    wall = time.time() - t_start
    # Here, not after the main process's final kNN evaluation: the others leave now rather than wait for it at
    # a barrier (on ImageNet the kNN bank is the whole train set, longer than a collective's 10-min timeout).
    leave_together()
    if stop_signal and (state.step < total or knn_sets is not None):  # at the end, only the evaluation is left
        return _stopped_by(stop_signal, state.step, total, run_dir, world, main)
    if state.step < total:
        if main:
            print(f"stopped at step {state.step} of {total} (train.stop_after_steps); "
                  f"{resume_hint(run_dir, world, ' train.stop_after_steps=0')}", flush=True)
        return {"stopped_at_step": state.step}

    if finished:  # resumed only for the final evaluation: the throughput is the logged one
        windows = logged_windows(read_records(run_dir / "metrics.jsonl"), cfg.data.batch_size)
    summary = {"steps": state.step, "wall_s": round(wall, 1), "images_per_s": images_per_s(windows)}
    if not main:
        return summary
    # A signal during the last save: the final evaluation (minutes on ImageNet) is left to the resume.
    if stop_request.received and knn_sets is not None:
        return _stopped_by(stop_request.received, state.step, total, run_dir, world, main)
    if knn_sets is not None:
        from fastssl.eval.knn import knn_eval

        kw = dict(k=cfg.eval.knn_k, temperature=cfg.eval.knn_t, batch_size=cfg.eval.batch_size,
                  device=accelerator.device, workers=cfg.data.workers)
        res = knn_eval(unwrapped.encoder, *knn_sets, cfg.data.image_size, **kw)
        summary.update({"knn_top1": res["top1"], "knn_top5": res["top5"]})
        if cfg.eval.knn_random_baseline:
            rand, _ = load_encoder(run_dir, random_init=True)
            base = knn_eval(rand.to(accelerator.device), *knn_sets, cfg.data.image_size, **kw)
            summary.update({"knn_top1_random_init": base["top1"], "knn_top5_random_init": base["top5"]})
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if finished:
        done = f"{state.step} steps (trained before this resume), {summary['images_per_s']:.1f} images/s"
    elif first_step:
        done = (f"trained steps {first_step + 1}-{state.step} (resumed) in {wall:.0f} s, "
                f"{summary['images_per_s']:.1f} images/s")
    else:
        done = f"trained {state.step} steps in {wall:.0f} s, {summary['images_per_s']:.1f} images/s"
    lines = [done]
    if "knn_top1" in summary:
        lines.append(f"kNN top-1 (k={cfg.eval.knn_k}): {summary['knn_top1']:.2f}% trained"
                     + (f", {summary['knn_top1_random_init']:.2f}% random init"
                        if "knn_top1_random_init" in summary else ""))
    print("\n".join(lines), flush=True)
    return summary
