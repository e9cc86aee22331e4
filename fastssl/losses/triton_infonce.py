"""Triton backend for fused.py: flash-attention-style tiles over the (anchors x candidates) similarities.

Forward: one program per block of anchor rows walks the candidate tiles keeping a running max and sum of
exponentials (an online log-sum-exp, Milakov & Gimelshein 2018), so only the M log-sum-exps reach memory.
Backward: two deterministic kernels recompute the tiles, one per anchor block (dA, walking candidates) and
one per candidate block (dC, walking anchors) -- no atomics, so gradients are bitwise reproducible.

Parallelism: one program per row block alone gives a GPU too few programs (8192 anchors in 64-row blocks = 128
programs for 132 SMs, one 4-warp program each), so the walk over the other side is split until there are about
PROGRAMS_PER_SM programs per SM (flash-decoding); the splits' partial log-sum-exps and gradient sums are reduced
in torch, in a fixed order, so results stay deterministic. Large N needs no split.

Precision: bf16/fp16 operands go to tl.dot as they are (fp32 accumulation); the softmax block P is rounded to
the operand dtype before the second matmul, as flash-attention does. fp32 operands follow torch's float32
matmul precision setting, like the naive impl's matmul: "highest" (torch's default) -> 3xTF32
(`input_precision="tf32x3"`: each operand split into a tf32 head and tail, three tensor-core products; a
product errs by at most ~3 * 2^-22 relative where fp32 rounds to 2^-24, within the fp32 tolerances the oracle
tests hold it to on a GPU), otherwise plain tf32. Triton's exact "ieee" fp32 dot runs on the FMA units and
measured 36-42x slower than cuBLAS's SGEMM on an H200, so it is not used. The similarity is scaled and masked
in fp32.

On a CPU the kernels run in Triton's interpreter when TRITON_INTERPRET=1 is set before triton is first
imported (Triton decorates its own tl.sum/tl.zeros at import). The interpreter (numpy) computes a bf16
tl.dot wrongly, so there the operands are upcast to fp32 right after loading (exact, and the same
products a tensor core forms); it also truncates instead of rounding on fp32 -> bf16, so P's rounding is
slightly coarser there than on a GPU.
"""

from __future__ import annotations

import torch

try:
    import triton

    from fastssl.losses import _triton_kernels as kernels
except ImportError:  # optional: chunked.py is the fallback
    triton = None

# Whole feature rows sit in one tile; 256 covers SimCLR (128) and MoCo v3 (256) and keeps the (64 x 256)
# fp32 accumulator of the backward kernels in registers. Wider features use the chunked impl.
MAX_DIM = 256
# Programs wanted per SM before the walk is split; the interpreter pretends to have 2 SMs, so that small test
# inputs run the split path too.
PROGRAMS_PER_SM = 4
_INTERPRETER_SMS = 2


def _interpreting() -> bool:
    return triton is not None and bool(triton.knobs.runtime.interpret)


def unavailable_reason(device: torch.device, dim: int) -> str | None:
    """Why the triton impl cannot run here, or None when it can."""
    if triton is None:
        return "the triton package is not installed (pip install triton)"
    if dim > MAX_DIM:
        return f"feature dim {dim} > {MAX_DIM}, the widest row a tile holds"
    if device.type != "cuda" and not _interpreting():
        return f"tensors are on {device.type}; triton needs CUDA (or TRITON_INTERPRET=1 for its CPU interpreter)"
    return None


