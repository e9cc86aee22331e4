"""`bench step`: the real training step fed by the real loader, against the same step without I/O.

    input-bound ratio = step images/s (real loader) / model images/s (synthetic batch on the device)

1.0 means the loader keeps the device busy (compute-bound); 0.6 means 40% of the achievable throughput
is lost to input. Where the time goes comes from timers around the data fetch (host seconds blocked in
`next(loader)`) and, on CUDA, events around the step (device seconds of compute); on a CPU the step is
synchronous and host timers measure it directly. Both benchmarks run in this process, with the same
recipe, batch and TrainingStep (fastssl/bench/trainstep.py), so the ratio compares only the data path.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from fastssl.bench.loader import BACKENDS as LOADER_BACKENDS
from fastssl.bench.loader import (PREMADE_CAPTION, Inputs, endless, fork_first, premade_share, select_backends,
                                  warmup_for)
from fastssl.bench.model import ModelFigures, add_training_arguments, bench_model, config_for, resolve_training
from fastssl.bench.record import BenchRecord, Column, Panel, describe_device, new_record, print_table, save_plot
from fastssl.bench.sweep import console, grid, note, parse_list, with_oom_backoff
from fastssl.bench.timing import TimedWindow
from fastssl.bench.trainstep import TrainingStep
from fastssl.config import Config
from fastssl.errors import UserError

from pipelines.augment import spec_for
from pipelines.base import LoaderContext, build_loader

TRAINING_BACKENDS = tuple(b for b in LOADER_BACKENDS if b != "pil")  # the baseline is not a training backend


def images_per_s(images: int, seconds: float) -> float:
    if seconds <= 0:
        raise ValueError(f"a timed window of {seconds} s")
    return images / seconds


def input_bound_ratio(step_images_per_s: float, model_images_per_s: float) -> float:
    """Real-step throughput over the I/O-free step's: 1.0 = compute-bound. Not clipped: noise can push a
    compute-bound ratio a little above 1, and hiding that would hide how noisy the figures are."""
    if model_images_per_s <= 0:
        raise ValueError(f"model throughput {model_images_per_s} images/s")
    return step_images_per_s / model_images_per_s


def data_wait_fraction(data_wait_s: float, wall_s: float) -> float:
    """Share of the wall time the training loop sat blocked waiting for the next batch."""
    if wall_s <= 0:
        raise ValueError(f"a timed window of {wall_s} s")
    return data_wait_s / wall_s


def compute_share(compute_s: float, wall_s: float) -> float:
    """Share of the wall time spent in the step itself. Unlike the ratio it comes from one timed window, so a
    change in other tenants' load between the `model` and `step` windows cannot move it."""
    if wall_s <= 0:
        raise ValueError(f"a timed window of {wall_s} s")
    return compute_s / wall_s


@dataclass(frozen=True)
class StepTimes:
    images: int
    wall_s: float
    data_wait_s: float  # host seconds blocked in next(loader)
    compute_s: float  # device seconds in the step (CUDA events) or host seconds on a CPU


def time_steps(batches, step: TrainingStep, steps: int, warmup: int, device: torch.device):
    """Run `warmup` then `steps` steps on batches from the iterator; the timed part's StepTimes and window."""
    for _ in range(warmup):
        step(next(batches))
    cuda = device.type == "cuda"
    events, wait, host_compute, images = [], 0.0, 0.0, 0
    window = TimedWindow(device)
    window.start()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        wait += t1 - t0
        if cuda:  # events time the device's work without a sync per step, which would hide overlap
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(batch)
            end.record()
            events.append((start, end))
        else:
            step(batch)
            host_compute += time.perf_counter() - t1
        images += batch.views[0].shape[0]
    w = window.stop()  # synchronises, so every event has completed
    compute = sum(s.elapsed_time(e) for s, e in events) / 1000.0 if cuda else host_compute
    return StepTimes(images, w.wall_s, wait, compute), w


@dataclass(frozen=True)
class StepFigures:
    backend: str
    workers: int
    batch: int  # per process
    image_size: int
    method: str
    encoder: str
    steps: int
    images_per_s: float
    model_images_per_s: float
    input_bound_ratio: float
    data_wait_s: float
    compute_s: float
    wall_s: float
    data_wait_fraction: float
    compute_share: float
    cores_busy: float
    machine_cpu_percent: float
    model_cores_busy: float  # the `model` window's: the ratio compares like with like only when these agree
    model_machine_cpu_percent: float
    batches_ahead: int  # the loader's prefetch queue
    warmup: int  # untimed steps run (loader.warmup_for)
    premade_share: float  # loader.premade_share(batches_ahead, steps)


def bench_step(cfg: Config, accelerator, steps: int, warmup: int, model: ModelFigures) -> StepFigures:
    device = accelerator.device
    spec = spec_for(cfg.data)  # the recipe's augmentations, data.crop_scale included, as train.py builds them
    ctx = LoaderContext(device, accelerator.process_index, accelerator.num_processes, cfg.seed)
    loader = build_loader(cfg.data, spec, ctx)
    step = TrainingStep(cfg, accelerator)
    batches = endless(loader)
    ahead = loader.batches_ahead
    warmup = warmup_for(loader, warmup)
    try:
        times, w = time_steps(batches, step, steps, warmup, device)
    finally:
        batches.close()
        step.close()
        del loader
    ips = images_per_s(times.images, times.wall_s)
    return StepFigures(
        backend=cfg.data.backend, workers=cfg.data.workers, batch=cfg.data.batch_size // accelerator.num_processes,
        image_size=cfg.data.image_size, method=cfg.method.name, encoder=cfg.model.encoder, steps=steps,
        images_per_s=ips, model_images_per_s=model.images_per_s,
        input_bound_ratio=input_bound_ratio(ips, model.images_per_s), data_wait_s=times.data_wait_s,
        compute_s=times.compute_s, wall_s=times.wall_s,
        data_wait_fraction=data_wait_fraction(times.data_wait_s, times.wall_s),
        compute_share=compute_share(times.compute_s, times.wall_s), cores_busy=w.cores_busy,
        machine_cpu_percent=w.machine_cpu_percent, model_cores_busy=model.cores_busy,
        model_machine_cpu_percent=model.machine_cpu_percent, batches_ahead=ahead, warmup=warmup,
        premade_share=premade_share(ahead, steps))


