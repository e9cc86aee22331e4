"""SIGTERM and SIGUSR1 as a request to stop: checkpoint at the next step every process agrees on, then leave.

Clusters announce the end of a job with a signal and kill it a grace period later (SLURM: SIGTERM on
preemption, `scancel` and time-out, then SIGKILL after KillWait, 30 s by default; `sbatch --signal=USR1@120`
asks for SIGUSR1 two minutes before the time limit). A trainer that dies there loses every step since its last
periodic checkpoint. The handler only records the signal; the loop checks it between steps, where the weights
are consistent.

Every process must stop at the same step (checkpointing is collective): one process may get the signal late or
not at all, so on several processes the decision is an all-reduce of one flag every AGREE_EVERY steps (its
host sync costs well under 1% there; torchrun, under `accelerate launch`, forwards SIGTERM to its processes and
kills them 30 s later, so the stop has to come within seconds, not at the next logging step). One process
checks its flag after every step. SIGINT keeps its meaning: Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import threading

import torch

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
AGREE_EVERY = 10  # steps between the processes' agreements on whether to stop


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

    def agreed(self, accelerator, step: int) -> str | None:
        """After `step`: the signal to stop for, the same on every process, or None. On several processes a
        collective every AGREE_EVERY steps, so every process must call it after every step."""
        if accelerator.num_processes == 1:
            return self.received
        if step % AGREE_EVERY:
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
