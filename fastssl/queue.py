"""MoCo's queue of negative keys (He et al. 2020, sec. 3.2): a FIFO of the most recent K keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeatureQueue(nn.Module):
    """A ring buffer of K unit-norm keys.

    `queue` and `ptr` are buffers, so accelerate's save_state checkpoints them with the method and a
    resumed run sees the same negatives. `ptr` is a 0-d device tensor, and the write position is computed
    on the device (index_copy_ at (ptr + arange(N)) mod K): no `.item()`, so enqueueing never waits on the
    GPU. Rolled by -ptr, the rows read oldest first.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        # He et al. 2020, Algorithm 1 / main_moco.py: the queue starts as random unit vectors.
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Enqueue `keys` (N, D), N <= K, overwriting the N oldest rows."""
        n = keys.shape[0]
        if n > self.size:
            raise ValueError(f"cannot push {n} keys into a queue of {self.size}")
        idx = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.queue.index_copy_(0, idx, F.normalize(keys.detach().to(self.queue.dtype), dim=1))
        self.ptr.copy_((self.ptr + n) % self.size)

    def ordered(self) -> torch.Tensor:
        """The rows oldest first (for tests and inspection; the loss does not care about order)."""
        return torch.roll(self.queue, shifts=-int(self.ptr), dims=0)