def add_arguments(p) -> None:
    add_training_arguments(p)
    p.add_argument("--backend", default="", help=f"data backends, comma-separated: {', '.join(TRAINING_BACKENDS)} "
                   "(default: the recipe's)")
    p.add_argument("--workers", default="", help="worker counts, comma-separated (default: the recipe's)")
    p.add_argument("--beton", default="", help="ffcv input (default: data.path converted to a temporary .beton)")
    p.add_argument("--shards", default="", help="dali input: tools/convert_dali.py output (default: data.path)")


def run(args) -> BenchRecord:
    import tempfile

    t = resolve_training(args)
    cfg, acc = t["cfg"], t["accelerator"]
    names = parse_list(args.backend, "--backend", str) if args.backend else [cfg.data.backend]
    if "pil" in names:
        raise UserError("--backend pil is the loader baseline, not a training backend; compare it with "
                        "`bench loader`; valid here: " + ", ".join(TRAINING_BACKENDS))
    backends, skipped = select_backends(names)
    workers = parse_list(args.workers, "--workers", minimum=0) if args.workers else [cfg.data.workers]
    rows, model_cache = [], {}
    with tempfile.TemporaryDirectory(prefix="fastssl-bench-") as tmp:
        inputs = Inputs(cfg.data.path, args.beton, args.shards, tmp)
        for point in grid(batch=t["batches"], backend=fork_first(backends), workers=workers):
            note(f"step {point['backend']} batch {point['batch']} workers {point['workers']}")

            def measure(batch: int, point=point) -> StepFigures:
                c = config_for(t["base"], **{"data.batch_size": batch, "data.backend": point["backend"],
                                             "data.workers": point["workers"],
                                             "data.path": inputs.path(point["backend"])})
                if batch not in model_cache:  # the ceiling depends on the batch, not on the loader
                    note(f"model (no I/O) batch {batch}")
                    model_cache[batch] = bench_model(c, acc, t["steps"], t["warmup"], count=False)
                return bench_step(c, acc, t["steps"], t["warmup"], model_cache[batch])

            result = with_oom_backoff(measure, point["batch"], t["min_batch"], acc.device, on_retry=note)
            rows.append(dict(asdict(result.value), batch_requested=point["batch"]))
    config = dict(recipe=args.recipe, overrides=list(args.overrides), data=cfg.data.path, backends=names,
                  skipped=skipped, batch=t["batches"], workers=workers, steps=t["steps"], warmup=t["warmup"],
                  min_batch=t["min_batch"], torch_threads=torch.get_num_threads(), data_compile=cfg.data.compile,
                  model_compile=cfg.model.compile)
    return new_record("step", config, rows, describe_device(acc.device))


COLUMNS = (Column("backend", "backend", justify="left"), Column("workers", "workers", "{:d}"),
           Column("batch", "batch", "{:d}"), Column("image_size", "px", "{:d}"),
           Column("images_per_s", "step img/s", "{:.1f}"), Column("model_images_per_s", "model img/s", "{:.1f}"),
           Column("input_bound_ratio", "ratio", "{:.3f}"), Column("data_wait_fraction", "data wait", "{:.1%}"),
           Column("compute_share", "compute", "{:.1%}"), Column("wall_s", "wall s", "{:.2f}"),
           Column("cores_busy", "cores busy", "{:.2f}"), Column("model_cores_busy", "model cores", "{:.2f}"),
           Column("machine_cpu_percent", "machine CPU %", "{:.0f}"), Column("premade_share", "pre-made <=", "{:.0%}"))


def show(record: BenchRecord) -> None:
    c = record.config
    caption = ("ratio = step images/s / model images/s (no I/O): 1.0 = compute-bound. data wait / compute = "
               "shares of the step's wall time blocked fetching the next batch / in the step.\nOn a shared CPU the "
               "ratio compares two windows: trust it when cores busy and model cores agree.\n" + PREMADE_CAPTION)
    if c["skipped"]:
        caption += "\nskipped: " + "; ".join(f"{k}: {v}" for k, v in c["skipped"].items())
    print_table(f"bench step: {c['recipe']} on {record.device}", COLUMNS, record.figures, caption=caption,
                console=console())


def plot(record: BenchRecord, path) -> None:
    labels = list(dict.fromkeys(f"{r['backend']} b{r['batch']}" for r in record.figures))
    ratio, wait = {}, {}
    for w in sorted({r["workers"] for r in record.figures}):
        rows = {f"{r['backend']} b{r['batch']}": r for r in record.figures if r["workers"] == w}
        ratio[f"workers={w}"] = (labels, [rows[k]["input_bound_ratio"] if k in rows else 0.0 for k in labels])
        wait[f"workers={w}"] = (labels, [rows[k]["data_wait_fraction"] if k in rows else 0.0 for k in labels])
    save_plot(path, [Panel("input-bound ratio (1.0 = compute-bound)", "backend, batch", "step / model", ratio,
                           bars=True),
                     Panel("time blocked on data", "backend, batch", "share of wall time", wait, bars=True)],
              suptitle=f"bench step: {record.config['recipe']} on {record.device} @ {record.git_commit[:12]}")
