"""A timed window: wall seconds, and the CPU the benchmark's process tree burned while it ran.

CPU is read as CPU-seconds of this process (all its threads: DALI's and FFCV's workers are threads) plus
its live child processes (DataLoader workers), divided by wall seconds: "cores busy", the figure that
answers "how many CPU cores per GPU". The machine-wide utilisation is kept beside it because on a shared
machine other tenants' load slows the benchmark without showing up in its own CPU time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil
import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work: CUDA kernels run asynchronously, so a clock read without this lies."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tree_cpu_seconds(proc: psutil.Process) -> float:
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:  # a worker that exited between listing and reading
            pass
    return total


@dataclass(frozen=True)
class WindowFigures:
    wall_s: float
    cpu_s: float  # CPU-seconds of the process tree over the window
    cores_busy: float  # cpu_s / wall_s
    machine_cpu_percent: float  # all tenants, 100 = every core of the machine busy
    machine_cores: int


class TimedWindow:
    """start() ... stop(): wall time after a device sync at both ends, CPU of the process tree."""

    def __init__(self, device: torch.device):
        self.device = device
        self._proc = psutil.Process()
        self._t0 = self._cpu0 = 0.0

    def start(self) -> None:
        synchronize(self.device)
        psutil.cpu_percent(interval=None)  # resets psutil's machine-wide counter
        self._cpu0 = _tree_cpu_seconds(self._proc)
        self._t0 = time.perf_counter()

    def stop(self) -> WindowFigures:
        synchronize(self.device)
        wall = time.perf_counter() - self._t0
        cpu = _tree_cpu_seconds(self._proc) - self._cpu0
        return WindowFigures(wall, cpu, cpu / wall if wall > 0 else 0.0, psutil.cpu_percent(interval=None),
                             psutil.cpu_count() or 1)
