"""Checkpoints: accelerate's save_state written atomically, plus a portable encoder file for evaluation.

Layout: RUN_DIR/checkpoints/step_00000100/ holds accelerate's state (model, optimiser, RNG, registered
objects) and encoder.pt ({"encoder": state_dict, "config": resolved config dict, "step": int}). A checkpoint
is written as .tmp-step_... and renamed into place only when complete, then `latest` is replaced
atomically, so a crash while saving leaves the previous checkpoint as the one resume uses.
"""

from __future__ import annotations

import os
import pickle
import re
import shlex
import shutil
import struct
import warnings
from pathlib import Path

import torch

from fastssl.errors import UserError, raise_together
from fastssl.fileio import fsync, fsync_folder, write_atomic

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_DIR = re.compile(r"^\.tmp-step_(\d{8})$")
ENCODER_FILE = "encoder.pt"
# What torch.load(weights_only=True) raises for an empty, truncated, corrupt or foreign file: the zip reader's
# RuntimeError / OSError, and the weights-only unpickler's errors on a malformed byte stream (a non-zip file is
# read as a legacy pickle). Anything else (TypeError, AttributeError, ...) is a bug and keeps its traceback.
UNREADABLE_ERRORS = (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError, IndexError,
                     struct.error)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    ckpt = Path(run_dir) / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(p for p in ckpt.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpt = Path(run_dir) / "checkpoints"
    pointer = ckpt / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        if _STEP_DIR.match(name) and (ckpt / name).is_dir():  # not "" (the checkpoints folder) nor a stray path
            return ckpt / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resume_hint(run_dir: Path, world: int, extra: str = "") -> str:
    """The command that continues a stopped run. Several processes: the same launcher (one process would take
    the whole global batch)."""
    args = f"tools/train.py {shlex.quote(str(run_dir / 'config.yaml'))} {shlex.quote(f'resume={run_dir}')}{extra}"
    if world == 1:
        return f"continue with `python {args}`"
    return f"continue by launching {world} processes as before with `{args}`"


def save_checkpoint(accelerator, run_dir: str | os.PathLike, step: int, encoder: torch.nn.Module,
                    config_dict: dict, keep: int = 2) -> Path:
    """Write step `step` whole or not at all. A write the disk refuses (full, quota, read-only) is a UserError on
    every process, naming the checkpoint that resume would use; the failed one leaves no folder behind."""
    ckpt = Path(run_dir) / "checkpoints"
    final = ckpt / f"step_{step:08d}"
    tmp = ckpt / f".tmp-step_{step:08d}"
    main = accelerator.is_main_process
    failure = None

    def refused(error: Exception) -> str:
        message = _write_failure(error, accelerator, Path(run_dir), final)
        if message is None:
            raise error
        return message

    # Each phase ends in raise_together, also the barrier between them: every process agrees that the phase
    # before succeeded (in the middle one, every process has written its files).
    try:
        if main:
            try:
                ckpt.mkdir(parents=True, exist_ok=True)
                # A process killed while saving (its `finally` never ran) leaves a .tmp-step_*; nothing else lists
                # those.
                for stale in ckpt.iterdir():
                    if _TMP_DIR.match(stale.name):
                        shutil.rmtree(stale, ignore_errors=True)
            except OSError as e:
                failure = refused(e)
        raise_together(accelerator, failure)
        try:
            accelerator.save_state(str(tmp), safe_serialization=False)
            if main:
                torch.save({"encoder": encoder.state_dict(), "config": config_dict, "step": step}, tmp / ENCODER_FILE)
        except (OSError, RuntimeError) as e:
            failure = refused(e)
        raise_together(accelerator, failure)
        if main:
            try:
                _fsync_tree(tmp)  # on disk before it is named: after a power cut, the old checkpoints or a whole one
                if final.exists():  # re-saving a step (e.g. end of run right after a periodic save)
                    shutil.rmtree(final)
                os.rename(tmp, final)
                write_atomic(ckpt / "latest", final.name + "\n")  # fsyncs the folder, so the rename too
            except (OSError, UserError) as e:  # UserError: write_atomic's refused write of `latest`
                failure = refused(e)
            else:
                for old in list_checkpoints(run_dir)[:-max(1, keep)]:
                    shutil.rmtree(old, ignore_errors=True)
        raise_together(accelerator, failure)
    finally:
        if main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):  # files before the folders holding them
        if path.is_dir():
            fsync_folder(path)
        else:
            with open(path, "rb") as f:
                fsync(f.fileno())
    fsync_folder(folder)


# What torch.save's zip writer raises when the file system refuses a write (a full disk gives "[enforce fail at
# inline_container.cc:...] unexpected pos N vs M"): a RuntimeError without errno. Any other RuntimeError is a bug.
_TORCH_WRITE_FAILED = ("inline_container", "unexpected pos", "file write failed")


