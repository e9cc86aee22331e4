"""fastssl.losses naive and chunked impls against the float64 numpy oracle (test_losses_oracle.py).

The Triton impl has its own module (test_losses_triton.py, run in the Triton interpreter on a CPU) and the
distributed gather its own (test_losses_dist.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastssl import losses
from fastssl.errors import UserError
from fastssl.losses import chunked
from test_losses_oracle import (FORMS, assert_confident_matches_oracle, assert_matches_oracle, make_case, oracle,
                                run_impl, tolerances)

# Odd sizes: 2*37 = 74 SimCLR rows, 83 MoCo rows, 101 queue rows; none a multiple of the chunked block below.
SIZES = {"nt_xent": 37, "info_nce": 83, "info_nce_queue": 83}


@pytest.fixture
def small_blocks(monkeypatch):
    # ~300 similarities per block -> 2-4 anchor rows per block, and a ragged last block.
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", [0.05, 0.1, 0.2, 1.0])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_value_and_gradients_match_float64_oracle(impl, form, d, t, dtype, small_blocks):
    assert_matches_oracle(form, d, t, dtype, impl, SIZES[form], seed=d + int(100 * t))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_extreme_logits_stay_finite_and_exact(impl, form, small_blocks):
    # T=0.01 and near-duplicate rows: every logit is ~100, so exp() overflows fp32 unless the log-sum-exp is
    # shifted; the positive and the hardest negative differ by ~1e-4 in cosine.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 64, generator=g)
    x = base + 1e-3 * torch.randn(29, 64, generator=g)
    y = x + 1e-4 * torch.randn(29, 64, generator=g)
    queue = base + 1e-3 * torch.randn(41, 64, generator=g) if form == "info_nce_queue" else None
    loss, gx, gy = run_impl(form, x, y, queue, 0.01, impl)
    ref_loss, ref_gx, ref_gy, unit_gx, unit_gy = oracle(form, x, y, queue, 0.01, unit_grads=True)
    assert np.isfinite(loss) and np.isfinite(gx).all() and np.isfinite(gy).all()
    loss_tol, grad_tol = tolerances("float32", 64, 0.01, operands_rounded=False)
    assert abs(loss - ref_loss) <= loss_tol
    # The gradient w.r.t. the raw rows is the tangential part of the one w.r.t. the unit rows, which for
    # near-duplicates is tiny: fp32 can only promise grad_tol relative to the unit-row gradient, / |row|.
    for got, ref, unit, rows in ((gx, ref_gx, unit_gx, x), (gy, ref_gy, unit_gy, y)):
        bound = grad_tol * np.abs(unit).max() / rows.norm(dim=1).min().item()
        assert np.abs(got - ref).max() <= bound


@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("form", FORMS)
def test_confident_matches_keep_their_small_gradient_in_bf16(impl, form):
    assert_confident_matches_oracle(form, impl)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_a_batch_of_one_has_no_negatives_so_a_zero_loss_and_gradient(impl):
    # Closed form: the positive is the only term of its softmax, so the loss is log(1) = 0 for any inputs.
    # (The fused impls then see an empty set of negatives: log-sum-exp -inf, which must not become nan.)
    x, y = torch.randn(1, 16, requires_grad=True), torch.randn(1, 16, requires_grad=True)
    total = losses.nt_xent(x, y, impl=impl) + losses.info_nce(x, y, impl=impl)
    total.backward()
    assert total.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(y.grad, torch.zeros_like(y))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_cpu_impls_stay_fp32_under_bf16_autocast(impl, form):
    # The trainer calls the loss under autocast. On a CPU neither impl rounds anything to bf16 there: naive
    # turns autocast off (it is the fp32 reference; under autocast its logits came out in bf16 and its
    # gradients erred by ~3% at T=0.1), chunked runs its matmuls in fp32 whatever operand dtype it is handed.
    x, y, queue = make_case(form, SIZES[form], 128, 5, torch.float32)
    x.requires_grad_(), y.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if form == "nt_xent":
            loss = losses.nt_xent(x, y, 0.1, impl=impl)
        else:
            loss = losses.info_nce(x, y, 0.1, queue=queue, impl=impl)
    loss.backward()  # outside autocast, as accelerate's backward is
    ref_loss, ref_gx, ref_gy = oracle(form, x, y, queue, 0.1)
    loss_tol, grad_tol = tolerances("float32", 128, 0.1, False)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss) <= loss_tol
    for got, ref in ((x.grad, ref_gx), (y.grad, ref_gy)):
        assert np.abs(got.double().numpy() - ref).max() / np.abs(ref).max() <= grad_tol


@pytest.mark.parametrize("autocast, in_dtype, expected", [
    (False, torch.float32, torch.float32),
    (True, torch.float32, torch.bfloat16),   # fp32 rows under bf16 autocast: bf16 operands (Triton's dots)
    (True, torch.bfloat16, torch.bfloat16),  # 16-bit inputs keep their own dtype
    (False, torch.bfloat16, torch.bfloat16),
])
def test_backends_get_the_autocast_operand_dtype(autocast, in_dtype, expected):
    from fastssl.losses import fused

    seen = []

    class Spy:
        def row_lse(self, a, c, scale, self_offset, positive_index, dtype):
            seen.append(dtype)
            return chunked.row_lse(a, c, scale, self_offset, positive_index, dtype)

        def row_lse_backward(self, a, c, scale, self_offset, positive_index, dtype, *rest):
            seen.append(dtype)
            return chunked.row_lse_backward(a, c, scale, self_offset, positive_index, dtype, *rest)

    x, y, _ = make_case("nt_xent", 9, 16, 1, in_dtype)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        c = losses._common.nt_xent_contrast(x, y, 0.1)
        loss = fused.contrastive_loss(c, Spy())
    loss.backward()  # outside autocast, as accelerate's backward is: the forward's choice is kept
    assert seen == [expected, expected]


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("impl, bounded", [("chunked", True), ("naive", False)])
def test_chunked_never_builds_the_similarity_matrix(impl, bounded, monkeypatch):
    # 2N = 400 rows: the full matrix has 160,000 entries; a chunked block holds at most 4,000, the rows
    # themselves 400 x 32 = 12,800. naive is the control: the probe does see an N x N tensor when there is one.
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 4000)
    x = torch.randn(200, 32, requires_grad=True)
    y = torch.randn(200, 32, requires_grad=True)
    probe = _LargestTensor()
    with probe:
        losses.nt_xent(x, y, 0.1, impl=impl).backward()
    if bounded:
        assert probe.largest <= max(4000, 400 * 32)
    else:
        assert probe.largest >= 400 * 400


def test_queue_gets_no_gradient_and_is_not_modified():
    x, y, queue = make_case("info_nce_queue", 11, 16, 7, torch.float32, queue_len=23)
    queue.requires_grad_()
    before = queue.detach().clone()
    for impl in ("naive", "chunked"):
        losses.info_nce(x.requires_grad_(), y, 0.2, queue=queue, impl=impl).backward()
        assert queue.grad is None
        assert torch.equal(queue.detach(), before)


def test_auto_is_chunked_on_cpu():
    assert losses.resolve_impl("auto", torch.device("cpu"), 128) == "chunked"


def test_triton_on_cpu_without_interpreter_is_a_user_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="triton"):
        losses.nt_xent(torch.randn(4, 8), torch.randn(4, 8), impl="triton")


@pytest.mark.parametrize("call, fragment", [
    (lambda: losses.nt_xent(torch.randn(4, 8), torch.randn(4, 8), impl="fast"), "'fast'"),
    (lambda: losses.nt_xent(torch.randn(4, 8), torch.randn(5, 8)), "(4, 8) and (5, 8)"),
    (lambda: losses.info_nce(torch.randn(4, 8), torch.randn(4, 8), queue=torch.randn(9, 7)), "width 7"),
    (lambda: losses.info_nce(torch.randn(8), torch.randn(8)), "shape (8,)"),
    (lambda: losses.nt_xent(torch.randn(4, 8), torch.randn(4, 8), 0.0), "got 0.0"),
    (lambda: losses.nt_xent(torch.randn(4, 8), torch.randn(4, 8), None), "got None"),
    (lambda: losses.info_nce(torch.randn(4, 8), torch.randn(4, 8), "0.2"), "got '0.2'"),
    (lambda: losses.info_nce(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2)), "shape (2,)"),
    # A learnable temperature would get a gradient from naive only: the fused impls take it as a constant.
    (lambda: losses.nt_xent(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(0.1, requires_grad=True)),
     "requires grad"),
])
def test_bad_inputs_are_one_line_user_errors(call, fragment):
    with pytest.raises(UserError) as e:
        call()
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_a_one_element_temperature_tensor_is_its_number(impl):
    x, y, _ = make_case("nt_xent", 9, 16, 2, torch.float32)
    as_tensor = losses.nt_xent(x, y, torch.tensor([0.2], dtype=torch.float64), impl=impl)
    assert as_tensor.item() == losses.nt_xent(x, y, 0.2, impl=impl).item()
