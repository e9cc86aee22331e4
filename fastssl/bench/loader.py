"""`bench loader`: augmented views per second each input pipeline delivers to the training device.

Backends: fastssl's three (torch, dali, ffcv; pipelines/) and "pil", the PIL/torchvision per-sample
baseline most SSL code uses (fastssl/bench/baseline.py), all over the same images, at one resolution,
batch and worker count per row. The warm-up batches (worker start, numba/DALI compilation, first file
reads) are excluded; the timed window ends after a device sync. CPU is the process tree's CPU-seconds per
wall second ("cores busy", fastssl/bench/timing.py): views/s divided by it is what one core delivers, the
figure that sizes the CPU cores a GPU needs.
"""

from __future__ import annotations

import gc
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from fastssl.bench.record import BenchRecord, Column, Panel, describe_device, new_record, print_table, save_plot
from fastssl.bench.sweep import check_names, console, grid, note, parse_list
from fastssl.bench.timing import TimedWindow, WindowFigures
from fastssl.config import DataConfig
from fastssl.errors import UserError, resolve_compile, resolve_device, seed_option

from pipelines.augment import PRESETS, AugmentSpec, preset
from pipelines.base import LoaderContext, ViewLoader, build_loader

BACKENDS = ("torch", "dali", "ffcv", "pil")
# What --workers means for each: the knob that spends CPU cores on input.
WORKERS_MEANING = {
    "torch": "DataLoader processes decoding and cutting crop regions; views made on the training device",
    "dali": "DALI CPU threads (decode on the GPU with `mixed` when views go to a GPU)",
    "ffcv": "numba decode threads; views made on the training device",
    "pil": "DataLoader processes doing PIL decode and torchvision transforms per sample",
}
DEFAULT_DATA = "data/synthetic/train"  # tools/make_synthetic.py data/synthetic


def unavailable_reason(backend: str) -> str | None:
    """Why `backend` cannot run on this machine (its optional package is missing), or None."""
    if backend == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            return f"NVIDIA DALI is not installed ({e}); bash .ci/install_dali.sh .venv"
    if backend == "ffcv":
        from fastssl.data.beton import import_ffcv

        try:
            import_ffcv()
        except UserError as e:
            return str(e)
    return None


def select_backends(names: list[str]) -> tuple[list[str], dict[str, str]]:
    """Backends to run and those skipped with their reason; a missing backend asked for alone is an error."""
    check_names(names, BACKENDS, "--backend")
    skipped = {n: r for n in names if (r := unavailable_reason(n)) is not None}
    if skipped and len(names) == 1:
        raise UserError(f"--backend {names[0]} cannot run: {skipped[names[0]]}")
    for name, reason in skipped.items():
        note(f"skipping {name}: {reason}")
    return [n for n in names if n not in skipped], skipped


def fork_first(backends: list[str]) -> list[str]:
    """Backends that fork DataLoader workers before those that start thread pools (DALI's, numba's for FFCV):
    forking a process that holds live threads can deadlock the child, and numba's TBB pool warns about it."""
    return sorted(backends, key=lambda b: b in ("dali", "ffcv"))


class Inputs:
    """The same images for every backend: an ImageFolder, its .beton for FFCV and optionally DALI shards.

    `data` may itself be a .beton (an FFCV recipe's data.path); then only ffcv can read it.
    """

    def __init__(self, data: str, beton: str, shards: str, tmp_dir: str):
        for option, path in (("--beton", beton), ("--shards", shards)):
            if path and not Path(path).exists():
                raise UserError(f"{option} {path!r} does not exist")
        if Path(data).is_file() and data.endswith(".beton"):
            data, beton = "", beton or data
        elif not Path(data).is_dir():
            raise UserError(f"data path {data!r} is not a directory; expected an ImageFolder root "
                            f"(python tools/make_synthetic.py data/synthetic makes {DEFAULT_DATA})")
        self.data, self.beton, self.shards, self.tmp_dir = data, beton, shards, tmp_dir

    def path(self, backend: str) -> str:
        if backend == "ffcv" and self.beton:
            return self.beton
        if backend == "dali" and self.shards:
            return self.shards
        if not self.data:
            raise UserError(f"backend {backend} needs an ImageFolder (or --shards for dali); got only the "
                            f".beton {self.beton}")
        if backend == "ffcv":
            from fastssl.data.beton import convert_image_folder

            out = Path(self.tmp_dir) / "bench.beton"
            note(f"converting {self.data} to {out} for ffcv (JPEG quality 90; pass --beton to reuse one)")
            convert_image_folder(self.data, out, workers=min(16, os.cpu_count() or 1))
            self.beton = str(out)
            return self.beton
        return self.data


