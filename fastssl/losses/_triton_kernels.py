"""The three Triton kernels behind triton_infonce.py (see there for the algorithm and its precision).

Each program owns one block of rows and keeps a whole feature row (BLOCK_D >= D) in its tile. The walk over the
other side is split in SPLIT_LEN-long pieces, one per program_id(1) (flash-decoding): each program writes its own
partial result (a log-sum-exp, or a gradient sum) to its slice of the output, and the caller reduces the slices.
One row block alone has too little work to keep a GPU's SMs busy at the N a contrastive loss sees.
A row's own column (HAS_SELF: row + self_offset) and its positive's (HAS_POS: POS[row]) are masked out; the
caller adds the positive's term in fp32.
"""

import triton
import triton.language as tl


@triton.jit
def lse_kernel(A, C, POS, LSE, M, N, D, scale, self_offset, SPLIT_LEN, HAS_SELF: tl.constexpr,
               HAS_POS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    begin = split * SPLIT_LEN
    end = tl.minimum(begin + SPLIT_LEN, N)
    dims = tl.arange(0, BLOCK_D)
    a = tl.load(A + rows.to(tl.int64)[:, None] * D + dims[None, :],
                mask=(rows[:, None] < M) & (dims[None, :] < D), other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    if HAS_POS:
        pos_col = tl.load(POS + rows, mask=rows < M, other=-1)
    # A finite start: a tile whose entries are all masked (-inf) then gives exp(-inf) = 0, never inf - inf.
    run_max = tl.full([BLOCK_M], -1e30, tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    for start in range(begin, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        c = tl.load(C + cols.to(tl.int64)[:, None] * D + dims[None, :],
                    mask=(cols[:, None] < end) & (dims[None, :] < D), other=0.0)
        if UPCAST:
            c = c.to(tl.float32)
        s = tl.dot(a, tl.trans(c), input_precision=PRECISION) * scale
        keep = cols[None, :] < end
        if HAS_SELF:
            keep = keep & (cols[None, :] != rows[:, None] + self_offset)
        if HAS_POS:
            keep = keep & (cols[None, :] != pos_col[:, None])
        s = tl.where(keep, s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, 1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), 1)
        run_max = new_max
    # A split whose only column is the self one sums to 0: log gives -inf, which the caller's reduction ignores.
    tl.store(LSE + split.to(tl.int64) * M + rows, run_max + tl.log(run_sum), mask=rows < M)


@triton.jit
def grad_anchor_kernel(A, C, POS, LSE, W, DA, M, N, D, scale, self_offset, SPLIT_LEN, HAS_SELF: tl.constexpr,
                       HAS_POS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    begin = split * SPLIT_LEN
    end = tl.minimum(begin + SPLIT_LEN, N)
    dims = tl.arange(0, BLOCK_D)
    a = tl.load(A + rows.to(tl.int64)[:, None] * D + dims[None, :],
                mask=(rows[:, None] < M) & (dims[None, :] < D), other=0.0)
    if UPCAST:
        a = a.to(tl.float32)
    if HAS_POS:
        pos_col = tl.load(POS + rows, mask=rows < M, other=-1)
    lse = tl.load(LSE + rows, mask=rows < M, other=0.0)
    weight = tl.load(W + rows, mask=rows < M, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(begin, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        c = tl.load(C + cols.to(tl.int64)[:, None] * D + dims[None, :],
                    mask=(cols[:, None] < end) & (dims[None, :] < D), other=0.0)
        if UPCAST:
            c = c.to(tl.float32)
        s = tl.dot(a, tl.trans(c), input_precision=PRECISION) * scale
        keep = cols[None, :] < end
        if HAS_SELF:
            keep = keep & (cols[None, :] != rows[:, None] + self_offset)
        if HAS_POS:
            keep = keep & (cols[None, :] != pos_col[:, None])
        p = tl.where(keep, tl.exp(s - lse[:, None]) * weight[:, None], 0.0)
        p = p.to(C.dtype.element_ty)
        if UPCAST:
            p = p.to(tl.float32)
        acc += tl.dot(p, c, input_precision=PRECISION)
    out = DA + split.to(tl.int64) * M * D
    tl.store(out + rows.to(tl.int64)[:, None] * D + dims[None, :], acc * scale,
             mask=(rows[:, None] < M) & (dims[None, :] < D))


@triton.jit
def grad_candidate_kernel(A, C, POS, LSE, W, DC, M, N, D, scale, self_offset, SPLIT_LEN,
                          HAS_SELF: tl.constexpr, HAS_POS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    begin = split * SPLIT_LEN
    end = tl.minimum(begin + SPLIT_LEN, M)
    dims = tl.arange(0, BLOCK_D)
    c = tl.load(C + cols.to(tl.int64)[:, None] * D + dims[None, :],
                mask=(cols[:, None] < N) & (dims[None, :] < D), other=0.0)
    if UPCAST:
        c = c.to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(begin, end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        a = tl.load(A + rows.to(tl.int64)[:, None] * D + dims[None, :],
                    mask=(rows[:, None] < end) & (dims[None, :] < D), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        lse = tl.load(LSE + rows, mask=rows < end, other=0.0)
        weight = tl.load(W + rows, mask=rows < end, other=0.0)
        s_t = tl.dot(c, tl.trans(a), input_precision=PRECISION) * scale  # (candidates, anchors)
        keep = rows[None, :] < end
        if HAS_SELF:
            keep = keep & (cols[:, None] != rows[None, :] + self_offset)
        if HAS_POS:
            keep = keep & (cols[:, None] != tl.load(POS + rows, mask=rows < end, other=-1)[None, :])
        p_t = tl.where(keep, tl.exp(s_t - lse[None, :]) * weight[None, :], 0.0)
        p_t = p_t.to(A.dtype.element_ty)
        if UPCAST:
            p_t = p_t.to(tl.float32)
        acc += tl.dot(p_t, a, input_precision=PRECISION)
    out = DC + split.to(tl.int64) * N * D
    tl.store(out + cols.to(tl.int64)[:, None] * D + dims[None, :], acc * scale,
             mask=(cols[:, None] < N) & (dims[None, :] < D))
