"""The autograd Function shared by the fused impls: nothing of size N x N is ever stored.

Forward keeps only the per-anchor log-sum-exp over the candidates (M floats) and the positive logits; backward
recomputes the similarities block by block from the saved O(N*D) inputs (the flash-attention trade: one
extra matmul instead of an N x N buffer). L2 normalisation and the temperature are folded in here, so the
saved tensors are the raw inputs and nothing normalised is kept alive between forward and backward.

The tile work is delegated to a backend (chunked.py in plain torch, triton_infonce.py in Triton) with two
functions over normalised fp32 rows a (M, D), c (C, D), s_ij = scale * <a_i, c_j>, where j runs over the
negatives only (the self column i + self_offset and the positive column positive_index[i] are excluded):
    row_lse(a, c, scale, self_offset, positive_index, dtype)   -> lse_i = log sum_j exp(s_ij)      (M,)
    row_lse_backward(a, c, scale, self_offset, positive_index, dtype, lse, w, need_dc)
        -> (scale * sum_j P_ij c_j, scale * sum_i P_ij a_i or None),  P_ij = w_i exp(s_ij - lse_i)
The positive's logit is joined here, in fp32: loss_i = softplus(lse_i - pos_i). Inside a 16-bit tile its
softmax weight 1 - eps would round to 1 and the gradient term (P_pos - 1) drown in that rounding as soon as
training matches views confidently; outside, its weight 1 - P_pos = sigmoid(lse_i - pos_i) is exact.
`dtype` is the operand dtype: the input dtype, or the autocast dtype for fp32 inputs under autocast; a backend may run
its matmuls in it (bf16/fp16) with fp32 accumulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl.losses._common import Contrast

_EPS = 1e-12  # F.normalize's default, so every impl agrees on near-zero rows


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    norm = x.norm(dim=1, keepdim=True)
    return x / norm.clamp_min(_EPS), norm


def _unit_backward_(x_hat: torch.Tensor, norm: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Overwrites `grad` (w.r.t. x_hat) with the gradient w.r.t. x: in place, no further (N, D) buffer."""
    # d(x/|x|) = (I - x_hat x_hat^T) / |x|; below eps F.normalize divides by the constant eps instead.
    radial = torch.linalg.vecdot(x_hat, grad, dim=1).unsqueeze(1).masked_fill_(norm <= _EPS, 0.0)
    return grad.addcmul_(x_hat, radial, value=-1.0).div_(norm.clamp_min(_EPS))


class _FusedContrastive(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, candidates, extra_positive, positive_index, temperature, self_offset, backend):
        # The matmul operands take the autocast dtype when autocast is on, as a plain `a @ c.T` would
        # (in training under bf16 the projector's last BN hands the loss fp32 rows); on a GPU that selects the
        # bf16 tensor-core kernel, where exact fp32 Triton dots are ~40x slower (docs/BENCHMARKS.md).
        # Everything else -- normalisation, scaling, log-sum-exp, accumulation -- stays in fp32.
        device_type, op_dtype = anchors.device.type, anchors.dtype
        if op_dtype == torch.float32 and torch.is_autocast_enabled(device_type):
            op_dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            scale = 1.0 / temperature
            a, _ = _unit(anchors)
            c = a if candidates is anchors else _unit(candidates)[0]
            lse = backend.row_lse(a, c, scale, self_offset, positive_index, op_dtype)  # negatives only
            positive = c[positive_index] if positive_index is not None else _unit(extra_positive)[0]
            pos = scale * (a * positive).sum(1)
            # log(exp(pos) + sum_neg exp) - pos without cancellation: a confident anchor's loss ~1e-5 is not
            # the difference of two logits ~1/T.
            loss = F.softplus(lse - pos).mean()
        ctx.save_for_backward(anchors, candidates, extra_positive, positive_index, lse, pos)
        ctx.scale, ctx.self_offset, ctx.backend, ctx.op_dtype = scale, self_offset, backend, op_dtype
        # SimCLR on one process: anchors and candidates are the same tensor. Their gradients are then summed
        # here in fp32 and returned once, not rounded to bf16 twice and added in bf16 by autograd.
        ctx.shared = candidates is anchors
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        anchors, candidates, extra_positive, positive_index, lse, pos = ctx.saved_tensors
        need_a, need_c, need_p = ctx.needs_input_grad[:3]
        scale, m = ctx.scale, anchors.shape[0]
        with torch.autocast(anchors.device.type, enabled=False):
            a, a_norm = _unit(anchors)
            c, c_norm = (a, a_norm) if ctx.shared else _unit(candidates)
            # Row weights stay O(1) and the 1/M of the mean is applied afterwards in fp32: folded into the
            # softmax block it would underflow fp16 (P ~ 1/M * softmax) before the second matmul.
            unit = grad_loss.float() / m
            if positive_index is not None:
                positive = c[positive_index]
            else:
                positive, p_norm = _unit(extra_positive)
            # d softplus(lse - pos) / dlse = sigmoid(lse - pos) = 1 - softmax weight of the positive.
            w_lse = torch.sigmoid(lse - pos)
            # An anchor with no negatives at all (a batch of one) has lse = -inf: a finite floor keeps the
            # backends' exp(s - lse) of its masked (-inf) entries at 0 instead of exp(nan).
            lse = lse.clamp_min(torch.finfo(torch.float32).min)
            da, dc = ctx.backend.row_lse_backward(a, c, scale, ctx.self_offset, positive_index, ctx.op_dtype, lse,
                                                  w_lse, need_c)
            pull = (-scale * w_lse)[:, None]  # d loss_i / d pos_i, times d pos_i / d(a_i . positive_i)
            grads = [None] * 7
            d_anchor = da.addcmul_(pull, positive)
            if need_c:
                if positive_index is not None:
                    dc.index_add_(0, positive_index, pull * a)
                if ctx.shared:
                    d_anchor, need_a = d_anchor.add_(dc), True
                else:
                    grads[1] = _unit_backward_(c, c_norm, dc.mul_(unit)).to(candidates.dtype)
            if need_a:
                grads[0] = _unit_backward_(a, a_norm, d_anchor.mul_(unit)).to(anchors.dtype)
            if need_p:
                grads[2] = _unit_backward_(positive, p_norm, (unit * pull) * a).to(extra_positive.dtype)
        return tuple(grads)


def contrastive_loss(c: Contrast, backend) -> torch.Tensor:
    return _FusedContrastive.apply(c.anchors, c.candidates, c.extra_positive, c.positive_index, c.temperature,
                                   c.self_offset, backend)
