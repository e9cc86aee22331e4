"""`bench model`: the training step minus I/O, through the code training runs.

A uint8 batch already on the device goes through the augmentation operators (`ops.make_view` on crop
boxes from `ops.sample_crop_boxes`, as the torch and FFCV backends do), then fastssl/step.py's step
(fastssl/bench/trainstep.py: method, autocast, backward, optimiser, after_step). Its images/s is the
ceiling the real loader is measured against (`bench step`), and its FLOPs (counted, fastssl/bench/flops.py)
give achieved TFLOP/s and, on GPUs in the peak table, MFU.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fastssl.bench import flops
from fastssl.bench.augment import SyntheticViews
from fastssl.bench.record import BenchRecord, Column, Panel, describe_device, new_record, print_table, save_plot
from fastssl.bench.sweep import check_minimums, check_names, console, grid, note, parse_list, with_oom_backoff
from fastssl.bench.timing import TimedWindow
from fastssl.bench.trainstep import TrainingStep
from fastssl.config import Config, apply_overrides, config_from_dict, load_yaml
from fastssl.errors import UserError, resolve_compile
from fastssl.recipe_checks import check_values
from fastssl.step import make_accelerator

from pipelines.augment import spec_for

# The demo's, found from the checkout rather than the current folder (the other tools take no default path).
DEFAULT_RECIPE = str(Path(__file__).resolve().parents[2] / "recipes/simclr_resnet18_synthetic.yaml")
# On a CPU the demo's step (ResNet-18, 32 px, ImageNet stem) costs ~0.44 GFLOP per image: batch 32 and 3 steps
# keep one configuration to seconds on 2 cores. On a GPU the recipe's batch and enough steps to average.
CPU_DEFAULTS = dict(batch=32, steps=3, warmup=1)
GPU_DEFAULTS = dict(steps=20, warmup=5)


FLOPS_BATCH = 16  # images per view in the eager FLOP count


@dataclass(frozen=True)
class ModelFigures:
    method: str
    encoder: str
    image_size: int
    batch: int  # per process
    compiled: bool  # the networks (model.compile)
    augment_compiled: bool  # the views (data.compile)
    precision: str
    steps: int
    images_per_s: float
    step_ms: float
    gflops_per_image: float | None  # forward + backward of the method, counted
    tflops: float | None  # achieved
    peak_tflops: float | None  # the device's dense peak for math_dtype; None on CPUs
    math_dtype: str
    mfu: float | None
    cores_busy: float
    machine_cpu_percent: float
    peak_mem_gib: float | None  # CUDA allocator peak; None on CPUs


def bench_model(cfg: Config, accelerator, steps: int, warmup: int, source_size: int = 0,
                count: bool = True) -> ModelFigures:
    """Images/s of the training step on a synthetic batch of cfg.data.batch_size (global) images."""
    device = accelerator.device
    spec = spec_for(cfg.data)  # the recipe's augmentations, data.crop_scale included, as train.py builds them
    batch = cfg.data.batch_size // accelerator.num_processes
    augment_compiled = resolve_compile(cfg.data.compile, device, "data.compile")
    synthetic = SyntheticViews(spec, batch, source_size or cfg.data.image_size, device, cfg.seed, augment_compiled)
    step = TrainingStep(cfg, accelerator)
    try:
        flops_per_step = None
        if count:
            # Counted eagerly on a small batch and scaled: at the full batch the eager count could run out of
            # memory where the compiled step fits, and would set the compiled row's peak memory. FLOPs grow
            # linearly with the batch but for the loss's N x N products (< 0.1% of ResNet-50's or ViT-S's
            # at batch 1024).
            small = min(batch, FLOPS_BATCH)
            probe = SyntheticViews(spec, small, source_size or cfg.data.image_size, device, cfg.seed)
            flops_per_step = step.count_flops(probe()) * batch // small
            del probe
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):  # compilation, cuDNN autotuning and allocator growth happen here
            step(synthetic())
        window = TimedWindow(device)
        window.start()
        for _ in range(steps):
            step(synthetic())
        w = window.stop()
    finally:
        step.close()
    steps_per_s = steps / w.wall_s
    math_dtype, peak = flops.device_peak(device, step.precision if step.precision != "no" else "fp32")
    return ModelFigures(
        method=cfg.method.name, encoder=cfg.model.encoder, image_size=cfg.data.image_size, batch=batch,
        compiled=step.compiled, augment_compiled=augment_compiled, precision=step.precision, steps=steps,
        images_per_s=batch * steps_per_s, step_ms=1000.0 / steps_per_s,
        gflops_per_image=flops_per_step / batch / 1e9 if flops_per_step else None,
        tflops=flops.achieved_tflops(flops_per_step, steps_per_s) if flops_per_step else None,
        peak_tflops=peak, math_dtype=math_dtype,
        mfu=flops.mfu(flops_per_step, steps_per_s, peak) if flops_per_step else None,
        cores_busy=w.cores_busy, machine_cpu_percent=w.machine_cpu_percent,
        peak_mem_gib=torch.cuda.max_memory_allocated(device) / (1 << 30) if device.type == "cuda" else None)


# --- command line (shared with `bench step`) -------------------------------------------------------------

def add_training_arguments(p) -> None:
    p.add_argument("overrides", nargs="*", default=[], metavar="section.key=value",
                   help="recipe overrides, as tools/train.py")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="recipe YAML (default: %(default)s, the demo)")
    p.add_argument("--batch", default="", help="global batch sizes, comma-separated (default: the recipe's on a "
                   f"GPU, {CPU_DEFAULTS['batch']} on a CPU); halved on out-of-memory down to --min-batch")
    p.add_argument("--min-batch", type=int, default=8, help="smallest batch the OOM back-off tries (default: 8)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default: "
                   f"{GPU_DEFAULTS['steps']} on a GPU, {CPU_DEFAULTS['steps']} on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: "
                   f"{GPU_DEFAULTS['warmup']} on a GPU, {CPU_DEFAULTS['warmup']} on a CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")


def add_arguments(p) -> None:
    add_training_arguments(p)
    p.add_argument("--method", default="", help="methods, comma-separated (default: the recipe's)")
    p.add_argument("--encoder", default="", help="encoders, comma-separated (default: the recipe's)")
    p.add_argument("--compile", default="", help="false | true | false,true: eager and/or torch.compile "
                   "(default: false,true on a GPU, false on a CPU, where compiling takes 60-90 s per model)")
    p.add_argument("--source-size", type=int, default=0,
                   help="side of the synthetic uint8 images the views are cut from (default: the image size)")


def method_names() -> list[str]:
    """Every registered method: importing fastssl.methods' modules registers them."""
    import fastssl.methods as methods
    from fastssl.methods import METHODS

    for info in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"fastssl.methods.{info.name}")
    return METHODS.names()


