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
    n = x.shape[0]
    perm = shuffle_order(n * size, x.device, generator)
    groups = max(1, splits // size)
    if size == 1:
        out = torch.cat([module(chunk) for chunk in x[perm].chunk(groups)])
        return unshuffle(out, perm)
    # Process r encodes global samples perm[r*n:(r+1)*n]. Each process sends every other one just the images it
    # owns of that share, and gets its own keys back: 2 x n images moved per process, where gathering the global
    # batch (as the reference code does) moves P x n and grows with the number of processes.
    shares = perm.cpu().view(size, n)  # split sizes are host integers; one sync, as the broadcast needed one
    owner = torch.div(shares, n, rounding_mode="floor")
    # What this process sends to each process r: its own samples of r's share, in the order of that share.
    to_each = [shares[r][owner[r] == rank] - rank * n for r in range(size)]
    sent = torch.cat(to_each)
    # What arrives: r's share of each owner s in turn; `arrival` says where each lands in this process's share.
    arrival = torch.argsort(owner[rank], stable=True)
    counts = torch.bincount(owner[rank], minlength=size).tolist()
    received = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(received, x[sent.to(x.device)].contiguous(), output_split_sizes=counts,
                           input_split_sizes=[len(t) for t in to_each])
    share = torch.empty_like(received)
    share[arrival.to(x.device)] = received
    out = torch.cat([module(chunk) for chunk in share.chunk(groups)])
    # Back to the owners, the same routes reversed.
    keys = torch.empty((n, *out.shape[1:]), dtype=out.dtype, device=out.device)
    dist.all_to_all_single(keys, out[arrival.to(out.device)].contiguous(), output_split_sizes=[len(t) for t in to_each],
                           input_split_sizes=counts)
    mine = torch.empty_like(keys)
    mine[sent.to(out.device)] = keys
    return mine
