"""What every `tools/bench.py` subcommand leaves behind: one JSON record, a table, a plot.

The record has a fixed schema (as timm's benchmark results do) so figures from different machines, commits
and subcommands can be compared by a script: who measured (tool version, git commit), where (device and the
versions of torch, CUDA, Triton, DALI, FFCV), what (`kind` = the subcommand, its `config`) and the result
(`figures`, usually one dict per measured row).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastssl
from fastssl.errors import UserError
from fastssl.fileio import write_atomic

SCHEMA_FIELDS = ("tool_version", "git_commit", "device", "versions", "kind", "config", "figures")
VERSION_KEYS = ("torch", "cuda", "triton", "dali", "ffcv")


@dataclass(frozen=True)
class BenchRecord:
    tool_version: str
    git_commit: str
    device: str
    versions: dict[str, str | None]  # VERSION_KEYS; None when not installed
    kind: str  # the subcommand: loss | loader | model | step
    config: dict[str, Any]
    figures: list[dict[str, Any]] | dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> BenchRecord:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"benchmark record is not JSON: {e}") from None
        if not isinstance(d, dict) or set(d) != set(SCHEMA_FIELDS):
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise UserError(f"benchmark record has fields {got}; expected {', '.join(SCHEMA_FIELDS)}")
        return cls(**d)

    def write(self, path: str | Path) -> None:
        write_atomic(path, self.to_json() + "\n")


def new_record(kind: str, config: dict[str, Any], figures, device: str) -> BenchRecord:
    """A record stamped with this checkout, machine and package versions."""
    return BenchRecord(fastssl.__version__, git_commit(), device, package_versions(), kind, config, figures)


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip() if out.returncode == 0 else "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip() if out.returncode == 0 else ""
    return commit + ("-dirty" if dirty else "")


def _distribution_version(*names: str, prefix: str | None = None) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if prefix:  # DALI ships as nvidia-dali-cuda110/120/130...
        for dist in importlib.metadata.distributions():
            if (dist.metadata["Name"] or "").lower().startswith(prefix):
                return dist.version
    return None


def package_versions() -> dict[str, str | None]:
    import torch

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": _distribution_version("triton"),
            "dali": _distribution_version(prefix="nvidia-dali"), "ffcv": _distribution_version("ffcv")}


def describe_device(device) -> str:
    """'NVIDIA H100 80GB HBM3 (79.1 GiB)' or 'cpu: <model> (2 cores)'."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.1f} GiB)"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{device.type}: {model} ({os.cpu_count()} cores)"


# --- terminal table ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    key: str
    header: str
    fmt: str = "{:.3g}"  # applied to numbers; other values are shown as str(), None as an em dash
    justify: str = "right"
    wrap: bool = False  # only free-text columns should wrap; numbers stay on one line


def _cell(value, fmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt.format(value)
    return str(value)


def print_table(title: str, columns: Sequence[Column], rows: Sequence[dict[str, Any]], caption: str = "",
                console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption or None, caption_justify="left")
    for col in columns:
        table.add_column(col.header, justify=col.justify, no_wrap=not col.wrap)
    for row in rows:
        table.add_row(*(_cell(row.get(col.key), col.fmt) for col in columns))
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped to a file or CI log: rich would assume 80 columns and squeeze
            console = Console(width=160)
    console.print(table)


# --- plots -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: dict[str, tuple[Sequence[float], Sequence[float]]] = field(default_factory=dict)  # label -> (x, y)
    logx: bool = False
    logy: bool = False
    bars: bool = False  # grouped bars over categorical x instead of lines


def save_plot(path: str | Path, panels: Sequence[Panel], suptitle: str = "") -> None:
    """One row of panels, written atomically as PNG (matplotlib's Agg backend: no display needed)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        labels = list(panel.series)
        for i, label in enumerate(labels):
            xs, ys = panel.series[label]
            if panel.bars:
                width = 0.8 / max(len(labels), 1)
                pos = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(xs))]
                ax.bar(pos, ys, width=width, label=label)
                ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            else:
                ax.plot(xs, ys, marker="o", label=label)
        if panel.logx and not panel.bars:
            ax.set_xscale("log", base=2)
        # A log axis needs a positive value to show (a CPU run's panel of GPU memory holds none): linear then.
        if panel.logy and any(y is not None and y > 0 for _, ys in panel.series.values() for y in ys):
            ax.set_yscale("log")
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if labels:
            ax.legend(fontsize="small")
    if suptitle:
        fig.suptitle(suptitle, fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
