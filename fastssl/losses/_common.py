"""One description of a contrastive loss that every impl (naive, chunked, triton) evaluates.

SimCLR's NT-Xent and MoCo's InfoNCE are both "cross-entropy of anchor i against a set of candidates, one of
which is its positive":

    loss = mean_i [ log sum_{j != self(i)} exp(<a_i, c_j> / T)  -  <a_i, pos_i> / T ]

with all vectors L2-normalised. What differs is where the positive sits (a candidate column, or an extra
logit outside the candidates: MoCo v2's queue) and whether the anchor itself is among the candidates
(SimCLR, where it must be masked). `Contrast` names exactly that, so each impl is written once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastssl.losses import dist


@dataclass(frozen=True)
class Contrast:
    anchors: torch.Tensor  # (M, D) this rank's anchors, raw (normalised by the impl)
    candidates: torch.Tensor  # (C, D) raw; the global batch, or MoCo v2's queue
    temperature: float
    # Candidate `self_offset + i` is anchor i itself and is excluded; None: no anchor is a candidate.
    self_offset: int | None
    # (M,) the column of anchor i's positive among the candidates; None when the positive is `extra_positive`.
    positive_index: torch.Tensor | None
    # (M, D) raw positives outside the candidates (MoCo v2: the key, with only queue rows as negatives).
    extra_positive: torch.Tensor | None


def nt_xent_contrast(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> Contrast:
    # SimCLR eq. (1). Both views of every rank are candidates; this rank's 2n views are the anchors and sit
    # at rows [rank*2n, rank*2n + 2n) of the gathered candidates.
    rank, _ = dist.rank_and_world()
    z = torch.cat([z_a, z_b])
    n2 = z.shape[0]
    first = rank * n2
    local = torch.arange(n2, device=z.device)
    positive = first + (local + n2 // 2) % n2  # view a of image i <-> view b of image i
    return Contrast(z, dist.gather_with_grad(z), temperature, first, positive, None)


def info_nce_contrast(q: torch.Tensor, k: torch.Tensor, temperature: float,
                      queue: torch.Tensor | None) -> Contrast:
    if queue is not None:
        # MoCo v2 (He et al. 2020, Algorithm 1): l_pos = q.k, l_neg = q.queue; the queue takes no gradient.
        return Contrast(q, queue.detach(), temperature, None, None, k)
    # MoCo v3 (Chen et al. 2021, Algorithm 1): the keys of the global batch; q_i's positive is k_i.
    rank, _ = dist.rank_and_world()
    positive = rank * q.shape[0] + torch.arange(q.shape[0], device=q.device)
    return Contrast(q, dist.gather_with_grad(k), temperature, None, positive, None)
