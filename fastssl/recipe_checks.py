"""Value checks of a recipe's scalar settings, run before anything is read or written.

The config loader checks keys and types; the methods, encoders and loaders check what only they understand
(temperature, queue size, encoder names, paths). What is left are plain ranges: a negative learning rate or a
log interval of 0 would otherwise train wrongly in silence or fail with a traceback steps later.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fastssl.config import Config
from fastssl.errors import SEED_MAX, UserError


def _positive(x) -> bool:
    return math.isfinite(x) and x > 0


def _non_negative(x) -> bool:
    return math.isfinite(x) and x >= 0


def _unit(x) -> bool:  # momentum-like: [0, 1)
    return math.isfinite(x) and 0 <= x < 1


def _seed(x) -> bool:
    return 0 <= x <= SEED_MAX


# (key, predicate, what is expected)
_RULES: list[tuple[str, Callable, str]] = [
    ("seed", _seed, "an integer in [0, 2**32 - 1]"),
    ("data.workers", _non_negative, ">= 0 (0: load in the main process)"),
    ("optim.lr", _positive, "a finite number > 0"),
    ("optim.min_lr", _non_negative, "a finite number >= 0"),
    ("optim.weight_decay", _non_negative, "a finite number >= 0"),
    ("optim.momentum", _unit, "in [0, 1)"),
    ("optim.trust_coefficient", _positive, "a finite number > 0"),
    ("optim.warmup_epochs", _non_negative, "a finite number >= 0"),
    ("method.proj_hidden", _positive, ">= 1"),
    ("method.proj_dim", _positive, ">= 1"),
    ("method.pred_hidden", _positive, ">= 1"),
    ("method.loss_scale", _positive, "a finite number > 0"),
    ("train.epochs", _non_negative, ">= 0"),
    ("train.max_steps", _non_negative, ">= 0 (0: train.epochs decides)"),
    ("train.stop_after_steps", _non_negative, ">= 0 (0: run to the end)"),
    ("train.log_every", _positive, ">= 1"),
    ("train.checkpoint_every", _non_negative, ">= 0 (0: only at the end)"),
    ("train.keep_checkpoints", _positive, ">= 1"),
    ("train.grad_accum", _positive, ">= 1 (1: no accumulation)"),
    ("eval.knn_k", _positive, ">= 1"),
    ("eval.knn_t", _positive, "a finite number > 0"),
    ("eval.batch_size", _positive, ">= 1"),
    ("eval.knn_every_epochs", _non_negative, ">= 0 (0: off)"),
    ("eval.knn_monitor_train_samples", _positive, ">= 1"),
    ("eval.knn_monitor_val_samples", _positive, ">= 1"),
    ("eval.linear_epochs", _positive, ">= 1"),
    ("eval.linear_lr", _positive, "a finite number > 0"),
    ("eval.linear_weight_decay", _non_negative, "a finite number >= 0"),
]


def _get(cfg: Config, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def check_ranges(cfg: Config, prefix: str = "") -> None:
    """Raise a one-line UserError for the first setting (of those whose key starts with `prefix`) out of its
    range. Parts usable without the trainer (the kNN monitor) check their own keys with it."""
    for key, ok, expected in _RULES:
        value = _get(cfg, key) if key.startswith(prefix) else None
        if value is not None and not ok(value):
            raise UserError(f"{key}={value}; expected {expected}")


def check_values(cfg: Config) -> None:
    """Raise a one-line UserError for the first setting out of its range."""
    check_ranges(cfg)
    for i, beta in enumerate(cfg.optim.betas):
        if not _unit(beta):
            raise UserError(f"optim.betas={list(cfg.optim.betas)}; expected both in [0, 1), got {beta} at {i}")
    if cfg.train.epochs == 0 and cfg.train.max_steps == 0:
        raise UserError("train.epochs=0 and train.max_steps=0: nothing to train; set either to a positive number")
    if not cfg.output_dir and not cfg.resume:
        raise UserError("output_dir is empty; expected the run directory to write (e.g. runs/mine)")
    if cfg.train.grad_accum != 1 and not cfg.train.allow_grad_accum:
        raise UserError(f"train.grad_accum={cfg.train.grad_accum} changes the negatives of a contrastive loss "
                        f"(each micro-batch sees only its own); set train.allow_grad_accum=true to accept that")
    if cfg.train.grad_accum != 1 and not cfg.data.drop_last:
        raise UserError(f"train.grad_accum={cfg.train.grad_accum} with data.drop_last=false: an epoch's last, "
                        f"short batch would not split into {cfg.train.grad_accum} equal micro-batches; set "
                        f"data.drop_last=true")


def check_recipe(cfg: Config) -> None:
    """All that can be checked without data or devices, in a second: value ranges, the precision and compile
    choices, the data settings a backend reads (its name, the global batch, data.device, the augmentation), and
    the method with its encoder and heads and its optimiser, built on the meta device (no memory, no weights).
    `tools/train.py --print-config` runs it, so a recipe can be checked before an `accelerate launch`."""
    import torch

    from fastssl.errors import resolve_compile
    from fastssl.methods import build_method
    from fastssl.optim import build_optimizer
    from fastssl.schedule import scaled_lr
    from fastssl.step import resolve_precision
    from pipelines.augment import spec_for
    from pipelines.base import check_backend, check_data_device, check_global_batch

    check_values(cfg)
    resolve_precision(cfg.train.precision)
    resolve_compile(cfg.model.compile, torch.device("cpu"))
    resolve_compile(cfg.data.compile, torch.device("cpu"), "data.compile")
    check_backend(cfg.data.backend)
    check_global_batch(cfg.data.batch_size, 1)  # the world size is checked when it is known
    check_data_device(cfg.data.device)
    spec_for(cfg.data)
    peak_lr = scaled_lr(cfg.optim.lr, cfg.data.batch_size, cfg.optim.lr_scaling)
    with torch.device("meta"):
        build_optimizer(cfg.optim, build_method(cfg), peak_lr)

