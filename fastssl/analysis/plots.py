"""The PNGs: augmented views, training curves, a CKA heatmap, attention maps.

matplotlib runs on its Agg backend (no display on training machines). Every figure is written to a
temporary file in the target folder and renamed into place, so an interrupted run never leaves a
half-written PNG where a good one was.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from fastssl.errors import UserError
from fastssl.fileio import check_output_file, write_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_png_path(out: str | os.PathLike) -> Path:
    """A .png path that can be created (fileio.check_creatable); checked before any work is done."""
    return check_output_file(out, "--out", suffix=".png")


def save_figure(fig, out: str | os.PathLike, dpi: int = 110) -> Path:
    try:
        out = check_png_path(out)
    except UserError:
        _pyplot().close(fig)
        raise
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        write_atomic(out, buf.getvalue())  # a refused write (full disk, read-only since checked): a UserError
    finally:
        _pyplot().close(fig)
    return out


def views_figure(views: list[np.ndarray], out, titles: tuple[str, ...] = ()) -> Path:
    """views[v] is (N, H, W, 3) in [0, 1]: one row per view, one column per image."""
    plt = _pyplot()
    n = views[0].shape[0]
    fig, axes = plt.subplots(len(views), n, figsize=(1.5 * n, 1.6 * len(views)), squeeze=False)
    for v, rows in enumerate(views):
        for i in range(n):
            ax = axes[v, i]
            ax.imshow(rows[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(titles[v] if v < len(titles) else f"view {v + 1}")
    fig.tight_layout()
    return save_figure(fig, out)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} is not a run directory with metrics (no {path.name} in it)")
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()  # bytes that are not text: not JSON
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a partial last line; anything earlier is real corruption.
            if line_no == last and records:
                break
            raise UserError(f"{path}: line {line_no} is not JSON{'' if records else ' and no record precedes it'}; "
                            f"expected one JSON object per line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {line_no} is a JSON {type(record).__name__}; expected a JSON object "
                            f"per line")
        records.append(record)
    if not records:
        raise UserError(f"{path} holds no records yet; train for at least train.log_every steps")
    return records


# (panel title, metrics.jsonl key)
CURVES = (("loss", "loss"), ("learning rate", "lr"), ("kNN top-1 (%)", "knn_top1"), ("images / s", "images_per_s"))


def read_summary(run_dir: str | os.PathLike) -> dict:
    """summary.json of a finished run ({} while it runs): the end-of-run kNN figures."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is not JSON") from None


def _end_of_run_knn(ax, summary: dict, last_step: int) -> bool:
    """The final kNN evaluation as a star at the last step, the random-init baseline as a dashed line."""
    drawn = False
    if isinstance(summary.get("knn_top1"), (int, float)):
        ax.plot([summary.get("steps", last_step)], [summary["knn_top1"]], "*", ms=10, color="C1",
                label="end of run")
        drawn = True
    if isinstance(summary.get("knn_top1_random_init"), (int, float)):
        ax.axhline(summary["knn_top1_random_init"], ls="--", color="grey", label="random init")
        drawn = True
    if drawn:
        ax.legend(fontsize=7)
    return drawn


def curves_figure(records: list[dict], out, title: str = "", summary: dict | None = None) -> Path:
    """Loss, lr, kNN top-1 and throughput against the optimiser step, one panel each. The kNN panel shows
    the online monitor's points and, from `summary` (summary.json), the end-of-run figures."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.0 * len(CURVES), 3.0), sharex=True)
    last_step = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=0)
    for ax, (label, key) in zip(axes, CURVES):
        pts = [(r["step"], r[key]) for r in records if "step" in r and isinstance(r.get(key), (int, float))]
        extra = key == "knn_top1" and _end_of_run_knn(ax, summary or {}, last_step)
        if extra:
            ax.set_ylim(0, 100)  # accuracy on its full scale: chance and the trained figure side by side
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, marker="o" if len(pts) < 20 else None, ms=3, color="C0")
        elif not extra:
            ax.text(0.5, 0.5, f"no '{key}' in metrics.jsonl", ha="center", va="center", transform=ax.transAxes,
                    fontsize=8, color="grey")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out)


def cka_figure(matrix: np.ndarray, rows: list[str], cols: list[str], out, row_title: str = "",
               col_title: str = "") -> Path:
    plt = _pyplot()
    h, w = matrix.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.32 * w + 2.0), max(3.5, 0.32 * h + 1.5)))
    im = ax.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=1.0, cmap="magma", origin="lower")
    ax.set_xticks(range(w))
    ax.set_xticklabels(cols, rotation=90, fontsize=7)
    ax.set_yticks(range(h))
    ax.set_yticklabels(rows, fontsize=7)
    ax.set_xlabel(col_title)
    ax.set_ylabel(row_title)
    ax.set_title("linear CKA")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return save_figure(fig, out)


def _overlay(ax, image: np.ndarray, amap: np.ndarray) -> None:
    ax.imshow(image)
    h, w = image.shape[:2]
    m = (amap - amap.min()) / max(float(amap.max() - amap.min()), 1e-12)  # per map: show where, not how much
    ax.imshow(m, cmap="inferno", alpha=0.6, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def attention_figure(images: np.ndarray, heads: np.ndarray, rolled: np.ndarray, out, title: str = "") -> Path:
    """images (N, H, W, 3) in [0, 1]; heads (N, heads, gh, gw); rolled (N, gh, gw). One row per image:
    the image, the rollout, then each head of the last block (each map min-max scaled on its own)."""
    plt = _pyplot()
    n, nh = heads.shape[:2]
    cols = 2 + nh
    fig, axes = plt.subplots(n, cols, figsize=(1.5 * cols, 1.55 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i])
        axes[i, 0].set_xticks([])
        axes[i, 0].set_yticks([])
        _overlay(axes[i, 1], images[i], rolled[i])
        for h in range(nh):
            _overlay(axes[i, 2 + h], images[i], heads[i, h])
    for c, label in enumerate(["image", "rollout"] + [f"head {h + 1}" for h in range(nh)]):
        axes[0, c].set_title(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out)
