"""The float64 numpy oracle for the contrastive losses, written from the papers' formulas, and its own check.

Loss values use a max-shifted numpy log-sum-exp; gradients are derived by hand (softmax minus one-hot, through
the similarity matmul and the L2 normalisation) and are themselves checked here against central finite
differences, so the impl tests compare against something that was verified independently of fastssl.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastssl import losses


def _unit(x):
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / norm, norm


def _unit_grad(x_hat, norm, g):
    return (g - x_hat * (x_hat * g).sum(1, keepdims=True)) / norm


def _cross_entropy(logits, target):
    """Mean cross-entropy over rows (entries may be -inf) and its gradient w.r.t. the logits."""
    m = logits.shape[0]
    top = logits.max(1, keepdims=True)
    e = np.exp(logits - top)
    lse = top[:, 0] + np.log(e.sum(1))
    loss = np.mean(lse - logits[np.arange(m), target])
    grad = e / e.sum(1, keepdims=True)
    grad[np.arange(m), target] -= 1.0
    return loss, grad / m


def nt_xent(z_a, z_b, t, unit_grads=False):
    """SimCLR eq. (1): 2N anchors, positive = other view, self excluded. Returns (loss, d/dz_a, d/dz_b) and,
    with `unit_grads`, the gradients w.r.t. the normalised rows as well."""
    n = z_a.shape[0]
    z_hat, norm = _unit(np.concatenate([z_a, z_b]).astype(np.float64))
    s = z_hat @ z_hat.T / t
    np.fill_diagonal(s, -np.inf)
    loss, g = _cross_entropy(s, (np.arange(2 * n) + n) % (2 * n))
    dz_hat = (g + g.T) @ z_hat / t  # s is symmetric in z: both factors get a gradient
    dz = _unit_grad(z_hat, norm, dz_hat)
    return (loss, dz[:n], dz[n:]) + ((dz_hat[:n], dz_hat[n:]) if unit_grads else ())


def info_nce(q, k, t, queue=None, unit_grads=False):
    """MoCo: positive of q_i is k_i; negatives the other keys (v3) or the queue (v2). Returns (loss, dq, dk)
    and, with `unit_grads`, the gradients w.r.t. the normalised rows as well."""
    q_hat, q_norm = _unit(q.astype(np.float64))
    k_hat, k_norm = _unit(k.astype(np.float64))
    if queue is None:
        loss, g = _cross_entropy(q_hat @ k_hat.T / t, np.arange(q.shape[0]))
        dq_hat, dk_hat = g @ k_hat / t, g.T @ q_hat / t
    else:
        u_hat, _ = _unit(queue.astype(np.float64))
        logits = np.concatenate([(q_hat * k_hat).sum(1, keepdims=True), q_hat @ u_hat.T], 1) / t
        loss, g = _cross_entropy(logits, np.zeros(q.shape[0], dtype=np.int64))
        dq_hat = g[:, :1] * k_hat / t + g[:, 1:] @ u_hat / t
        dk_hat = g[:, :1] * q_hat / t
    out = (loss, _unit_grad(q_hat, q_norm, dq_hat), _unit_grad(k_hat, k_norm, dk_hat))
    return out + ((dq_hat, dk_hat) if unit_grads else ())


def _finite_difference(f, arrays, which, h=1e-6):
    x = arrays[which]
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        plus = [a.copy() for a in arrays]
        minus = [a.copy() for a in arrays]
        plus[which][idx] += h
        minus[which][idx] -= h
        grad[idx] = (f(*plus) - f(*minus)) / (2 * h)
    return grad


@pytest.mark.parametrize("form", ["nt_xent", "info_nce", "info_nce_queue"])
def test_oracle_gradients_match_finite_differences(form):
    rng = np.random.default_rng(0)
    x, y, u = rng.normal(size=(5, 4)), rng.normal(size=(5, 4)), rng.normal(size=(7, 4))
    if form == "nt_xent":
        def f(a, b):
            return nt_xent(a, b, 0.3)[0]
        analytic = nt_xent(x, y, 0.3)[1:]
    else:
        queue = u if form == "info_nce_queue" else None

        def f(a, b):
            return info_nce(a, b, 0.3, queue)[0]
        analytic = info_nce(x, y, 0.3, queue)[1:]
    for which in (0, 1):
        # Central differences with h=1e-6 in float64: truncation O(h^2) ~ 1e-12 and rounding ~ 1e-16/h ~ 1e-10.
        np.testing.assert_allclose(analytic[which], _finite_difference(f, [x, y], which), atol=1e-8)


def test_oracle_value_matches_a_direct_sum():
    # log(sum exp) written out without any shift, on logits small enough not to overflow: an independent value.
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(3, 2)), rng.normal(size=(3, 2))
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
    direct = np.mean([-np.log(np.exp(qn[i] @ kn[i] / 0.5) / np.exp(qn[i] @ kn.T / 0.5).sum()) for i in range(3)])
    assert info_nce(q, k, 0.5)[0] == pytest.approx(direct, rel=1e-12)


# --- Comparing an impl with the oracle (used by test_losses.py and test_losses_triton.py) -------------------

FORMS = ("nt_xent", "info_nce", "info_nce_queue")
U32 = 2.0 ** -24  # unit roundoff of fp32
UNIT_ROUNDOFF = {"float32": U32, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "tf32": 2.0 ** -11}


def tolerances(dtype: str, d: int, t: float, operands_rounded: bool) -> tuple[float, float]:
    """(abs tol on the loss, tol on max|grad error| / max|grad|) for inputs of `dtype` (exact in float64).

    fp32 arithmetic: a D-term dot product errs by at most D*u (the gamma_D bound), times the scale 1/T on a
    logit; the loss adds a log-sum-exp and a positive logit (x2), gradients a second matmul (x4).
    Gradients returned in a 16-bit dtype are rounded once more: + u of that dtype.
    `operands_rounded` (Triton with 16-bit inputs): the normalised rows are rounded to the input dtype before
    the matmuls. Each rounding errs by up to u relative, uniformly, so a logit between random unit vectors
    errs with std sigma = scale * u * sqrt(2 / (3 D)); allow 4 sigma on the loss and the gradient, plus the
    rounding of the softmax block before the second matmul (u, twice for the interpreter's truncation).
    """
    scale, u = 1.0 / t, UNIT_ROUNDOFF[dtype]
    loss_tol, grad_tol = 2 * scale * d * U32, 4 * scale * d * U32
    if dtype != "float32":
        grad_tol += u
    if operands_rounded and dtype != "float32":
        sigma = scale * u * np.sqrt(2.0 / (3.0 * d))
        loss_tol += 4 * sigma
        grad_tol += 4 * sigma + 2 * u
    return loss_tol, grad_tol


def make_case(form: str, n: int, d: int, seed: int, dtype, queue_len: int = 101):
    """Seeded inputs (x, y, queue or None) of `dtype`; the oracle sees their exact values in float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    y = torch.randn(n, d, generator=g).to(dtype)
    queue = torch.randn(queue_len, d, generator=g).to(dtype) if form == "info_nce_queue" else None
    return x, y, queue


def oracle(form: str, x, y, queue, t: float, unit_grads=False):
    to64 = (lambda v: None if v is None else v.detach().cpu().double().numpy())
    if form == "nt_xent":
        return nt_xent(to64(x), to64(y), t, unit_grads)
    return info_nce(to64(x), to64(y), t, to64(queue), unit_grads)


def run_impl(form: str, x, y, queue, t: float, impl: str, device="cpu"):
    """Loss value and gradients w.r.t. x and y (as float64 numpy) of fastssl's impl."""
    xl = x.to(device).requires_grad_()
    yl = y.to(device).requires_grad_()
    if form == "nt_xent":
        loss = losses.nt_xent(xl, yl, t, impl=impl)
    else:
        loss = losses.info_nce(xl, yl, t, queue=None if queue is None else queue.to(device), impl=impl)
    loss.backward()
    return loss.item(), xl.grad.cpu().double().numpy(), yl.grad.cpu().double().numpy()


def assert_matches_oracle(form, d, t, dtype, impl, n, seed=0, device="cpu", operands_rounded=False):
    x, y, queue = make_case(form, n, d, seed, dtype)
    loss, gx, gy = run_impl(form, x, y, queue, t, impl, device)
    ref_loss, ref_gx, ref_gy = oracle(form, x, y, queue, t)
    loss_tol, grad_tol = tolerances(str(dtype).removeprefix("torch."), d, t, operands_rounded)
    assert np.isfinite(loss) and abs(loss - ref_loss) <= loss_tol, (loss, ref_loss, loss_tol)
    for got, ref in ((gx, ref_gx), (gy, ref_gy)):
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err <= grad_tol, (err, grad_tol)


def assert_confident_matches_oracle(form, impl, device="cpu"):
    """Late in training the views of an image match confidently: P(positive) ~ 1 - 1e-3, loss ~ 1e-3 to 1e-2.

    Then the gradient is scale * (1 - P_pos)-sized, and an impl that rounds P_pos (~1) or the positive's
    logit (~1/T) to 16 bits loses it to that rounding (the error is ~scale * u whatever the gradient's size).
    Held to the operand-rounding tolerances, relative to the small gradient; and the loss relatively: each
    anchor's loss softplus(lse_neg - pos) moves by at most itself times the error of its logits (sigmoid <=
    softplus), 4 sigma of the bf16 operand rounding.
    """
    g = torch.Generator().manual_seed(17)
    x = torch.randn(37, 64, generator=g)
    y = x + 0.05 * torch.randn(37, 64, generator=g)
    queue = torch.randn(101, 64, generator=g).bfloat16() if form == "info_nce_queue" else None
    x, y, t = x.bfloat16(), y.bfloat16(), 0.1
    loss, gx, gy = run_impl(form, x, y, queue, t, impl, device)
    ref_loss, ref_gx, ref_gy = oracle(form, x, y, queue, t)
    loss_tol, grad_tol = tolerances("bfloat16", 64, t, operands_rounded=True)
    sigma = UNIT_ROUNDOFF["bfloat16"] / t * np.sqrt(2.0 / (3.0 * 64))
    assert ref_loss < 0.02  # the regime this test is about
    assert abs(loss - ref_loss) <= ref_loss * 4 * sigma + 2 * 64 * U32 / t, (loss, ref_loss)
    for got, ref in ((gx, ref_gx), (gy, ref_gy)):
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err <= grad_tol, (err, grad_tol)