def build_view_loader(backend: str, path: str, spec: AugmentSpec, batch: int, workers: int,
                      ctx: LoaderContext) -> ViewLoader:
    if backend == "pil":
        from fastssl.bench.baseline import BaselineLoader

        return BaselineLoader(path, spec, batch, workers, ctx.device, ctx.seed)
    data_cfg = DataConfig(backend=backend, path=path, image_size=spec.size, batch_size=batch, workers=workers)
    return build_loader(data_cfg, spec, ctx)


def endless(loader: ViewLoader):
    """Batches across epochs; closing it closes the current epoch's iterator (DALI drains its queue)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        inner = iter(loader)
        try:
            yielded = False
            for batch in inner:
                yielded = True
                yield batch
        finally:
            close = getattr(inner, "close", None)
            if close is not None:
                close()
        if not yielded:
            raise UserError("the loader produced no batch in a whole epoch; lower the batch size")
        epoch += 1


def premade_share(batches_ahead: int, timed: int) -> float:
    """At most this share of `timed` batches can have been prepared before the timed window opened: the loader's
    queue may be full then. Above ~0.25 the window's rate can overstate the loader's own by more than 1/(1 - it)."""
    return min(1.0, batches_ahead / timed)


def warmup_for(loader: ViewLoader, requested: int) -> int:
    """Untimed batches: at least the loader's queue, which is full before the first one is asked for."""
    return max(requested, loader.batches_ahead)


def measure(loader: ViewLoader, batches: int, warmup: int, device: torch.device) -> tuple[int, int, WindowFigures]:
    """(images, views, window) over `batches` batches after `warmup` untimed ones."""
    it = endless(loader)
    try:
        for _ in range(warmup):
            next(it)
        window = TimedWindow(device)
        window.start()
        images = views = 0
        for _ in range(batches):
            b = next(it)
            images += b.views[0].shape[0]
            views += b.views[0].shape[0] * len(b.views)
        w = window.stop()
    finally:
        it.close()
    return images, views, w


@dataclass(frozen=True)
class LoaderFigures:
    backend: str
    batch: int
    workers: int
    image_size: int
    batches: int
    images_per_s: float | None  # = view pairs/s with two views per image
    views_per_s: float | None
    ms_per_batch: float | None
    cores_busy: float | None
    views_per_core_s: float | None  # views/s per busy core
    machine_cpu_percent: float | None
    batches_ahead: int | None = None  # the loader's prefetch queue
    warmup: int | None = None  # untimed batches run (warmup_for)
    premade_share: float | None = None  # premade_share(batches_ahead, batches)
    skipped: str | None = None


def bench_loader(backend: str, path: str, spec: AugmentSpec, batch: int, workers: int, ctx: LoaderContext,
                 batches: int, warmup: int) -> LoaderFigures:
    loader = build_view_loader(backend, path, spec, batch, workers, ctx)
    ahead = loader.batches_ahead
    warmup = warmup_for(loader, warmup)
    try:
        images, views, w = measure(loader, batches, warmup, ctx.device)
    finally:
        del loader
        gc.collect()  # shuts the DataLoader workers down before the next row starts its own
    return LoaderFigures(backend, batch, workers, spec.size, batches, images / w.wall_s, views / w.wall_s,
                         1000.0 * w.wall_s / batches, w.cores_busy,
                         views / w.wall_s / w.cores_busy if w.cores_busy > 0 else None, w.machine_cpu_percent,
                         ahead, warmup, premade_share(ahead, batches))


