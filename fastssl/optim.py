"""Optimisers: LARS (SimCLR, MoCo v3 ResNet), LAMB, AdamW (MoCo v3 ViT), SGD (MoCo v1/v2).

LARS and LAMB neither decay nor adapt biases and normalisation parameters (SimCLR appendix B.1; MoCo v3's
LARS skips every 1-D parameter): those go in a group with weight_decay 0 and `adapt` False.
AdamW and SGD put the weight decay on every trainable parameter, biases and norms included, as their
references do: MoCo v3 (moco-v3 main_moco.py builds AdamW over model.parameters()) and Lee et al.'s small-data
ViTs for AdamW; MoCo v1/v2 (He et al. 2020 sec. 4.1 and the moco reference code) for momentum SGD.
"""

from __future__ import annotations

import torch
from torch import nn

from fastssl.errors import UserError

OPTIMIZERS = ("lars", "lamb", "adamw", "sgd")


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in module.parameters():
        if not p.requires_grad:  # momentum encoders, frozen patch projections
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "adapt": True},
              {"params": no_decay, "weight_decay": 0.0, "adapt": False}]
    return [g for g in groups if g["params"]]


def _trust_ratios(params: list[torch.Tensor], updates: list[torch.Tensor], eta: float) -> list[torch.Tensor]:
    """eta ||p|| / ||update|| per parameter, as 0-d tensors for _foreach_mul. torch.where instead of Python
    branches: no host sync, and a zero-initialised layer (or a zero update) keeps ratio 1."""
    param_norm = torch.stack(torch._foreach_norm(params))
    update_norm = torch.stack(torch._foreach_norm(updates))
    one = torch.ones_like(param_norm)
    return list(torch.where(param_norm > 0, torch.where(update_norm > 0, eta * param_norm / update_norm, one),
                            one).unbind())


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by SimCLR / MoCo v3: the trust ratio scales the decayed gradient,
    then heavy-ball momentum."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, adapt=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            # Whole-group _foreach ops: a ResNet-50 has ~160 parameters, and a Python loop of ~7 kernels each
            # (1,200 launches per step) shows on a GPU once the per-GPU batch is small. No host sync anywhere.
            grads = [p.grad for p in params]
            dps = torch._foreach_add(grads, params, alpha=g["weight_decay"]) if g["weight_decay"] else grads
            if g["adapt"]:
                dps = torch._foreach_mul(dps, _trust_ratios(params, dps, g["trust_coefficient"]))
            mus = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mus.append(state["mu"])
            torch._foreach_mul_(mus, g["momentum"])
            torch._foreach_add_(mus, dps)
            torch._foreach_add_(params, mus, alpha=-g["lr"])
        return loss


class LAMB(torch.optim.Optimizer):
    """LAMB (You et al. 2020): Adam's bias-corrected step plus decoupled decay, scaled by ||p|| / ||step||."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adapt=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            b1, b2 = g["betas"]
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            # Whole-group _foreach ops, as LARS: ~12 kernels per parameter in a Python loop otherwise.
            grads, ms, vs, steps = [p.grad for p in params], [], [], []
            for p in params:
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1  # per parameter: one without a gradient in a step keeps its own count
                ms.append(state["m"])
                vs.append(state["v"])
                steps.append(state["step"])
            torch._foreach_mul_(ms, b1)
            torch._foreach_add_(ms, grads, alpha=1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - b2)
            denom = torch._foreach_div(vs, [1 - b2 ** t for t in steps])
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, g["eps"])
            r = torch._foreach_div(ms, [1 - b1 ** t for t in steps])
            torch._foreach_div_(r, denom)
            if g["weight_decay"]:
                torch._foreach_add_(r, params, alpha=g["weight_decay"])
            if g["adapt"]:
                torch._foreach_mul_(r, _trust_ratios(params, r, 1.0))
            torch._foreach_add_(params, r, alpha=-g["lr"])
        return loss


def build_optimizer(optim_cfg, module: nn.Module, lr: float) -> torch.optim.Optimizer:
    trainable = [p for p in module.parameters() if p.requires_grad]  # not momentum encoders, frozen projections
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(trainable, lr=lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(trainable, lr=lr, betas=optim_cfg.betas, weight_decay=optim_cfg.weight_decay)
    groups = param_groups(module, optim_cfg.weight_decay)
    if optim_cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=optim_cfg.momentum, trust_coefficient=optim_cfg.trust_coefficient)
    if optim_cfg.name == "lamb":
        return LAMB(groups, lr=lr, betas=optim_cfg.betas)
    raise UserError(f"unknown optimiser optim.name={optim_cfg.name!r}; valid: {', '.join(OPTIMIZERS)}")
