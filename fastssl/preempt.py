"""SIGTERM and SIGUSR1 as a request to stop: checkpoint at the next step every process agrees on, then leave.

Clusters announce the end of a job with a signal and kill it a grace period later (SLURM: SIGTERM on
preemption, `scancel` and time-out, then SIGKILL after KillWait, 30 s by default; `sbatch --signal=USR1@120`
asks for SIGUSR1 two minutes before the time limit). A trainer that dies there loses every step since its last
periodic checkpoint. The handler only records the signal; the loop checks it between steps, where the weights
are consistent.

Every process must stop at the same step (checkpointing is collective): one process may get the signal late or
not at all, so on several processes the decision is an all-reduce, taken on logging steps, where the loop
synchronises anyway. One process checks its flag after every step. SIGINT keeps its meaning: Ctrl-C stops at
once.
"""

from __future__ import annotations

import signal
import threading

import torch

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Context manager installing the handlers (main thread only; elsewhere it never fires)."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def agreed(self, accelerator, logging_step: bool) -> str | None:
        """The signal to stop for, the same on every process, or None. A collective on several processes, so
        every process must call it at the same steps (`logging_step` is a function of the step)."""
        if accelerator.num_processes == 1:
            return self.received
        if not logging_step:
            return None
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return (self.received or "a signal on another process") if flag.item() > 0 else None


def ignore_in_workers(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: a cluster signals every process of the job, and a worker killed by SIGTERM
    makes its DataLoader raise in the trainer before the checkpoint is written. Workers ignore the stop
    signals; the trainer shuts them down when it leaves."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
