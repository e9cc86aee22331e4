"""The run directory: refuse to clobber another run, and check a resume continues the same run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fastssl.checkpoint import latest_checkpoint
from fastssl.config import Config, config_to_dict, load_config
from fastssl.errors import UserError
from fastssl.fileio import check_creatable

# Keys a resumed run may change without changing its maths (bookkeeping, display, evaluation).
RESUME_MAY_CHANGE = {"output_dir", "resume", "train.stop_after_steps", "train.progress", "train.log_every",
                     "train.checkpoint_every", "train.keep_checkpoints", "data.workers"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def stopped_before_first_checkpoint(run: Path) -> bool:
    """A run that died before saving anything to continue from: the trainer may start it again in place."""
    return (run / "config.yaml").is_file() and latest_checkpoint(run) is None and not (run / "summary.json").exists()


def prepare_run_dir(cfg: Config) -> tuple[Config, Path, bool]:
    """Returns (config, run directory, resuming). Raises UserError before anything is written."""
    if cfg.resume:
        run = Path(cfg.resume)
        if not (run / "config.yaml").is_file():
            raise UserError(f"resume={cfg.resume!r} is not a fastssl run directory (no config.yaml in it)")
        saved = _flat(config_to_dict(load_config(run / "config.yaml")))
        now = _flat(config_to_dict(cfg))
        diffs = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in saved
                 if k not in RESUME_MAY_CHANGE and not k.startswith("eval.") and saved[k] != now[k]]
        if diffs:
            raise UserError(f"resume={cfg.resume!r} was run with a different config ({'; '.join(diffs)}); "
                            f"resume with the same recipe and overrides")
        if latest_checkpoint(run) is None:
            raise UserError(f"resume={cfg.resume!r} holds no checkpoint yet; start it again without resume "
                            f"(output_dir={cfg.resume})")
        return dataclasses.replace(cfg, output_dir=str(run)), run, True
    run = Path(cfg.output_dir)
    if run.exists() and not run.is_dir():
        raise UserError(f"output_dir {cfg.output_dir!r} exists and is not a directory")
    check_creatable(run, "output_dir", contents_only=True)
    if run.is_dir() and any(run.iterdir()) and not stopped_before_first_checkpoint(run):
        raise UserError(f"output_dir {cfg.output_dir!r} already holds a run; pass resume={cfg.output_dir} to "
                        f"continue it, or choose another output_dir")
    return cfg, run, False