def resolve_training(args) -> dict:
    """Recipe + overrides checked once, device chosen, defaults for the device filled in."""
    # None = the device's default; 0 is a value the user typed, not "unset".
    check_minimums(("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--min-batch", args.min_batch, 1))
    base = apply_overrides(load_yaml(args.recipe), list(args.overrides))
    cfg = config_from_dict(base)
    check_values(cfg)  # the trainer's range checks (seed, lr, grad_accum, ...): the same one-line refusals
    accelerator = make_accelerator(cfg.train.precision, args.device)
    cpu = accelerator.device.type == "cpu"
    defaults = CPU_DEFAULTS if cpu else dict(GPU_DEFAULTS, batch=cfg.data.batch_size)
    batches = parse_list(args.batch, "--batch", minimum=1) if args.batch else [defaults["batch"]]
    steps = defaults["steps"] if args.steps is None else args.steps
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    return dict(base=base, cfg=cfg, accelerator=accelerator, batches=batches, steps=steps, warmup=warmup,
                min_batch=args.min_batch)


def config_for(base: dict, **values) -> Config:
    """The recipe with sweep values ("section.key": value) set, checked by the recipe's strict loader.

    Typed values, not `key=value` strings: YAML would read model.compile=false as a bool, not the string
    the config expects.
    """
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in values.items():
        section, name = key.split(".")
        d[section] = dict(d.get(section) or {}, **{name: value})
    return config_from_dict(d)


