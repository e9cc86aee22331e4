"""`bench augment`: the on-device augmentation alone, eager against torch.compile (`data.compile`).

A uint8 batch already on the device is cut and augmented into the preset's views by `ops.make_view`, as the
torch and FFCV backends do after their decode. Each row times --steps calls (every view of the batch, new
random parameters each call) after --warmup calls (compilation happens there). On CUDA a profiled call
counts the kernels launched, and the peak memory is the allocator's. A compiled row also reports its largest
difference from eager on the same batch and parameters: a speed-up that changed the views would not count.
Out of memory, a batch is halved (down to 8) as in `bench model`; `batch` is what ran, `batch_requested` beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from fastssl.bench.record import BenchRecord, Column, Panel, describe_device, new_record, print_table, save_plot
from fastssl.bench.sweep import (check_minimums, check_names, console, fresh_compile_caches, note, parse_list,
                                 with_oom_backoff)
from fastssl.bench.timing import TimedWindow, synchronize
from fastssl.errors import UserError, resolve_device, seed_option

from pipelines import ops
from pipelines.augment import PRESETS, AugmentSpec, preset
from pipelines.base import ViewBatch

HELP = "on-device augmentation (crop, flip, jitter, gray, blur, solarise): view-pairs/s, eager vs compiled"


class SyntheticViews:
    """A fixed uint8 batch on the device and its crop boxes; each call makes fresh views from it."""

    def __init__(self, spec: AugmentSpec, batch: int, source_size: int, device: torch.device, seed: int = 0,
                 compiled: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.spec, self.device, self.seed, self.compiled = spec, device, seed, compiled
        self.images = torch.randint(0, 256, (batch, 3, source_size, source_size), dtype=torch.uint8,
                                    generator=g).to(device)
        sides = np.full(batch, source_size)
        rng = np.random.default_rng(seed)
        # Drawn once: on the real path the loader's workers draw boxes, outside the training step.
        self.boxes = [torch.from_numpy(ops.sample_crop_boxes(sides, sides, v.crop_scale, v.crop_ratio, rng))
                      .float().to(device) for v in spec.views]
        self.labels = torch.zeros(batch, dtype=torch.int64, device=device)
        self.indices = torch.arange(batch, device=device)
        self._calls = 0

    def __call__(self, call: int | None = None) -> ViewBatch:
        """Views with the parameters of call number `call` (default: the next one)."""
        if call is None:
            call, self._calls = self._calls, self._calls + 1
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + call)
        s, images = self.spec, self.images.float()  # once for all views, as the backends do
        views = tuple(ops.make_view(images, b, v, s.size, s.mean, s.std, gen, self.compiled)
                      for b, v in zip(self.boxes, s.views))
        return ViewBatch(views, self.labels, self.indices)


@dataclass(frozen=True)
class AugmentFigures:
    augment: str
    size: int
    source_size: int
    batch: int
    compiled: bool
    pairs_per_s: float  # images with all their views made, per second
    ms_per_batch: float
    cuda_kernels: int | None  # launched by one call (all views); None on CPUs
    peak_mem_gib: float | None  # CUDA allocator peak above the input batch; None on CPUs
    max_diff_vs_eager: float | None  # compiled rows: largest |compiled - eager| over the views of one call
    cores_busy: float


def add_arguments(p) -> None:
    p.add_argument("--augment", default="simclr", help=f"preset: {', '.join(PRESETS)} (default: %(default)s)")
    p.add_argument("--size", type=int, default=224, help="view side in pixels (default: %(default)s)")
    p.add_argument("--source-size", type=int, default=0,
                   help="side of the synthetic uint8 images the crops are cut from (default: 2 x --size)")
    p.add_argument("--batch", default="", help="batch sizes, comma-separated (default: 1024 on a GPU, 32 on a CPU)")
    p.add_argument("--compile", default="false,true", help="false | true | false,true (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="timed calls per row (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    p.add_argument("--seed", type=seed_option, default=0)


def count_profiled(fn, kind: str = "cuda") -> int:
    """Events of `kind` the profiler records during fn(): CUDA kernels (and copies) launched, or for "cpu"
    the operators run on the host (what the tests can check without a GPU)."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    activity, device_type = ((ProfilerActivity.CUDA, DeviceType.CUDA) if kind == "cuda"
                             else (ProfilerActivity.CPU, DeviceType.CPU))
    with profile(activities=[activity]) as prof:
        fn()
        if kind == "cuda":
            torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == device_type)


