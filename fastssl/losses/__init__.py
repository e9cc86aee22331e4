"""Contrastive losses (semantics in shared/INTERFACES.md). Every impl gives the same value and gradients.

    naive    builds the (M x C) logits; the reference (reference.py)
    chunked  row blocks in plain torch, recomputed in backward: O(N*D) memory (chunked.py)
    triton   tiled kernels with an online log-sum-exp: O(N*D) memory (triton_infonce.py)
    auto     triton on CUDA when it imports (and D <= 256, a tile's width), else chunked

When torch.distributed is initialised the negatives are those of the global batch, gathered with gradients
(dist.py explains how the gradient scale matches the single-process loss on the concatenated batch). Every
process must then pass the same N: the gather's contract, which the loaders keep by dropping the last
incomplete batch (unequal sizes fail inside the collective, not here).
"""

from __future__ import annotations

import importlib
import numbers

import torch

from fastssl.errors import UserError
from fastssl.losses import chunked, fused, reference
from fastssl.losses._common import Contrast, info_nce_contrast, nt_xent_contrast

IMPLS = ("auto", "naive", "chunked", "triton")


def _triton_backend():
    # Imported on demand: importing triton costs about a second and the chunked path never needs it.
    return importlib.import_module("fastssl.losses.triton_infonce")


def resolve_impl(impl: str, device: torch.device, dim: int) -> str:
    """The impl that `impl` means for tensors on `device` with feature width `dim`."""
    if impl not in IMPLS:
        raise UserError(f"unknown loss impl {impl!r}; valid: {', '.join(IMPLS)}")
    if impl == "auto":
        if device.type == "cuda" and _triton_backend().unavailable_reason(device, dim) is None:
            return "triton"
        return "chunked"
    if impl == "triton":
        reason = _triton_backend().unavailable_reason(device, dim)
        if reason is not None:
            raise UserError(f"loss impl 'triton' cannot run: {reason}; use impl 'chunked' or 'auto'")
    return impl


def _evaluate(c: Contrast, impl: str) -> torch.Tensor:
    impl = resolve_impl(impl, c.anchors.device, c.anchors.shape[1])
    if impl == "naive":
        return reference.contrastive_loss(c)
    return fused.contrastive_loss(c, _triton_backend() if impl == "triton" else chunked)


def _check(name: str, x: torch.Tensor, like: torch.Tensor | None = None) -> None:
    if x.dim() != 2 or x.shape[0] == 0:
        raise UserError(f"{name} must be a non-empty (N, D) tensor, got shape {tuple(x.shape)}")
    if like is not None and x.shape[1] != like.shape[1]:
        raise UserError(f"{name} has feature width {x.shape[1]}, expected {like.shape[1]}")


def _temperature(t) -> float:
    """A positive number, as a Python float. A tensor holding one number is accepted if no gradient is asked
    of it: the fused impls treat the temperature as a constant, so a learnable one would train under `naive`
    only, and every impl must give the same gradients."""
    if isinstance(t, torch.Tensor):
        if t.numel() != 1 or t.requires_grad:
            raise UserError(f"temperature must be a positive number (a one-element tensor without grad at most), "
                            f"got a tensor of shape {tuple(t.shape)}"
                            + (" that requires grad" if t.requires_grad else ""))
        t = t.item()
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not t > 0:
        raise UserError(f"temperature must be a positive number, got {t!r}")
    return float(t)


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1, *, impl: str = "auto") -> torch.Tensor:
    _check("z_a", z_a)
    _check("z_b", z_b, z_a)
    if z_a.shape != z_b.shape:
        raise UserError(f"z_a and z_b must have the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    return _evaluate(nt_xent_contrast(z_a, z_b, _temperature(temperature)), impl)


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2, *, queue: torch.Tensor | None = None,
             impl: str = "auto") -> torch.Tensor:
    _check("q", q)
    _check("k", k, q)
    if q.shape != k.shape:
        raise UserError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue is not None:
        _check("queue", queue, q)
    return _evaluate(info_nce_contrast(q, k, _temperature(temperature), queue), impl)
