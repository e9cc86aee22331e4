"""`bench loss`: peak memory and forward+backward time of each contrastive-loss impl over N and D.

N is the side of the similarity matrix: SimCLR's nt_xent on N/2 images (N views, each an anchor against the
other N-1), or MoCo v3's info_nce with N queries against N keys. Times are the median wall time of one
forward+backward over --repeats runs, after a warm-up.

How memory is measured (the honest part): every (impl, N, D) point runs in a fresh Python process, so
nothing an earlier point allocated or cached counts. On CUDA: the caching allocator's peak
(max_memory_allocated) during one forward+backward, minus what was allocated before it (the inputs). On a
CPU: the peak resident set of the process during one forward+backward (Linux VmHWM, reset through
/proc/self/clear_refs just before the call) minus the resident set before it -- real memory, allocator
overhead included, not only tensor bytes. Where the peak cannot be reset, the bound reported is the
lifetime peak minus the resident set before, marked as an upper bound in the config.

Points that would not fit or run too long are skipped with the reason: time is extrapolated from the
previous N of the same impl (quadratic in N), memory likewise (quadratic for naive, linear for the fused
impls; before any point is measured, naive is assumed to hold four N x N fp32 buffers).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastssl.bench.record import BenchRecord, Column, Panel, describe_device, new_record, print_table, save_plot
from fastssl.errors import UserError, resolve_device

HELP = "peak memory and forward+backward time of the contrastive loss impls over N and D"
IMPLS = ("naive", "chunked", "triton")
LOSSES = ("nt_xent", "info_nce")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_METHOD = {
    "cuda": "CUDA allocator peak (max_memory_allocated) during one fwd+bwd, above the inputs; fresh process",
    "cpu": "peak RSS (VmHWM reset via /proc/self/clear_refs) during one fwd+bwd, above the RSS before; "
           "fresh process",
    "cpu-upper-bound": "lifetime peak RSS minus the RSS before one fwd+bwd (VmHWM could not be reset): an "
                       "upper bound; fresh process",
}


def add_arguments(p) -> None:
    p.add_argument("--n", default="1024,4096,8192,32768,131072,262144",
                   help="similarity-matrix sides to sweep, comma-separated (default: %(default)s)")
    p.add_argument("--d", default="128,256", help="feature widths, comma-separated (default: %(default)s)")
    p.add_argument("--impl", default="", help="impls to compare (default: naive,chunked and triton when it runs)")
    p.add_argument("--loss", default="nt_xent", help=f"one of {', '.join(LOSSES)} (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    p.add_argument("--dtype", default="fp32", help=f"input dtype: {', '.join(DTYPES)} (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="skip points whose extrapolated run time exceeds this (default: %(default)s)")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated positive integers such as 1024,4096") from None
    if any(v <= 0 for v in values):
        raise UserError(f"{option} {text!r}: expected positive integers")
    return values


def _resolve(args) -> dict:
    from fastssl.losses import triton_infonce

    device = resolve_device(args.device)
    if args.loss not in LOSSES:
        raise UserError(f"--loss {args.loss!r}; valid: {', '.join(LOSSES)}")
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype!r}; valid: {', '.join(DTYPES)}")
    if not args.temperature > 0 or args.repeats < 1 or not args.max_seconds > 0:
        raise UserError(f"--temperature {args.temperature}, --repeats {args.repeats}, --max-seconds "
                        f"{args.max_seconds}: expected all > 0 (repeats >= 1)")
    ns, ds = _int_list(args.n, "--n"), _int_list(args.d, "--d")
    if args.loss == "nt_xent" and any(n % 2 for n in ns):
        raise UserError(f"--n {args.n!r}: nt_xent needs even N (N/2 images, two views each)")
    triton_reason = triton_infonce.unavailable_reason(torch.device(device), max(ds))
    impls = [i.strip() for i in args.impl.split(",")] if args.impl else \
        ["naive", "chunked"] + (["triton"] if triton_reason is None else [])
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise UserError(f"--impl {args.impl!r}: unknown {', '.join(unknown)}; valid: {', '.join(IMPLS)}")
    if impls == ["triton"] and triton_reason is not None:
        raise UserError(f"--impl triton cannot run: {triton_reason}")
    return dict(device=device, loss=args.loss, dtype=args.dtype, temperature=args.temperature,
                repeats=args.repeats, max_seconds=args.max_seconds, n=ns, d=ds, impls=impls,
                triton_unavailable=triton_reason)


def _skip_reason(impl: str, n: int, prev: dict | None, cfg: dict, free_bytes: float) -> str | None:
    if prev is None:
        est_bytes = 16.0 * n * n if impl == "naive" else 0.0
    else:
        growth = n / prev["n"]
        est_bytes = prev["peak_mib"] * 2**20 * (growth ** 2 if impl == "naive" else growth)
        est_s = prev["time_s"] * growth ** 2 * (cfg["repeats"] + 1)
        if est_s > cfg["max_seconds"]:
            return f"time ~{est_s:.0f} s > {cfg['max_seconds']:g} s"
    if est_bytes > 0.8 * free_bytes:
        return f"memory ~{est_bytes / 2**30:.1f} GiB > 80% of {free_bytes / 2**30:.1f} GiB free"
    return None


def _free_bytes_cpu() -> float:
    match = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return float(match.group(1)) * 1024 if match else float("inf")


def _measure(point: dict, timeout: float) -> dict:
    """One point in a fresh process (see the module docstring for why)."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run([sys.executable, "-m", "fastssl.bench.loss", "--worker", json.dumps(point)],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        if proc.returncode in (-9, 137):
            return {"skipped": "killed by the OS (out of memory?)"}
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"worker failed: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> BenchRecord:
    from fastssl.losses import triton_infonce

    cfg = _resolve(args)
    rows = []
    free = _free_bytes_cpu() if cfg["device"] == "cpu" else float("inf")
    memory_method = None
    for d in cfg["d"]:
        for impl in cfg["impls"]:
            prev = None
            for n in cfg["n"]:
                row = dict(impl=impl, n=n, d=d, time_s=None, peak_mib=None, loss_value=None, skipped=None)
                row["skipped"] = (cfg["triton_unavailable"] if impl == "triton" else None) or \
                    _skip_reason(impl, n, prev, cfg, free)
                if row["skipped"] is None:
                    print(f"bench loss: {impl} N={n} D={d} ...", file=sys.stderr, flush=True)
                    point = dict(impl=impl, n=n, d=d, **{k: cfg[k] for k in ("device", "loss", "dtype",
                                                                            "temperature", "repeats")})
                    result = _measure(point, timeout=max(120.0, 3 * cfg["max_seconds"]))
                    row.update({k: result.get(k) for k in ("time_s", "peak_mib", "loss_value", "skipped")})
                    memory_method = result.get("memory_method", memory_method)
                    free = result.get("free_bytes", free)
                    if row["skipped"] is None:
                        prev = row
                rows.append(row)
    _add_ratios(rows)
    config = {k: cfg[k] for k in ("loss", "dtype", "temperature", "repeats", "max_seconds", "n", "d", "impls")}
    config["memory_method"] = MEMORY_METHOD[memory_method or cfg["device"]]
    # What the matmuls ran in: torch's setting (naive, chunked) and the triton kernel's tl.dot precision.
    config["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    if "triton" in cfg["impls"] and cfg["triton_unavailable"] is None:
        config["triton_dot_precision"] = triton_infonce.dot_precision(DTYPES[cfg["dtype"]])
    return new_record("loss", config, rows, describe_device(cfg["device"]))


def _add_ratios(rows: list[dict]) -> None:
    naive = {(r["n"], r["d"]): r for r in rows if r["impl"] == "naive" and r["skipped"] is None}
    for r in rows:
        ref = naive.get((r["n"], r["d"]))
        ok = ref is not None and r["skipped"] is None
        r["memory_saving"] = ref["peak_mib"] / max(r["peak_mib"], 1e-3) if ok else None
        r["time_vs_naive"] = r["time_s"] / ref["time_s"] if ok else None


COLUMNS = (Column("impl", "impl", justify="left"), Column("n", "N", "{:d}"), Column("d", "D", "{:d}"),
           Column("time_s", "fwd+bwd s"), Column("peak_mib", "peak MiB"),
           Column("memory_saving", "mem saving"), Column("time_vs_naive", "time ratio"),
           Column("loss_value", "loss", "{:.5f}"), Column("skipped", "skipped (estimate)", justify="left", wrap=True))


def show(record: BenchRecord) -> None:
    c = record.config
    print_table(f"bench loss: {c['loss']} {c['dtype']} on {record.device}", COLUMNS, record.figures,
                caption=f"mem saving = naive peak / impl peak; time ratio = impl time / naive time (same N, D).\n"
                        f"memory: {c['memory_method']}")


def plot(record: BenchRecord, path) -> None:
    memory, seconds = {}, {}
    for r in record.figures:
        if r["skipped"] is None:
            label = f"{r['impl']} D={r['d']}"
            for series, key in ((memory, "peak_mib"), (seconds, "time_s")):
                xs, ys = series.setdefault(label, ([], []))
                xs.append(r["n"])
                ys.append(r[key])
    c = record.config
    save_plot(path, [Panel("peak memory, one fwd+bwd", "N (similarity-matrix side)", "MiB", memory, True, True),
                     Panel("time, one fwd+bwd", "N (similarity-matrix side)", "seconds", seconds, True, True)],
              suptitle=f"{c['loss']} {c['dtype']} on {record.device} @ {record.git_commit[:12]}")


# --- the worker: one point, in its own process ------------------------------------------------------------

def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _worker(point: dict) -> dict:
    from fastssl import losses

    device, dtype = torch.device(point["device"]), DTYPES[point["dtype"]]
    t, impl = point["temperature"], point["impl"]

    def inputs(n: int):
        g = torch.Generator(device="cpu").manual_seed(0)
        rows = n // 2 if point["loss"] == "nt_xent" else n
        return [torch.randn(rows, point["d"], generator=g).to(device, dtype).requires_grad_() for _ in range(2)]

    def step(x, y) -> tuple[float, float]:
        x.grad = y.grad = None
        start = time.perf_counter()
        fn = losses.nt_xent if point["loss"] == "nt_xent" else losses.info_nce
        loss = fn(x, y, t, impl=impl)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, loss.item()

    step(*inputs(64))  # kernels compiled, BLAS initialised: not part of any figure
    x, y = inputs(point["n"])
    out = {}
    if device.type == "cuda":
        step(x, y)  # full-size warm-up: the allocator's peak is reset below, so it costs only time
        x.grad = y.grad = None  # as each step starts: the peak below then counts the gradients, as on the CPU
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runs = [step(x, y)]
        out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        out["memory_method"] = "cuda"
        out["free_bytes"] = float(torch.cuda.mem_get_info(device)[0])
    else:
        before = _status_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
            out["memory_method"] = "cpu"
        except OSError:
            out["memory_method"] = "cpu-upper-bound"
        runs = [step(x, y)]
        out["peak_mib"] = (_status_kib("VmHWM") - before) / 1024
        out["free_bytes"] = _free_bytes_cpu()
    runs += [step(x, y) for _ in range(point["repeats"] - 1)]
    out["time_s"] = statistics.median(r[0] for r in runs)  # the first run, which also measured memory, included
    out["loss_value"] = runs[0][1]  # every impl should print the same value here
    return out


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    spec = json.loads(sys.argv[2])
    try:
        result = _worker(spec)
    except torch.cuda.OutOfMemoryError:
        result = {"skipped": "out of memory (CUDA)"}
    print(json.dumps(result))
