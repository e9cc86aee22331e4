"""The naive losses: build the full logits matrix. Simple, and the reference the fused ones must match."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl.losses._common import Contrast, info_nce_contrast, nt_xent_contrast


def contrastive_loss(c: Contrast) -> torch.Tensor:
    # In fp32 under autocast too: autocast would round the logits to 16 bits (the positive's, near 1/T, to a
    # step of ~0.06 at T=0.1 in bf16), and this is the reference the fused impls (fp32 accumulation) must match.
    with torch.autocast(c.anchors.device.type, enabled=False):
        return _fp32_loss(c)


def _fp32_loss(c: Contrast) -> torch.Tensor:
    a = F.normalize(c.anchors.float(), dim=1)
    # One cast when anchors are the candidates (SimCLR, one process): the two gradients then add in fp32.
    cand = a if c.candidates is c.anchors else F.normalize(c.candidates.float(), dim=1)
    logits = a @ cand.t() / c.temperature
    rows = torch.arange(a.shape[0], device=a.device)
    if c.self_offset is not None:
        logits[rows, rows + c.self_offset] = float("-inf")  # in place: no extra N x N copy
    if c.positive_index is not None:
        return F.cross_entropy(logits, c.positive_index)
    # Positive logit first, then the candidates (MoCo v2's Algorithm 1).
    pos = (a * F.normalize(c.extra_positive.float(), dim=1)).sum(1, keepdim=True) / c.temperature
    return F.cross_entropy(torch.cat([pos, logits], dim=1), torch.zeros_like(rows))


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    return contrastive_loss(nt_xent_contrast(z_a, z_b, temperature))


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2, *,
             queue: torch.Tensor | None = None) -> torch.Tensor:
    return contrastive_loss(info_nce_contrast(q, k, temperature, queue))
