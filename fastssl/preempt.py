"""SIGTERM and SIGUSR1 as a request to stop: checkpoint at the next step every process agrees on, then leave.

Clusters announce the end of a job with a signal and kill it a grace period later (SLURM: SIGTERM on
preemption, `scancel` and time-out, then SIGKILL after KillWait, 30 s by default; `sbatch --signal=TERM@120`
asks for it two minutes before the time limit). A trainer that dies there loses every step since its last
periodic checkpoint. The handler only records the signal; the loop checks it between steps, where the weights
are consistent. SIGUSR1 is honoured too, but torchrun's agent (under `accelerate launch` on several processes)
dies of it unless TORCHELASTIC_SIGNALS_TO_HANDLE lists it: SIGTERM is the signal to use there.

Every process must stop at the same step (checkpointing is collective): one process may get the signal late or
not at all, so on several processes the decision is an all-reduce of one flag, with a host sync, every
AGREE_EVERY steps (not at every step, which would stall the GPU queue each time; not only at logging steps:
torchrun, under `accelerate launch`, forwards SIGTERM to its processes and kills them 30 s later, so the stop
has to come within seconds). One process checks its flag after every step. SIGINT keeps its meaning: Ctrl-C
stops at once.
"""

from __future__ import annotations

import os
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
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
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
    signals from anyone but their parent: the trainer's own shutdown of them (DataLoader's, or
    multiprocessing's SIGTERM to leftover children at exit, after a crash) still ends them at once."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # inherited by the thread below, which takes them
    threading.Thread(target=_exit_on_parents_signal, args=(os.getppid(),), daemon=True,
                     name="fastssl-stop-signals").start()


def _exit_on_parents_signal(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(SIGNALS)
        if info.si_pid == parent or os.getppid() != parent:
            os._exit(128 + info.si_signo)  # as the default action would end it