def _operand_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _launch_args(d: int, self_offset: int | None, positive_index: torch.Tensor | None, dtype: torch.dtype) -> dict:
    block_d = max(16, triton.next_power_of_2(d))
    row_bytes = block_d * torch.finfo(dtype).bits // 8
    # Shared memory per program ~ one resident tile + num_stages streamed tiles: 64-row tiles up to 512 B per
    # row (bf16 D=256, fp32 D=128: 32 + 2 x 32 KiB), 32-row tiles beyond (fp32 D=256: the same 96 KiB), well
    # under an H100's 227 KiB. Chosen on paper, not yet tuned on a GPU.
    block = 64 if row_bytes <= 512 else 32
    return dict(HAS_SELF=self_offset is not None, HAS_POS=positive_index is not None, BLOCK_M=block,
                BLOCK_N=block, BLOCK_D=block_d, UPCAST=_interpreting() and dtype != torch.float32,
                PRECISION=dot_precision(dtype), num_warps=4 if block_d <= 128 else 8, num_stages=2)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: only fp32 ones have a choice (16-bit ones ignore it)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def _split_len(blocks: int, walk: int, tile: int, device: torch.device) -> int:
    """Length (a multiple of `tile`) of each piece of the `walk` the `blocks` row blocks are split along."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = _INTERPRETER_SMS
    tiles = triton.cdiv(walk, tile)
    splits = max(1, min(tiles, triton.cdiv(PROGRAMS_PER_SM * sms, blocks)))
    return triton.cdiv(tiles, splits) * tile


def _positive_columns(positive_index: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # An unused pointer still needs a tensor: HAS_POS=False compiles the loads away.
    return like.new_zeros(1, dtype=torch.int64) if positive_index is None else positive_index.contiguous()


def row_lse(a: torch.Tensor, c: torch.Tensor, scale: float, self_offset: int | None,
            positive_index: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    op = _operand_dtype(dtype)
    a, c = a.to(op).contiguous(), c.to(op).contiguous()
    (m, d), n = a.shape, c.shape[0]
    args = _launch_args(d, self_offset, positive_index, op)
    blocks = triton.cdiv(m, args["BLOCK_M"])
    split_len = _split_len(blocks, n, args["BLOCK_N"], a.device)
    splits = triton.cdiv(n, split_len)
    lse = torch.empty(splits, m, device=a.device, dtype=torch.float32)
    kernels.lse_kernel[(blocks, splits)](a, c, _positive_columns(positive_index, a), lse, m, n, d, scale,
                                         self_offset or 0, split_len, **args)
    return lse[0] if splits == 1 else torch.logsumexp(lse, dim=0)


def row_lse_backward(a: torch.Tensor, c: torch.Tensor, scale: float, self_offset: int | None,
                     positive_index: torch.Tensor | None, dtype: torch.dtype, lse: torch.Tensor,
                     weight: torch.Tensor, need_dc: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    op = _operand_dtype(dtype)
    a, c = a.to(op).contiguous(), c.to(op).contiguous()
    lse, weight = lse.contiguous(), weight.float().contiguous()
    (m, d), n = a.shape, c.shape[0]
    args = _launch_args(d, self_offset, positive_index, op)
    tensors = (a, c, _positive_columns(positive_index, a), lse, weight)
    da = _split_sum(kernels.grad_anchor_kernel, triton.cdiv(m, args["BLOCK_M"]), n, args["BLOCK_N"], m, d,
                    tensors, (m, n, d, scale, self_offset or 0), args)
    dc = None
    if need_dc:
        dc = _split_sum(kernels.grad_candidate_kernel, triton.cdiv(n, args["BLOCK_N"]), m, args["BLOCK_M"], n, d,
                        tensors, (m, n, d, scale, self_offset or 0), args)
    return da, dc


def _split_sum(kernel, blocks: int, walk: int, tile: int, rows: int, d: int, tensors: tuple, scalars: tuple,
               args: dict) -> torch.Tensor:
    """Launch a gradient kernel over (blocks, splits) programs and sum the splits' partial (rows, d) results."""
    device = tensors[0].device
    split_len = _split_len(blocks, walk, tile, device)
    splits = triton.cdiv(walk, split_len)
    out = torch.empty(splits, rows, d, device=device, dtype=torch.float32)
    kernel[(blocks, splits)](*tensors, out, *scalars, split_len, **args)
    return out[0] if splits == 1 else out.sum(dim=0)
