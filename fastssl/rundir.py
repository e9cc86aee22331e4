"""The run directory: refuse to clobber another run, and check a resume continues the same run."""

from __future__ import annotations

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


# What a run holds before its first checkpoint lands.
_EARLY_RUN_FILES = {"config.yaml", "metrics.jsonl", "checkpoints"}


def _holds_a_fastssl_config(run: Path) -> bool:
    try:
        load_config(run / "config.yaml")
    except (UserError, OSError):
        return False
    return True


def stopped_before_first_checkpoint(run: Path) -> bool:
    """A run that died before saving anything to continue from: the trainer may start it again in place.
    Only a folder holding nothing but what the trainer writes first, with a config.yaml that is a fastssl
    config: a user's own folder that happens to have a config.yaml is not overwritten."""
    if not (run / "config.yaml").is_file() or latest_checkpoint(run) is not None:
        return False
    return all(p.name in _EARLY_RUN_FILES for p in run.iterdir()) and _holds_a_fastssl_config(run)


def _check_outside_data(cfg: Config, run: Path) -> None:
    """A run folder inside an ImageFolder would become one of its classes (without images) at the next scan,
    and every later run or evaluation on that data would stop."""
    out = run.expanduser().absolute().resolve()
    for key in ("data.path", "eval.knn_train_path", "eval.knn_val_path"):
        section, name = key.split(".")
        folder = getattr(getattr(cfg, section), name)
        if folder and Path(folder).is_dir():
            src = Path(folder).expanduser().absolute().resolve()
            if src in out.parents:
                raise UserError(f"output_dir {cfg.output_dir!r} is inside {key} {folder!r}; expected a folder "
                                f"outside the dataset, where the run cannot become one of its classes")


def prepare_run_dir(cfg: Config) -> tuple[Config, Path, bool]:
    """Returns (config, run directory, resuming). Raises UserError before anything is written."""
    if cfg.resume:
        run = Path(cfg.resume)
        if Path(cfg.output_dir).absolute().resolve() != run.absolute().resolve():
            # A run continues in its own folder; silently writing into `resume` when the command names another
            # output_dir would extend the old run where the user expects a new one.
            raise UserError(f"resume={cfg.resume!r} continues the run in that folder, but output_dir="
                            f"{cfg.output_dir!r} names another; set output_dir to the same folder (or leave it as "
                            f"the run's config.yaml has it), or drop resume= to start a new run there")
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
        return cfg, run, True
    run = Path(cfg.output_dir)
    if run.exists() and not run.is_dir():
        raise UserError(f"output_dir {cfg.output_dir!r} exists and is not a directory")
    _check_outside_data(cfg, run)
    check_creatable(run, "output_dir", contents_only=True)
    if run.is_dir() and any(run.iterdir()) and not stopped_before_first_checkpoint(run):
        if (run / "config.yaml").is_file() and _holds_a_fastssl_config(run):
            raise UserError(f"output_dir {cfg.output_dir!r} already holds a run; pass resume={cfg.output_dir} to "
                            f"continue it, or choose another output_dir")
        shown = ", ".join(sorted(p.name for p in run.iterdir())[:4])
        raise UserError(f"output_dir {cfg.output_dir!r} is not empty ({shown}) and holds no fastssl run; "
                        f"expected a new or empty folder: choose another output_dir")
    return cfg, run, False