def _write_failure(error: Exception, accelerator, run_dir: Path, target: Path) -> str | None:
    """The one-line message for a checkpoint the disk refused; None when `error` is not a failed write (a bug)."""
    if isinstance(error, OSError):
        why = error.strerror or str(error)
    elif isinstance(error, UserError):  # already the reason, in one line (write_atomic's)
        why = str(error)
    elif any(m in str(error) for m in _TORCH_WRITE_FAILED):
        try:  # measured now, while the partial files still take their space
            free = f" with {shutil.disk_usage(target.parent).free / 2**20:.1f} MiB free on its disk"
        except OSError:
            free = ""
        why = f"torch's file write stopped short{free}"
    else:
        return None
    last = latest_checkpoint(run_dir)
    kept = (f"the last complete checkpoint is {last.name}; make room (or fix the folder), then "
            f"{resume_hint(run_dir, accelerator.num_processes)}" if last else
            "no checkpoint yet: make room (or fix the folder), then the same command starts the run again")
    return f"cannot write checkpoint {target.name} to {target.parent}: {why}; {kept}"


def _find_encoder_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {str(p)!r} does not exist; expected a run directory, a checkpoint "
                        f"directory or an {ENCODER_FILE} file")
    if p.is_file():
        return p
    if (p / ENCODER_FILE).is_file():
        return p / ENCODER_FILE
    latest = latest_checkpoint(p)
    if latest is not None and (latest / ENCODER_FILE).is_file():
        return latest / ENCODER_FILE
    raise UserError(f"no checkpoint found in {str(p)!r}; expected RUN_DIR/checkpoints/step_*/{ENCODER_FILE}")


def load_encoder_checkpoint(path: str | os.PathLike) -> dict:
    """The saved encoder file as a dict: {"encoder": state_dict, "config": dict, "step": int}."""
    f = _find_encoder_file(path)
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol notice: the error below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
    except UNREADABLE_ERRORS as e:  # say which file and why, not a pickle traceback
        if isinstance(e, pickle.UnpicklingError):  # torch's text advises weights_only=False: wrong for a bad file
            why = "the weights-only unpickler rejected its contents"
        else:
            msg = str(e).splitlines()[0].split(". ")[0] if str(e).strip() else ""  # miniz adds paragraphs
            why = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
        raise UserError(f"cannot read checkpoint {str(f)!r} ({why}); expected an {ENCODER_FILE} written by "
                        f"fastssl: is the file truncated or corrupt?") from None
    if not isinstance(ckpt, dict) or not {"encoder", "config"} <= set(ckpt):
        hint = ""
        if isinstance(ckpt, dict) and any(str(k).startswith("encoder.") for k in ckpt):
            hint = f"; it looks like accelerate's training state: pass its step_* folder, which holds {ENCODER_FILE}"
        raise UserError(f"{str(f)!r} is not a fastssl encoder checkpoint (expected keys encoder, config){hint}")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["encoder"], dict):
        raise UserError(f"{str(f)!r} holds a {type(ckpt['config']).__name__} config and a "
                        f"{type(ckpt['encoder']).__name__} encoder; expected a config mapping and a state dict, as "
                        f"fastssl writes them")
    return ckpt


def load_encoder(path: str | os.PathLike, *, random_init: bool = False):
    """Rebuild the encoder a checkpoint was trained with. Returns (encoder, config)."""
    from fastssl.config import config_from_dict
    from fastssl.encoders import create_encoder

    ckpt = load_encoder_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    # The run's own initial weights (the trainer builds the encoder first after seeding), without touching the
    # caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder = create_encoder(cfg.model, cfg.data.image_size)
    if not random_init:
        mismatch = ""
        try:
            missing, unexpected = encoder.load_state_dict(ckpt["encoder"], strict=False)
            if missing or unexpected:
                mismatch = f"{len(missing)} missing and {len(unexpected)} unexpected tensors"
        except RuntimeError as e:  # same names, other shapes (e.g. a resnet18's weights, a resnet50 config)
            mismatch = f"{str(e).count('size mismatch')} tensors of another shape"
        if mismatch:
            raise UserError(f"checkpoint {str(path)!r} ({cfg.method.name} run) holds {_describe(ckpt['encoder'])} "
                            f"weights, which do not fit its config's encoder {cfg.model.encoder!r}: {mismatch}")
    return encoder.eval(), cfg


def _describe(state: dict) -> str:
    """What a state dict looks like, for error messages: a ViT of depth/width, a ResNet, or unknown."""
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if blocks and "pos_embed" in state:
        return f"ViT (depth {max(blocks) + 1}, width {state['pos_embed'].shape[-1]})"
    if any(k.startswith("layer4.") for k in state):
        return "ResNet"
    return "unrecognised"
