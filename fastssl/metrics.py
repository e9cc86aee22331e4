"""metrics.jsonl and the terminal progress display (main process only)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from fastssl.fileio import write_atomic


class MetricsLog:
    """One JSON record per line. A new run starts the file afresh (a run restarted before its first checkpoint
    leaves nothing to keep); on resume (resume_step: the checkpoint's step) the records after that step, which
    the resumed run writes again, and a line cut short by a crash are dropped first."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        if enabled and resume_step is not None and path.exists():
            _truncate_after(path, resume_step)
        self._f = open(path, "w" if resume_step is None else "a") if enabled else None

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _whole_records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of each line that is a JSON object; a line cut short by a crash is not one, nor one whose
    bytes are not text (the writer writes ASCII JSON: such a line is damage, skipped like a cut one)."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append((line, record))
    return out


def read_records(path: Path) -> list[dict]:
    return [record for _, record in _whole_records(path)] if path.exists() else []


def _truncate_after(path: Path, step: int) -> None:
    kept = [line for line, record in _whole_records(path) if record.get("step", 0) <= step]
    write_atomic(path, "".join(f"{line}\n" for line in kept))


class Progress:
    """Per-step status (`enabled`): a rich progress bar on a terminal, plain log lines elsewhere (CI logs, `make
    demo | tee`). `print` is for what a user must see whether or not steps are shown (the start-up summary,
    warnings): it prints on the main process."""

    def __init__(self, total: int, start: int, enabled: bool, main: bool = True):
        self.enabled, self.main = enabled and main, main
        self._bar = None
        self._t0 = time.time()
        if self.enabled and sys.stdout.isatty():  # one bar, the main process's
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeRemainingColumn

            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeRemainingColumn())
            self._task = self._bar.add_task("train", total=total, completed=start, status="")
            self._bar.start()

    def update(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        status = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                          if k not in ("step", "epoch"))
        if self._bar is not None:
            self._bar.update(self._task, completed=step, status=status)
        else:
            print(f"step {step} epoch {record.get('epoch', 0)} {status}", flush=True)

    def print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text)
        elif self.main:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def images_per_s(windows: list[tuple[int, float]]) -> float:
    """All images over all seconds of the logging windows but the first, which pays worker start-up and
    allocator warm-up. (Not the mean of the windows' rates: a slow window holds as many images as a fast one
    and more of the time, so that mean overstates.)"""
    timed = windows[1:] or windows
    return float(sum(i for i, _ in timed) / sum(t for _, t in timed)) if timed else 0.0


def logged_windows(records: list[dict], global_batch: int) -> list[tuple[int, float]]:
    """(images, seconds) of each logging window, from metrics.jsonl's steps and rates."""
    out, last = [], 0
    for r in records:
        if "images_per_s" in r and r["images_per_s"] > 0:
            images = (r["step"] - last) * global_batch
            out.append((images, images / r["images_per_s"]))
            last = r["step"]
    return out
