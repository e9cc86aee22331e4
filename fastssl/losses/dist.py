"""Global negatives: an all-gather that carries gradients back to each rank's own samples.

`torch.distributed.all_gather` is not differentiable, and MoCo v3's `concat_all_gather` simply drops the
gradient of the other ranks' rows. Here the backward all-reduces (sums) the gradient of the gathered tensor
and hands each rank the slice of its own rows, so every rank's samples receive the gradient of every rank's
loss with respect to them.

How the scale works out (tested in tests/test_losses_dist.py): rank r computes L_r, the mean loss over its
own anchors against the global candidates. The single-process loss on the concatenated batch is
L = (1/R) sum_r L_r (equal local batches). Rank r's samples receive sum_r' dL_r'/dz_r = R * dL/dz_r, and DDP
averages parameter gradients over the R ranks, which divides that factor R away again: the parameters see
exactly dL/dtheta of the single-process run. Equal local batch sizes are required (all_gather's contract;
the loaders drop the last incomplete batch).

On one process (or when torch.distributed is not initialised) everything here is the identity;
`rank_and_world` is the one place the library asks torch.distributed for its rank and size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Sum over ranks (every rank's loss saw these rows as negatives), then keep our own rows. gloo has
        # no reduce_scatter; the all-reduce moves R times more bytes but only O(N*D) of them.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (n, ...) from all ranks in rank order -> (R*n, ...), differentiably."""
    if rank_and_world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)