def _max_diff(a: ViewBatch, b: ViewBatch) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.views, b.views))


def bench_augment(spec: AugmentSpec, name: str, batch: int, source_size: int, compiled: bool, device: torch.device,
                  steps: int, warmup: int, seed: int) -> AugmentFigures:
    if compiled:
        fresh_compile_caches()
    views = SyntheticViews(spec, batch, source_size, device, seed, compiled)
    for _ in range(warmup):
        views()
    diff = _max_diff(views(0), SyntheticViews(spec, batch, source_size, device, seed)(0)) if compiled else None
    cuda = device.type == "cuda"
    kernels = count_profiled(views) if cuda else None
    if cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    window = TimedWindow(device)
    window.start()
    for _ in range(steps):
        views()
    w = window.stop()
    return AugmentFigures(
        augment=name, size=spec.size, source_size=source_size, batch=batch, compiled=compiled,
        pairs_per_s=batch * steps / w.wall_s, ms_per_batch=1000.0 * w.wall_s / steps, cuda_kernels=kernels,
        peak_mem_gib=(torch.cuda.max_memory_allocated(device) - base) / 2**30 if cuda else None,
        max_diff_vs_eager=diff, cores_busy=w.cores_busy)


def run(args) -> BenchRecord:
    device = torch.device(resolve_device(args.device))
    check_names([args.augment], list(PRESETS), "--augment")
    check_minimums(("--size", args.size, 8), ("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                   ("--source-size", args.source_size, 0))
    source = args.source_size or 2 * args.size
    if source < args.size // 4:
        raise UserError(f"--source-size {source} for --size {args.size}: expected at least a quarter of the view")
    batches = parse_list(args.batch, "--batch", minimum=1) if args.batch else [32 if device.type == "cpu" else 1024]
    compiles = parse_list(args.compile, "--compile", str)
    check_names(compiles, ["false", "true"], "--compile")
    spec = preset(args.augment, args.size)
    rows = []
    for batch in batches:
        for flag in compiles:
            note(f"augment {args.augment} {args.size}px batch {batch} compile={flag}")
            result = with_oom_backoff(
                lambda b, flag=flag: bench_augment(spec, args.augment, b, source, flag == "true", device, args.steps,
                                                   args.warmup, args.seed),
                batch, min(8, batch), device, on_retry=note)
            rows.append(dict(asdict(result.value), batch_requested=batch))
    config = dict(augment=args.augment, size=args.size, source_size=source, batch=batches, compile=compiles,
                  steps=args.steps, warmup=args.warmup, seed=args.seed, torch_threads=torch.get_num_threads())
    return new_record("augment", config, rows, describe_device(device))


COLUMNS = (Column("augment", "preset", justify="left"), Column("size", "px", "{:d}"),
           Column("source_size", "source px", "{:d}"), Column("batch", "batch", "{:d}"),
           Column("compiled", "compiled"), Column("pairs_per_s", "pairs/s", "{:.0f}"),
           Column("ms_per_batch", "ms/batch", "{:.1f}"), Column("cuda_kernels", "CUDA kernels", "{:d}"),
           Column("peak_mem_gib", "peak GiB", "{:.2f}"), Column("max_diff_vs_eager", "max |diff|", "{:.1e}"),
           Column("cores_busy", "cores busy", "{:.2f}"))


def show(record: BenchRecord) -> None:
    print_table(f"bench augment on {record.device}", COLUMNS, record.figures,
                caption="pairs/s: images per second with every view of the preset made from a uint8 batch already "
                        "on the device (crop + augmentation + normalisation).\nmax |diff|: compiled views against "
                        "eager ones from the same batch and parameters (normalised units).",
                console=console())


def plot(record: BenchRecord, path) -> None:
    series = {}
    for mode in ("eager", "compiled"):
        rows = [r for r in record.figures if r["compiled"] == (mode == "compiled")]
        if rows:
            series[mode] = ([str(r["batch"]) for r in rows], [r["pairs_per_s"] for r in rows])
    save_plot(path, [Panel("augmentation on the device", "batch", "view pairs/s", series, bars=True)],
              suptitle=f"bench augment on {record.device} @ {record.git_commit[:12]}")
