"""Learning-rate scaling and the warmup + cosine schedule, as pure functions of the step.

A schedule derived from the step (rather than a stateful scheduler object) resumes exactly for free.
"""

from __future__ import annotations

import math

from fastssl.errors import UserError

SCALINGS = ("linear", "sqrt", "none")


def scaled_lr(base_lr: float, global_batch: int, scaling: str) -> float:
    # SimCLR sec. B.1 / Goyal et al. 2017: lr = base_lr x batch / 256 ("linear"). "sqrt" keeps the same
    # batch-256 base: base_lr x sqrt(batch / 256). SimCLR writes its square-root rule per image instead,
    # 0.075 x sqrt(batch): that is base_lr = 0.075 x 16 = 1.2 here, not 0.075.
    if scaling == "linear":
        return base_lr * global_batch / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch / 256)
    if scaling == "none":
        return base_lr
    raise UserError(f"unknown optim.lr_scaling {scaling!r}; valid: {', '.join(SCALINGS)}")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Linear warmup to peak over warmup_steps, then half-cosine to min_lr at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))
