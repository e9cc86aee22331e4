"""The three Triton kernels behind triton_infonce.py (see there for the algorithm and its precision).

Each program owns one block of rows and keeps a whole feature row (BLOCK_D >= D) in its tile.
"""

import triton
import triton.language as tl


@triton.jit
def lse_kernel(A, C, LSE, M, N, D, scale, self_offset, HAS_SELF: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    a = tl.load(A + rows.to(tl.int64)[:, None] * D + dims[None, :],
                mask=(rows[:, None] < M) & (dims[None, :] < D), other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    # A finite start: a tile whose entries are all masked (-inf) then gives exp(-inf) = 0, never inf - inf.
    run_max = tl.full([BLOCK_M], -1e30, tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        c = tl.load(C + cols.to(tl.int64)[:, None] * D + dims[None, :],
                    mask=(cols[:, None] < N) & (dims[None, :] < D), other=0.0)
        if UPCAST:
            c = c.to(tl.float32)
        s = tl.dot(a, tl.trans(c), input_precision=PRECISION) * scale
        keep = cols[None, :] < N
        if HAS_SELF:
            keep = keep & (cols[None, :] != rows[:, None] + self_offset)
        s = tl.where(keep, s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, 1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), 1)
        run_max = new_max
    tl.store(LSE + rows, run_max + tl.log(run_sum), mask=rows < M)


@triton.jit
def grad_anchor_kernel(A, C, LSE, W, DA, M, N, D, scale, self_offset, HAS_SELF: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    a = tl.load(A + rows.to(tl.int64)[:, None] * D + dims[None, :],
                mask=(rows[:, None] < M) & (dims[None, :] < D), other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    lse = tl.load(LSE + rows, mask=rows < M, other=0.0)
    weight = tl.load(W + rows, mask=rows < M, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        c = tl.load(C + cols.to(tl.int64)[:, None] * D + dims[None, :],
                    mask=(cols[:, None] < N) & (dims[None, :] < D), other=0.0)
        if UPCAST:
            c = c.to(tl.float32)
        s = tl.dot(a, tl.trans(c), input_precision=PRECISION) * scale
        keep = cols[None, :] < N
        if HAS_SELF:
            keep = keep & (cols[None, :] != rows[:, None] + self_offset)
        p = tl.where(keep, tl.exp(s - lse[:, None]) * weight[:, None], 0.0)
        p = p.to(C.dtype.element_ty)
        if UPCAST:
            p = p.to(tl.float32)
        acc += tl.dot(p, c, input_precision=PRECISION)
    tl.store(DA + rows.to(tl.int64)[:, None] * D + dims[None, :], acc * scale,
             mask=(rows[:, None] < M) & (dims[None, :] < D))


@triton.jit
def grad_candidate_kernel(A, C, LSE, W, DC, M, N, D, scale, self_offset, HAS_SELF: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    c = tl.load(C + cols.to(tl.int64)[:, None] * D + dims[None, :],
                mask=(cols[:, None] < N) & (dims[None, :] < D), other=0.0)
    if UPCAST:
        c = c.to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, M, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        a = tl.load(A + rows.to(tl.int64)[:, None] * D + dims[None, :],
                    mask=(rows[:, None] < M) & (dims[None, :] < D), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        lse = tl.load(LSE + rows, mask=rows < M, other=0.0)
        weight = tl.load(W + rows, mask=rows < M, other=0.0)
        s_t = tl.dot(c, tl.trans(a), input_precision=PRECISION) * scale  # (candidates, anchors)
        keep = rows[None, :] < M
        if HAS_SELF:
            keep = keep & (cols[:, None] != rows[None, :] + self_offset)
        p_t = tl.where(keep, tl.exp(s_t - lse[None, :]) * weight[None, :], 0.0)
        p_t = p_t.to(A.dtype.element_ty)
        if UPCAST:
            p_t = p_t.to(tl.float32)
        acc += tl.dot(p_t, a, input_precision=PRECISION)
    tl.store(DC + cols.to(tl.int64)[:, None] * D + dims[None, :], acc * scale,
             mask=(cols[:, None] < N) & (dims[None, :] < D))
