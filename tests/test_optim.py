"""Optimisers against float64 numpy re-implementations of their papers' update rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fastssl.config import OptimConfig
from fastssl.optim import LAMB, LARS, build_optimizer, param_groups


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    frozen = nn.Linear(3, 3)
    frozen.requires_grad_(False)
    m.add_module("frozen", frozen)
    return m


def _grads(step: int, shapes):
    rng = np.random.default_rng(step)
    return [rng.normal(size=s) for s in shapes]


def _run(opt_factory, ref_update, steps=4, wd=0.01, missing=()):
    """`missing`: (step, parameter index) pairs whose gradient is None in that step: the parameter is not
    updated, and its own step count (t in the references) does not advance."""
    m = _model()
    groups = param_groups(m, wd)
    opt = opt_factory(groups)
    params = [p for g in groups for p in g["params"]]
    adapt = [g["adapt"] for g in groups for _ in g["params"]]
    decay = [g["weight_decay"] for g in groups for _ in g["params"]]
    ref = [p.detach().double().numpy().copy() for p in params]
    state = [dict() for _ in params]
    counts = [0] * len(params)
    for t in range(1, steps + 1):
        gs = _grads(t, [p.shape for p in params])
        for i, (p, g) in enumerate(zip(params, gs)):
            p.grad = None if (t, i) in missing else torch.tensor(g, dtype=p.dtype)
        opt.step()
        for i, g in enumerate(gs):
            if (t, i) not in missing:
                counts[i] += 1
                ref[i] = ref_update(ref[i], g, state[i], counts[i], decay[i], adapt[i])
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.detach().double().numpy(), r, rtol=2e-5, atol=1e-6)
    return m


def test_groups_exclude_frozen_and_keep_1d_params_undecayed():
    m = _model()
    groups = param_groups(m, 0.1)
    ids = {id(p): g for g in groups for p in g["params"]}
    assert id(m.frozen.weight) not in ids
    assert ids[id(m[0].weight)]["weight_decay"] == 0.1 and ids[id(m[0].weight)]["adapt"]
    for p in (m[0].bias, m[1].weight, m[1].bias):
        assert ids[id(p)]["weight_decay"] == 0.0 and not ids[id(p)]["adapt"]


def _lars_reference(lr, mom, eta):
    """MoCo v3's LARS pseudo-code in float64: ref(p, g, state, t, wd, adapt) -> next p."""

    def ref(p, g, st, t, wd, adapt):
        d = g + wd * p
        if adapt:
            pn, dn = np.linalg.norm(p), np.linalg.norm(d)
            d = d * (eta * pn / dn if pn > 0 and dn > 0 else 1.0)
        st["mu"] = mom * st.get("mu", 0.0) + d
        return p - lr * st["mu"]

    return ref


def _lamb_reference(lr, b1, b2, eps):
    """You et al. 2020 algorithm 2 (LAMB) in float64, same signature as _lars_reference's."""

    def ref(p, g, st, t, wd, adapt):
        st["m"] = b1 * st.get("m", 0.0) + (1 - b1) * g
        st["v"] = b2 * st.get("v", 0.0) + (1 - b2) * g * g
        r = (st["m"] / (1 - b1 ** t)) / (np.sqrt(st["v"] / (1 - b2 ** t)) + eps) + wd * p
        if adapt:
            pn, rn = np.linalg.norm(p), np.linalg.norm(r)
            r = r * (pn / rn if pn > 0 and rn > 0 else 1.0)
        return p - lr * r

    return ref


def test_lars_matches_moco_v3_pseudocode():
    lr, mom, eta = 0.5, 0.9, 0.001
    _run(lambda g: LARS(g, lr=lr, momentum=mom, trust_coefficient=eta), _lars_reference(lr, mom, eta))


def test_lamb_matches_you_et_al_algorithm_2():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-6
    _run(lambda g: LAMB(g, lr=lr, betas=(b1, b2), eps=eps), _lamb_reference(lr, b1, b2, eps))


@pytest.mark.parametrize("opt", ["lars", "lamb"])
def test_a_parameter_without_a_gradient_keeps_its_state(opt):
    # Parameter 0 (a weight: trust ratio) has no gradient in steps 2 and 3, parameter 2 (a bias: none) in step 1:
    # they are left as they are, and LAMB's bias corrections use each parameter's own step count.
    missing = {(2, 0), (3, 0), (1, 2)}
    if opt == "lars":
        _run(lambda g: LARS(g, lr=0.5, momentum=0.9, trust_coefficient=0.001), _lars_reference(0.5, 0.9, 0.001),
             missing=missing)
    else:
        _run(lambda g: LAMB(g, lr=0.01, betas=(0.9, 0.999), eps=1e-6), _lamb_reference(0.01, 0.9, 0.999, 1e-6),
             missing=missing)