def add_arguments(p) -> None:
    p.add_argument("--data", default=DEFAULT_DATA, help="ImageFolder root (default: %(default)s)")
    p.add_argument("--beton", default="", help="FFCV input (default: --data converted to a temporary .beton)")
    p.add_argument("--shards", default="", help="DALI input: tools/convert_dali.py output (default: --data)")
    p.add_argument("--backend", default=",".join(BACKENDS),
                   help="backends, comma-separated; pil = the PIL/torchvision per-sample baseline "
                        "(default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="view side in pixels (default: %(default)s)")
    p.add_argument("--batch", default="256", help="batch sizes, comma-separated (default: %(default)s)")
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated (default: %(default)s)")
    p.add_argument("--augment", default="simclr",
                   help=f"augmentation preset: {', '.join(PRESETS)} (default: %(default)s)")
    p.add_argument("--batches", type=int, default=15, help="timed batches per row (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="where views are delivered: auto | cpu | cuda (default: %(default)s)")
    p.add_argument("--seed", type=seed_option, default=0)


def run(args) -> BenchRecord:
    names = parse_list(args.backend, "--backend", str)
    batches = parse_list(args.batch, "--batch", minimum=1)
    workers = parse_list(args.workers, "--workers", minimum=0)
    if args.batches < 1 or args.warmup < 0:
        raise UserError(f"--batches {args.batches} / --warmup {args.warmup}: expected >= 1 / >= 0")
    spec = preset(args.augment, args.size)
    ctx = LoaderContext(torch.device(resolve_device(args.device)), seed=args.seed)
    backends, skipped = select_backends(names)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastssl-bench-") as tmp:
        inputs = Inputs(args.data, args.beton, args.shards, tmp)
        for point in grid(backend=fork_first(backends), batch=batches, workers=workers):
            note(f"loader {point['backend']} batch {point['batch']} workers {point['workers']}")
            figures = bench_loader(point["backend"], inputs.path(point["backend"]), spec, point["batch"],
                                   point["workers"], ctx, args.batches, args.warmup)
            rows.append(asdict(figures))
    empty = {f.name: None for f in fields(LoaderFigures)}
    rows += [dict(empty, backend=name, image_size=args.size, skipped=reason) for name, reason in skipped.items()]
    config = dict(data=args.data, beton=args.beton or "converted from data (JPEG quality 90)",
                  shards=args.shards or None, backends=names, batch=batches, workers=workers, image_size=args.size,
                  augment=args.augment, batches=args.batches, warmup=args.warmup, device=str(ctx.device),
                  torch_threads=torch.get_num_threads(), workers_meaning=WORKERS_MEANING, skipped=skipped,
                  # build_view_loader leaves data.compile at its default: whether the torch and FFCV views compiled
                  augment_compiled=resolve_compile(DataConfig.compile, ctx.device, "data.compile"))
    return new_record("loader", config, rows, describe_device(ctx.device))


COLUMNS = (Column("backend", "backend", justify="left"), Column("image_size", "px", "{:d}"),
           Column("batch", "batch", "{:d}"), Column("workers", "workers", "{:d}"),
           Column("views_per_s", "views/s", "{:.0f}"), Column("images_per_s", "pairs/s", "{:.0f}"),
           Column("ms_per_batch", "ms/batch", "{:.0f}"), Column("cores_busy", "cores busy", "{:.2f}"),
           Column("views_per_core_s", "views/s/core", "{:.0f}"),
           Column("machine_cpu_percent", "machine CPU %", "{:.0f}"), Column("premade_share", "pre-made <=", "{:.0%}"),
           Column("skipped", "skipped", justify="left"))

PREMADE_CAPTION = ("pre-made <= : the loader's queue over the timed batches, the most of them it can have prepared "
                   "before the window opened; above 25% the rate can overstate the loader's own (time more batches)")


def show(record: BenchRecord) -> None:
    c = record.config
    print_table(f"bench loader: {c['augment']} views to {c['device']} on {record.device}", COLUMNS, record.figures,
                caption="views/s after warm-up, device-synchronised; cores busy = CPU-seconds of the process tree "
                        "per second.\n" + PREMADE_CAPTION + "\nworkers: "
                        + "; ".join(f"{k}: {v}" for k, v in c["workers_meaning"].items() if k in c["backends"]),
                console=console())


def plot(record: BenchRecord, path) -> None:
    rows = [r for r in record.figures if r["skipped"] is None]
    several_batches = len({r["batch"] for r in rows}) > 1
    speed, per_core = {}, {}
    for r in rows:
        label = f"{r['backend']} b{r['batch']}" if several_batches else r["backend"]
        for series, key in ((speed, "views_per_s"), (per_core, "views_per_core_s")):
            xs, ys = series.setdefault(label, ([], []))
            xs.append(r["workers"])
            ys.append(r[key] or 0.0)
    c = record.config
    log2 = all(r["workers"] >= 1 for r in rows)  # worker sweeps double: 1, 2, 4, 8
    save_plot(path, [Panel("throughput", "workers", "views/s", speed, logx=log2),
                     Panel("per busy CPU core", "workers", "views/s per core", per_core, logx=log2)],
              suptitle=f"bench loader: {c['image_size']} px {c['augment']} views on {record.device} "
                       f"@ {record.git_commit[:12]}")
