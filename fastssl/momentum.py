"""The momentum (key) encoder of MoCo: an EMA of the online weights, and MoCo v3's momentum schedule."""

from __future__ import annotations

import copy
import math

import torch
from timm.layers import DropPath
from torch import nn

from fastssl.errors import UserError


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy: same weights and BN statistics at step 0, never touched by the optimiser.

    Without stochastic depth or dropout: the key encoder makes the targets, and the loop keeps the whole
    method in train mode, so a copied DropPath would drop random blocks of the keys (noise in the targets,
    not a regulariser of what is trained). Students are regularised that way, targets are not (DINO builds
    its teacher without drop path; MoCo v3's ViTs use none). The rates are zeroed in place rather than the
    modules removed: timm's attention reads `attn_drop.p`, and there are no parameters to keep in step.
    """
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    for m in target.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- m * target + (1 - m) * online, for every parameter (MoCo eq. (2), He et al. 2020).

    One fused foreach kernel over all tensors instead of a Python loop of small ops. The parameter lists
    are collected here, not cached at construction: `module.to()` and accelerate's `prepare` may swap
    tensors, and a cached list would then update orphans. Buffers (BN running statistics) are left to the
    key encoder's own forward passes, as in the MoCo v2/v3 reference code: in train mode BN normalises
    with batch statistics, so they never enter the loss.
    """
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError(f"momentum encoder has {len(t_params)} parameters, online has {len(o_params)}")
    # lerp(t, o, w) = t + w (o - t) = (1 - w) t + w o, with w = 1 - m.
    torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """MoCo v3 (Chen, Xie, He 2021, sec. 4 / main_moco.py `adjust_moco_momentum`, after BYOL):
    m rises from `base` at step 0 to 1 at the last step on a half cosine."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base)


def validate_momentum(value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise UserError(f"method.momentum must be in [0, 1] (MoCo v2: 0.999, v3: 0.99), got {value}")
