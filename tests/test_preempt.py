"""DataLoader workers under stop signals (fastssl/preempt.py): a cluster's SIGTERM to every process of the job
must not kill them (their loader would raise in the trainer before its checkpoint), but their own parent's
SIGTERM (multiprocessing's clean-up of leftover children at exit) must still end them, or a crashed trainer
never exits. The stop decision itself is tested with the trainer (test_train.py, test_distributed.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from conftest import ROOT

_TRAINER = r'''
import os, sys
from torch.utils.data import DataLoader, Dataset
from fastssl.preempt import ignore_in_workers

class Pids(Dataset):
    def __len__(self): return 10**6
    def __getitem__(self, i): return os.getpid()

it = iter(DataLoader(Pids(), batch_size=4, num_workers=2, persistent_workers=True, worker_init_fn=ignore_in_workers))
print(*sorted({int(p) for _ in range(4) for p in next(it)}), flush=True)
sys.stdin.readline()                              # the job's SIGTERM reaches the workers meanwhile
print(len([next(it) for _ in range(8)]), flush=True)
raise RuntimeError("a crash with the loader alive")
'''


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent to reap it has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_outlive_the_jobs_sigterm_but_not_their_parents_exit():
    proc = subprocess.Popen([sys.executable, "-c", _TRAINER], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    workers = []
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2 and proc.pid not in workers, proc.stderr.read()
        for pid in workers:
            os.kill(pid, signal.SIGTERM)  # from this process, as from the cluster: not the workers' parent
            os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
        assert all(_alive(pid) for pid in workers)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)  # before the fix, exit waited on the workers for ever
    finally:
        proc.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert out.split() == ["8"], err  # the workers kept serving batches after the signals
    assert proc.returncode == 1 and "RuntimeError: a crash with the loader alive" in err
    deadline = time.time() + 10
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)