def run(args) -> BenchRecord:
    t = resolve_training(args)
    cfg = t["cfg"]
    methods = parse_list(args.method, "--method", str) if args.method else [cfg.method.name]
    encoders = parse_list(args.encoder, "--encoder", str) if args.encoder else [cfg.model.encoder]
    on_cpu = t["accelerator"].device.type == "cpu"
    compiles = (parse_list(args.compile, "--compile", str) if args.compile
                else ["false"] if on_cpu else ["false", "true"])
    from fastssl.encoders import encoder_names

    check_names(methods, method_names(), "--method")
    check_names(encoders, encoder_names(), "--encoder")
    check_names(compiles, ["false", "true"], "--compile")
    if args.source_size < 0 or 0 < args.source_size < 8:
        raise UserError(f"--source-size {args.source_size}; expected 0 (the image size) or at least 8 pixels")
    acc = t["accelerator"]
    # --compile switches the augmentation too (the trainer's data.compile), unless an override pins it.
    pinned_augment = any(o.startswith("data.compile=") for o in args.overrides)
    rows = []
    for point in grid(method=methods, encoder=encoders, compile=compiles, batch=t["batches"]):
        note(f"model {point['method']} / {point['encoder']} batch {point['batch']} compile={point['compile']}")

        def measure(batch: int, point=point) -> ModelFigures:
            c = config_for(t["base"], **{"method.name": point["method"], "model.encoder": point["encoder"],
                                         "model.compile": point["compile"], "data.batch_size": batch,
                                         **({} if pinned_augment else {"data.compile": point["compile"]})})
            return bench_model(c, acc, t["steps"], t["warmup"], args.source_size)

        result = with_oom_backoff(measure, point["batch"], t["min_batch"], acc.device, on_retry=note)
        rows.append(dict(asdict(result.value), batch_requested=point["batch"]))
    config = dict(recipe=args.recipe, overrides=list(args.overrides), method=methods, encoder=encoders,
                  compile=compiles, batch=t["batches"], steps=t["steps"], warmup=t["warmup"],
                  source_size=args.source_size or cfg.data.image_size, min_batch=t["min_batch"],
                  torch_threads=torch.get_num_threads())
    return new_record("model", config, rows, describe_device(acc.device))


COLUMNS = (Column("method", "method", justify="left"), Column("encoder", "encoder", justify="left"),
           Column("image_size", "px", "{:d}"), Column("batch", "batch", "{:d}"), Column("compiled", "compiled"),
           Column("precision", "precision"), Column("images_per_s", "images/s", "{:.1f}"),
           Column("step_ms", "step ms", "{:.0f}"), Column("gflops_per_image", "GFLOP/img", "{:.2f}"),
           Column("tflops", "TFLOP/s", "{:.3g}"), Column("mfu", "MFU", "{:.1%}"),
           Column("cores_busy", "cores busy", "{:.2f}"), Column("peak_mem_gib", "peak GiB", "{:.1f}"))


def show(record: BenchRecord) -> None:
    print_table(f"bench model on {record.device}", COLUMNS, record.figures,
                caption="images/s: training step on a synthetic uint8 batch already on the device (augmentation "
                        "+ encoder + loss + optimiser).\nGFLOP/img: forward+backward counted by torch's "
                        "FlopCounterMode; MFU against the device's dense peak (none for CPUs).",
                console=console())


def config_label(r: dict) -> str:
    return f"{r['method']}/{r['encoder']} {r['image_size']}px b{r['batch']}"


def plot(record: BenchRecord, path) -> None:
    labels = list(dict.fromkeys(config_label(r) for r in record.figures))
    ips, util = {}, {}
    use_mfu = any(r["mfu"] is not None for r in record.figures)
    for mode in ("eager", "compiled"):
        rows = {config_label(r): r for r in record.figures if r["compiled"] == (mode == "compiled")}
        if rows:
            ips[mode] = (labels, [rows[k]["images_per_s"] if k in rows else 0.0 for k in labels])
            key = "mfu" if use_mfu else "tflops"
            util[mode] = (labels, [(rows[k][key] or 0.0) if k in rows else 0.0 for k in labels])
    save_plot(path, [Panel("training step minus I/O", "configuration", "images/s", ips, bars=True),
                     Panel("model-FLOPs utilisation" if use_mfu else "achieved FLOP rate", "configuration",
                           "MFU" if use_mfu else "TFLOP/s", util, bars=True)],
              suptitle=f"bench model on {record.device} @ {record.git_commit[:12]}")
