"""Row-block backend for fused.py in plain torch: the fallback where Triton is missing (CPU, MPS).

Anchors are processed in blocks of rows so that at most one (rows x C) block of similarities (plus the one
temporary of logsumexp) is alive at a time; backward recomputes each block. Everything runs in fp32 whatever
the input dtype: the inputs are exact in fp32, and on a CPU bf16 matmuls buy no speed.
"""

from __future__ import annotations

import torch

# Similarity entries per block: 2^20 fp32 = 4 MiB, which keeps the CPU matmuls large enough to run at full
# speed (at N=8192, 128 rows per block) while the peak stays a few percent of the naive N x N buffers.
BLOCK_ELEMENTS = 1 << 20


def _block_rows(m: int, c: int) -> int:
    return max(1, min(m, BLOCK_ELEMENTS // max(c, 1)))


def _similarities(a: torch.Tensor, c: torch.Tensor, scale: float, self_offset: int | None,
                  positive_index: torch.Tensor | None, start: int) -> torch.Tensor:
    """Rows [start, start + len(a)) of the similarities with each row's self and positive columns at -inf."""
    s = (a @ c.t()).mul_(scale)
    rows = torch.arange(a.shape[0], device=a.device)
    if self_offset is not None:
        s[rows, rows + (start + self_offset)] = float("-inf")
    if positive_index is not None:
        s[rows, positive_index[start:start + a.shape[0]]] = float("-inf")
    return s


def row_lse(a: torch.Tensor, c: torch.Tensor, scale: float, self_offset: int | None,
            positive_index: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    m = a.shape[0]
    step = _block_rows(m, c.shape[0])
    lse = torch.empty(m, device=a.device, dtype=torch.float32)
    for start in range(0, m, step):
        block = a[start:start + step]
        # Inline, so that this block's similarities are freed before the next block's are made.
        lse[start:start + step] = torch.logsumexp(
            _similarities(block, c, scale, self_offset, positive_index, start), dim=1)
    return lse


def row_lse_backward(a: torch.Tensor, c: torch.Tensor, scale: float, self_offset: int | None,
                     positive_index: torch.Tensor | None, dtype: torch.dtype, lse: torch.Tensor,
                     weight: torch.Tensor, need_dc: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    m = a.shape[0]
    step = _block_rows(m, c.shape[0])
    da = torch.empty_like(a)
    dc = torch.zeros_like(c) if need_dc else None
    for start in range(0, m, step):
        block = a[start:start + step]
        p = _similarities(block, c, scale, self_offset, positive_index, start)
        # In place: the softmax-times-weight block replaces the similarities, no second buffer.
        p.sub_(lse[start:start + step, None]).exp_().mul_(weight[start:start + step, None])
        torch.mm(p, c, out=da[start:start + step])
        if dc is not None:
            dc.addmm_(p.t(), block)
    da.mul_(scale)
    if dc is not None:
        dc.mul_(scale)
    return da, dc