@pytest.mark.parametrize("name", ["lars", "lamb", "adamw", "sgd"])
def test_build_optimizer_leaves_frozen_params_untouched(name):
    m = _model()
    before = m.frozen.weight.clone()
    opt = build_optimizer(OptimConfig(name=name, weight_decay=0.1), m, lr=0.1)
    m(torch.randn(8, 5)).sum().backward()
    opt.step()
    assert torch.equal(m.frozen.weight, before)
    if name in ("lars", "lamb"):  # SGD and AdamW decay everything, as their references (fastssl/optim.py)
        assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if any(p.ndim <= 1 for p in g["params"]))


def _whole_model_against(m, opt, update, steps=4, grad_scale=1.0):
    """Run `opt` on all of m's trainable parameters with seeded gradients; `update(i, p, g, t)` is the float64
    reference step of parameter i (p its reference value), holding any state it needs itself."""
    params = [p for p in m.parameters() if p.requires_grad]
    ref = [p.detach().double().numpy().copy() for p in params]
    for t in range(1, steps + 1):
        gs = [grad_scale * g for g in _grads(t, [p.shape for p in params])]
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g, dtype=p.dtype)
        opt.step()
        ref = [update(i, r, g, t) for i, (r, g) in enumerate(zip(ref, gs))]
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.detach().double().numpy(), r, rtol=1e-5, atol=1e-6)


def test_adamw_decays_every_parameter_as_moco_v3_does():
    # moco-v3 main_moco.py: torch.optim.AdamW(model.parameters(), lr, weight_decay=wd) -- biases and norms
    # decayed too. Decoupled update (Loshchilov & Hutter): p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps).
    m = _model()
    lr, wd, (b1, b2), eps = 0.01, 0.1, (0.9, 0.999), 1e-8
    opt = build_optimizer(OptimConfig(name="adamw", lr=lr, weight_decay=wd, betas=(b1, b2)), m, lr=lr)
    assert any(p.ndim <= 1 for p in m.parameters() if p.requires_grad)
    mom, var = {}, {}

    def update(i, p, g, t):
        mom[i] = b1 * mom.get(i, 0.0) + (1 - b1) * g
        var[i] = b2 * var.get(i, 0.0) + (1 - b2) * g * g
        m_hat, v_hat = mom[i] / (1 - b1 ** t), var[i] / (1 - b2 ** t)
        return p * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + eps)

    _whole_model_against(m, opt, update)


def test_sgd_is_mocos_momentum_sgd_with_decay_on_every_parameter():
    # He et al. 2020 sec. 4.1 / the moco reference: v <- mu v + (g + wd p); p <- p - lr v, biases and BN included.
    m = _model()
    lr, mu, wd = 0.05, 0.9, 1e-2
    opt = build_optimizer(OptimConfig(name="sgd", lr=lr, momentum=mu, weight_decay=wd), m, lr=lr)
    vel = {}

    def update(i, p, g, t):
        d = g + wd * p
        vel[i] = d if t == 1 else mu * vel[i] + d  # torch's first step seeds the buffer with d
        return p - lr * vel[i]

    _whole_model_against(m, opt, update)


# Non-default recipe values, each far enough from LARS's/LAMB's constructor defaults (momentum 0.9, eta 1e-3,
# betas (0.9, 0.999), weight decay 0) that a field dropped on the way from OptimConfig changes the step.
# LAMB's eps is not a recipe field: build_optimizer must leave You et al.'s 1e-6.
_RECIPE_FIELDS = dict(momentum=0.7, trust_coefficient=0.02, betas=(0.8, 0.95), weight_decay=0.05)


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_build_optimizer_passes_the_recipe_fields_through(name):
    """Built from a recipe, LARS/LAMB take the same steps as the float64 oracles given those fields, with
    decay and trust-ratio adaptation on weight matrices only (SimCLR appendix B.1, MoCo v3's LARS: biases
    and norm parameters excluded, decided here by ndim, not read from the optimiser)."""
    # optim.lr is the base lr of a batch of 256; build_optimizer is handed the scaled one and must use that.
    cfg = OptimConfig(name=name, lr=123.0, **_RECIPE_FIELDS)
    lr = 0.05 if name == "lars" else 0.01
    m = _model()
    opt = build_optimizer(cfg, m, lr=lr)
    assert type(opt) is (LARS if name == "lars" else LAMB)
    if name == "lars":
        ref_step = _lars_reference(lr, cfg.momentum, cfg.trust_coefficient)
    else:
        ref_step = _lamb_reference(lr, *cfg.betas, eps=1e-6)
    params = [p for p in m.parameters() if p.requires_grad]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params}  # frozen excluded
    assert any(p.ndim <= 1 for p in params) and any(p.ndim > 1 for p in params)
    states = [dict() for _ in params]

    def update(i, p, g, t):
        matrix = params[i].ndim > 1
        return ref_step(p, g, states[i], t, cfg.weight_decay if matrix else 0.0, matrix)

    # LAMB's gradients at 1e-6, the size of its eps, so the eps in the step is visible at the test's rtol.
    _whole_model_against(m, opt, update, grad_scale=1.0 if name == "lars" else 1e-6)
