"""The naive losses: build the full logits matrix. Simple, and the reference the fused ones must match."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    # SimCLR eq. (1): 2N anchors; positive = the other view of the same image; self excluded.
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)
    n = z_a.shape[0]
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2, *, queue: torch.Tensor | None = None) -> torch.Tensor:
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    if queue is None:
        # MoCo v3: the other keys of the batch are the negatives.
        logits = q @ k.t() / temperature
        return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))
    # MoCo v2: positive logit first, then the queue (Algorithm 1 of He et al. 2020).
    queue = F.normalize(queue.detach().float(), dim=1)
    pos = (q * k).sum(1, keepdim=True)
    logits = torch.cat([pos, q @ queue.t()], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
