"""Shuffle BN (He et al. 2020, sec. 3.3): the key encoder's BN statistics come from a shuffled batch.

Why: with BN over a per-GPU sub-batch, a query and its own key would share statistics that the model can
read to find the positive ("cheating", MoCo sec. 3.3) instead of learning features. MoCo computes the keys
on a batch shuffled across GPUs and un-shuffles them afterwards, so query i and key i are normalised with
statistics of different samples.

On one process the same recipe runs by emulation: the batch is shuffled and the key encoder sees it in
`splits` sub-batches, each with its own BN statistics, as if `splits` GPUs shared the global batch.
Everything here is the identity on the collective side when torch.distributed is not initialised, so
the single-process path is the one the tests run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fastssl.losses.dist import rank_and_world


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every process in rank order, without gradient (keys are constants to MoCo)."""
    _, size = rank_and_world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def shuffle_order(n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation of the global batch, the same on every process (rank 0's is broadcast)."""
    perm = torch.randperm(n, device="cpu", generator=generator).to(device)
    _, size = rank_and_world()
    if size > 1:
        dist.broadcast(perm, src=0)
    return perm


def unshuffle(shuffled: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of `x[perm]`: row j of `shuffled` is sample perm[j]; put it back at row perm[j]."""
    return shuffled[torch.argsort(perm)]


@torch.no_grad()
def shuffled_forward(module: nn.Module, x: torch.Tensor, splits: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """module(x) for this process's samples, in their original order, with Shuffle BN.

    `splits` is the number of BN groups over the global batch (MoCo's 8 GPUs at batch 256); with P
    processes each one splits its shuffled share into max(1, splits // P) groups.
    """
    rank, size = rank_and_world()
    x_all = gather(x)
    perm = shuffle_order(x_all.shape[0], x.device, generator)
    mine = perm.view(size, -1)[rank]
    groups = max(1, splits // size)
    out = torch.cat([module(chunk) for chunk in x_all[mine].chunk(groups)])
    out_all = gather(out)  # row j is sample perm[j] of the global batch
    # Our samples are global rows rank*N ... rank*N + N - 1; argsort(perm) says where each one went.
    return out_all[torch.argsort(perm).view(size, -1)[rank]]
