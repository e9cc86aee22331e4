"""Contrastive losses (semantics in shared/INTERFACES.md). Every impl gives the same value and gradients."""

from __future__ import annotations

import torch

from fastssl.errors import UserError
from fastssl.losses import reference

IMPLS = ("auto", "naive", "chunked", "triton")


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise UserError(f"unknown loss impl {impl!r}; valid: {', '.join(IMPLS)}")
    if impl == "auto":
        return "naive"
    return impl


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1, *, impl: str = "auto") -> torch.Tensor:
    impl = _check_impl(impl)
    if impl == "naive":
        return reference.nt_xent(z_a, z_b, temperature)
    raise UserError(f"loss impl {impl!r} is not available yet")


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2, *, queue: torch.Tensor | None = None,
             impl: str = "auto") -> torch.Tensor:
    impl = _check_impl(impl)
    if impl == "naive":
        return reference.info_nce(q, k, temperature, queue=queue)
    raise UserError(f"loss impl {impl!r} is not available yet")
