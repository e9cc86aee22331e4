"""Sweeps over benchmark settings, and the OOM back-off that finds the largest batch that fits.

A sweep is the cartesian product of comma-separated lists (`--batch 256,1024 --workers 1,2`), run in the
order given so the table reads like the command. Out of memory at a batch, the benchmark halves it and
tries again (as timm's benchmark does), down to a minimum; a batch that never fits is a UserError that
carries the memory figures, because "out of memory" alone does not tell a user whether to buy a bigger
card or lower the resolution.
"""

from __future__ import annotations

import gc
import itertools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastssl.errors import UserError

# What the allocators say when they give up: CUDA's caching allocator raises torch.cuda.OutOfMemoryError
# (a RuntimeError) "CUDA out of memory"; older paths and other back-ends raise a plain RuntimeError with
# "out of memory"; the CPU allocator says "can't allocate memory"; MPS says "MPS backend out of memory";
# cuBLAS and cuDNN, asking for workspace when the cache is full, report their own allocation failures.
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")


def note(text: str) -> None:
    """Progress of a sweep, on stderr: stdout carries only the table."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


def console():
    """rich's Console, wide when not on a terminal: the tables have ~12 columns and rich wraps at 80."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def parse_list(text: str, option: str, kind: type = int, minimum: int | None = None) -> list:
    """'256,1024' -> [256, 1024]; a one-line UserError naming the option for anything else."""
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise UserError(f"{option} {text!r}: expected a comma-separated list such as 1,2,4")
    out = []
    for t in items:
        try:
            v = kind(t)
        except ValueError:
            raise UserError(f"{option} {text!r}: {t!r} is not {'an integer' if kind is int else 'valid'}") from None
        if minimum is not None and v < minimum:
            raise UserError(f"{option} {text!r}: {v} is below the minimum {minimum}")
        out.append(v)
    return list(dict.fromkeys(out))  # a repeated value would only measure the same thing twice


def check_minimums(*checks: tuple[str, int | None, int]) -> None:
    """(option, value, minimum) triples, before anything is measured; a value of None is "not given"."""
    for option, value, minimum in checks:
        if value is not None and value < minimum:
            raise UserError(f"{option} {value}; expected an integer >= {minimum}")


def check_names(names: Sequence[str], valid: Sequence[str], what: str) -> None:
    """Unknown names fail before anything is measured, listing the valid ones."""
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise UserError(f"unknown {what} {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """Every combination of the axes, the first axis varying slowest."""
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]


def fresh_compile_caches() -> None:
    """Drop dynamo's graphs of earlier rows before a compiled row builds its own. Every new network instance,
    batch size or grad mode adds an entry to the same forward's cache, and past dynamo's recompile limit (8 per
    function) a sweep would fall back to eager, with a warning only, and report eager speeds as compiled ones."""
    torch._dynamo.reset()


def is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, (RuntimeError, MemoryError)) and (
        isinstance(error, MemoryError) or any(m in str(error).lower() for m in _OOM_MESSAGES))


def release_memory() -> None:
    """Give the failed attempt's tensors back before the next one (the caching allocator keeps them)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_figures(device: torch.device | str | None = None) -> str:
    """The memory a user needs to judge an OOM: total, free and this process's peak, in GiB."""
    device = torch.device(device) if device is not None else None
    gib = 1 << 30
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        peak = torch.cuda.max_memory_allocated(device)
        name = torch.cuda.get_device_name(device)
        return (f"{name}: {total / gib:.1f} GiB total, {free / gib:.1f} GiB free, "
                f"peak allocated by this process {peak / gib:.1f} GiB")
    import psutil

    vm = psutil.virtual_memory()
    rss = psutil.Process().memory_info().rss
    return (f"host RAM: {vm.total / gib:.1f} GiB total, {vm.available / gib:.1f} GiB available, "
            f"this process {rss / gib:.1f} GiB resident")


@dataclass
class Backoff:
    """The outcome of `with_oom_backoff`: the value at the batch that fitted, and every batch tried."""

    value: Any
    batch: int
    tried: list[int] = field(default_factory=list)

    @property
    def reduced(self) -> bool:
        return self.batch != self.tried[0]


def with_oom_backoff(run: Callable[[int], Any], batch: int, min_batch: int = 2,
                     device: torch.device | str | None = None,
                     on_retry: Callable[[str], None] | None = None) -> Backoff:
    """run(batch); on out-of-memory halve the batch and retry while it stays >= min_batch.

    `run` must build everything it allocates (model, optimiser, loader) itself, so that a failed attempt
    leaves nothing referenced once it has unwound.
    """
    if batch < 1 or min_batch < 1:
        raise UserError(f"batch {batch} and minimum batch {min_batch} must be positive")
    tried: list[int] = []
    b = batch
    while True:
        tried.append(b)
        failure = ""
        try:
            return Backoff(run(b), b, tried)
        except Exception as e:  # noqa: BLE001 - only OOMs are handled; everything else is re-raised
            if not is_oom(e):
                raise
            failure = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # Outside the except block: the traceback (and the tensors its frames hold) is gone by now.
        release_memory()
        if b // 2 < min_batch:
            raise UserError(f"batch {batch} does not fit: out of memory at every batch tried "
                            f"({', '.join(map(str, tried))}; smallest allowed {min_batch}): {failure[:200]}; "
                            f"{memory_figures(device)}")
        if on_retry is not None:
            on_retry(f"batch {b} ran out of memory; retrying at {b // 2}")
        b //= 2
