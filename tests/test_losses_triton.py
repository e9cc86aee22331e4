"""The Triton impl against the float64 numpy oracle: on a GPU when there is one, else in Triton's interpreter.

TRITON_INTERPRET=1 only takes effect when it is set before triton is first imported (Triton decorates its
own tl.sum/tl.zeros at import), and setting it inside this pytest process would also leak into every later
module. So on a CPU, unless the flag was set when the process started, this module runs itself in a fresh
pytest process with the flag set (test_kernels_in_the_interpreter) and its other tests skip here.

What the interpreter does and does not test (Triton 3.8): it runs the kernels' indexing, masking (self
column, ragged last tiles), online log-sum-exp and both backward kernels in numpy. Its tl.dot on bf16
operands is wrong, so fastssl upcasts bf16/fp16 operands to fp32 after loading when interpreting -- the same
exact products a tensor core forms, so the values are still a test of the algorithm, but the bf16
tensor-core path itself (and tf32) only runs on a GPU. Its fp32 -> bf16 cast truncates (a GPU rounds to
nearest), which the tolerance for P's rounding allows for.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_losses_oracle import (FORMS, assert_confident_matches_oracle, assert_matches_oracle, make_case, oracle,
                                run_impl, tolerances)

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNNABLE_HERE = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
kernels_here = pytest.mark.skipif(not RUNNABLE_HERE, reason="runs in test_kernels_in_the_interpreter's process")
# Odd sizes against the 64-row tiles (32 for fp32 D=256): 2*37 = 74 SimCLR rows, 83 MoCo rows, 101 queue
# rows -- full tiles plus a ragged one.
SIZES = {"nt_xent": 37, "info_nce": 83, "info_nce_queue": 83}


@pytest.mark.skipif(RUNNABLE_HERE, reason="the kernel tests run in this process")
def test_kernels_in_the_interpreter():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # Everything ran there except this launcher itself.
    assert re.search(r"\b\d+ passed, 1 skipped\b", proc.stdout), proc.stdout[-2000:]


@kernels_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", [0.05, 0.1, 0.2, 1.0])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("form", FORMS)
def test_value_and_gradients_match_float64_oracle(form, d, t, dtype):
    assert_matches_oracle(form, d, t, dtype, "triton", SIZES[form], seed=d + int(100 * t), device=DEVICE,
                          operands_rounded=True)


@kernels_here
@pytest.mark.parametrize("programs_per_sm", [1, 4, 16], ids=["one-split", "uneven-splits", "a-split-per-tile"])
@pytest.mark.parametrize("form", FORMS)
def test_split_walks_match_the_oracle(form, programs_per_sm, monkeypatch):
    # 150 pairs = 300 anchors in 5 row tiles. On the interpreter's 2 pretend SMs: 1 program per SM leaves the
    # walk whole; 4 splits it in 192 + 108 columns (a ragged last piece); 16 gives every tile its own split,
    # so the partial log-sum-exps and gradient sums are reduced across 5 pieces.
    from fastssl.losses import triton_infonce

    monkeypatch.setattr(triton_infonce, "PROGRAMS_PER_SM", programs_per_sm)
    assert_matches_oracle(form, 64, 0.1, torch.float32, "triton", 150, seed=programs_per_sm, device=DEVICE)


@kernels_here
@pytest.mark.parametrize("form", FORMS)
def test_confident_matches_keep_their_small_gradient_in_bf16(form):
    # The positive's column is masked in the tiles and its term added in fp32: inside a bf16 softmax block its
    # weight 1 - eps rounded, and the gradient of a confident anchor was mostly that rounding (relative
    # error 0.5-1.1 here before).
    assert_confident_matches_oracle(form, "triton", DEVICE)


@kernels_here
def test_fp16_inputs():
    assert_matches_oracle("nt_xent", 128, 0.1, torch.float16, "triton", 37, seed=11, device=DEVICE,
                          operands_rounded=True)


@kernels_here
@pytest.mark.parametrize("form", FORMS)
def test_extreme_logits_stay_finite(form):
    # As in test_losses.py: T=0.01 with near-duplicate rows, every logit ~100. The kernel's running max
    # starts finite and masked entries are -inf, so no inf - inf appears in any tile.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 64, generator=g)
    x = base + 1e-3 * torch.randn(29, 64, generator=g)
    y = x + 1e-4 * torch.randn(29, 64, generator=g)
    queue = base + 1e-3 * torch.randn(41, 64, generator=g) if form == "info_nce_queue" else None
    loss, gx, gy = run_impl(form, x, y, queue, 0.01, "triton", DEVICE)
    ref_loss, ref_gx, ref_gy, unit_gx, unit_gy = oracle(form, x, y, queue, 0.01, unit_grads=True)
    assert np.isfinite(loss) and np.isfinite(gx).all() and np.isfinite(gy).all()
    loss_tol, grad_tol = tolerances("float32", 64, 0.01, operands_rounded=False)
    assert abs(loss - ref_loss) <= loss_tol
    for got, ref, unit, rows in ((gx, ref_gx, unit_gx, x), (gy, ref_gy, unit_gy, y)):
        assert np.abs(got - ref).max() <= grad_tol * np.abs(unit).max() / rows.norm(dim=1).min().item()


def test_auto_picks_triton_only_on_cuda():
    from fastssl import losses

    assert losses.resolve_impl("auto", torch.device("cpu"), 128) == "chunked"
    if torch.cuda.is_available():
        assert losses.resolve_impl("auto", torch.device("cuda"), 128) == "triton"
        assert losses.resolve_impl("auto", torch.device("cuda"), 1024) == "chunked"  # wider than a tile


def test_wider_rows_than_a_tile_are_a_user_error():
    from fastssl import losses
    from fastssl.errors import UserError

    with pytest.raises(UserError, match="feature dim 300"):
        losses.nt_xent(torch.randn(4, 300), torch.randn(4, 300), impl="triton")


@kernels_here
@pytest.mark.parametrize("form", FORMS)
def test_fp32_rows_under_bf16_autocast_match_the_oracle_at_bf16_tolerance(form):
    # Training under bf16 autocast hands the loss fp32 rows (the projector ends in BN); the matmuls then run on
    # bf16 operands, as a plain autocast matmul would -- within the bf16 operand-rounding tolerance
    # of the float64 oracle, which sees the fp32 inputs exactly.
    x, y, queue = make_case(form, SIZES[form], 128, 5, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, gx, gy = run_impl(form, x, y, queue, 0.1, "triton", DEVICE)
    ref_loss, ref_gx, ref_gy = oracle(form, x, y, queue, 0.1)
    loss_tol, grad_tol = tolerances("bfloat16", 128, 0.1, operands_rounded=True)
    assert abs(loss - ref_loss) <= loss_tol
    for got, ref in ((gx, ref_gx), (gy, ref_gy)):
        assert np.abs(got - ref).max() / np.abs(ref).max() <= grad_tol


@pytest.mark.parametrize("setting, expected", [("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_operands_follow_torchs_matmul_precision(setting, expected):
    # torch's default "highest" must not drop fp32 rows to plain tf32 (10-bit mantissas), and Triton's exact
    # "ieee" dot (FMA units, 36-41x slower than naive on an H200) is not the way to honour it; 16-bit operands
    # have no choice to make.
    from fastssl.losses import triton_infonce

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        assert triton_infonce.dot_precision(torch.float32) == expected
        assert triton_infonce.dot_precision(torch.bfloat16) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


@kernels_here
def test_tf32_when_torch_allows_it_matches_the_oracle_at_tf32_tolerance():
    # "high" lets both impls round fp32 operands to tf32 (10-bit mantissa) on a GPU: then the oracle's
    # operand-rounding tolerance at tf32's unit roundoff applies. (The interpreter computes the dot exactly.)
    x, y, queue = make_case("nt_xent", SIZES["nt_xent"], 128, 7, torch.float32)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        loss, gx, gy = run_impl("nt_xent", x, y, queue, 0.1, "triton", DEVICE)
    finally:
        torch.set_float32_matmul_precision(before)
    ref_loss, ref_gx, ref_gy = oracle("nt_xent", x, y, queue, 0.1)
    loss_tol, grad_tol = tolerances("tf32", 128, 0.1, operands_rounded=True)
    assert abs(loss - ref_loss) <= loss_tol
    for got, ref in ((gx, ref_gx), (gy, ref_gy)):
        assert np.abs(got - ref).max() / np.abs(ref).max() <= grad_tol
