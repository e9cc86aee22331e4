"""Worker processes of the converters that leave the reaction to Ctrl-C and SIGTERM to their parent.

Ctrl-C reaches every process of the terminal's foreground group, and a scheduler's time limit signals every
process of the job. A worker that died of it printed its own traceback (one per worker) or broke its pool
before the parent's clean-up ran, while the parent, which gets the same signal, raises KeyboardInterrupt (or
fastssl.errors.Terminated) and removes its partial output. So workers ignore both signals and the parent
kills them (SIGKILL: they ignore SIGTERM) as part of that clean-up.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_lock = threading.Lock()
_active = 0  # blocks of children_ignore_stop_signals now open (in any thread)


def _after_fork_in_child() -> None:
    # The first Python code a forked child runs. Blocking the signals across fork() in the parent would close
    # the microseconds before it too, but the parent's own interrupt, when the mask is restored in an at-fork
    # hook, is raised inside that hook and swallowed by os.fork ("Exception ignored"): the conversion went on.
    global _active
    if _active:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        _active = 0  # the child's own children are its business


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def children_ignore_stop_signals() -> Iterator[None]:
    """Processes forked during the block ignore SIGINT and SIGTERM from the first Python code they run, also those a
    library forks itself (ffcv's writer, a ProcessPoolExecutor's workers), which offer no hook early enough.
    The parent's own handling of the signals is unchanged."""
    global _active
    with _lock:
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1


def kill_children_since(before: set) -> None:
    """Kill and reap this process's children that are not in `before` (multiprocessing.active_children())."""
    started = [p for p in multiprocessing.active_children() if p not in before]
    for p in started:
        p.kill()
    for p in started:
        p.join()


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A ProcessPoolExecutor whose workers ignore the stop signals. When the block raises, queued jobs are
    cancelled and the workers killed: the executor's own exit would wait for every queued job first."""
    before = set(multiprocessing.active_children())
    with children_ignore_stop_signals():  # the executor forks its workers on demand, inside map()
        pool = ProcessPoolExecutor(max_workers=workers)
        try:
            yield pool
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            kill_children_since(before)
            raise
        pool.shutdown(wait=True)
