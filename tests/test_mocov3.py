"""MoCo v3: the loss on a fixed batch against the paper's pseudo-code (algorithm 1 of Chen, Xie, He 2021,
re-implemented here in float64 numpy), the cosine momentum in after_step, heads and config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT, drloc_reference, perturb_
from fastssl.config import config_from_dict, load_config
from fastssl.errors import UserError
from fastssl.methods import build_method
from fastssl.methods.drloc import sample_pairs

from pipelines.base import ViewBatch


def _cfg(encoder="resnet18", **method):
    m = dict(name="mocov3", temperature=0.2, proj_layers=2, proj_hidden=32, proj_dim=16, pred_layers=2,
             pred_hidden=32, momentum=0.9)
    m.update(method)
    model = dict(encoder=encoder, small_input=True) if encoder.startswith("resnet") else dict(encoder=encoder,
                                                                                          patch_size=4)
    return config_from_dict(dict(data=dict(batch_size=6, image_size=16), model=model, method=m))


def _batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return ViewBatch(tuple(torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)),
                     torch.zeros(n, dtype=torch.long), torch.arange(n))


def paper_ctr(q, k, tau):
    """Algorithm 1's ctr(): normalised q, k; logits q k^T / tau; CE with labels range(N); times 2 tau."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = q @ k.T / tau
    mx = logits.max(1, keepdims=True)
    log_prob = logits - mx - np.log(np.exp(logits - mx).sum(1, keepdims=True))
    return 2 * tau * float(-np.mean(np.diag(log_prob)))


@pytest.mark.parametrize("encoder", ["resnet18", "vit_pico"])
def test_loss_equals_the_papers_pseudo_code(encoder):
    torch.manual_seed(0)
    method = build_method(_cfg(encoder)).double()
    method.train()
    perturb_(method.key_encoder, method.key_projector, seed=99)  # no longer copies of the query branch
    batch = _batch()
    x1, x2 = (v.double() for v in batch.views)
    with torch.no_grad():
        out = method(ViewBatch((x1, x2), batch.labels, batch.indices))
        # f_q = predictor o projector o encoder, f_k = its momentum copy without predictor; per-view calls.
        f_q = lambda x: method.predictor(method.projector(method.encoder(x))).numpy()  # noqa: E731
        f_k = lambda x: method.key_projector(method.key_encoder(x)).numpy()  # noqa: E731
        q1, q2, k1, k2 = f_q(x1), f_q(x2), f_k(x1), f_k(x2)
        o1, o2 = (method.projector(method.encoder(x)).numpy() for x in (x1, x2))
    expect = paper_ctr(q1, k2, 0.2) + paper_ctr(q2, k1, 0.2)
    np.testing.assert_allclose(out.loss.item(), expect, rtol=1e-5)  # the loss runs in fp32
    # The oracle tells the key branch apart: keys from the online network would give another loss.
    assert abs(paper_ctr(q1, o2, 0.2) + paper_ctr(q2, o1, 0.2) - expect) > 1e-3 * expect


def test_heads_follow_the_paper_and_there_is_no_queue():
    method = build_method(_cfg())
    assert not any("queue" in name for name, _ in method.named_buffers())
    last = method.projector[-1]
    assert isinstance(last, nn.BatchNorm1d) and not last.affine  # MoCo v3 sec. 4: last BN without affine
    assert isinstance(method.predictor[-1], nn.Linear)  # MoCo_ResNet: the predictor ends in a Linear
    assert sum(isinstance(m, nn.Linear) for m in method.predictor) == 2
    # moco-v3 builder.py `_build_mlp`: no Linear of either head has a bias, the last predictor one included.
    assert all(m.bias is None for head in (method.projector, method.predictor) for m in head
               if isinstance(m, nn.Linear))
    # MoCo_ViT: the predictor ends in BN without affine (method.pred_last_bn, set by the ViT recipes).
    vit = build_method(_cfg("vit_pico", pred_last_bn=True))
    assert [type(m).__name__ for m in vit.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert not vit.predictor[-1].affine
    assert not any(p.requires_grad for p in method.key_encoder.parameters())
    assert not any(p.requires_grad for p in method.key_projector.parameters())
    assert build_method(_cfg(pred_layers=0)).predictor.__class__ is nn.Identity


def test_after_step_applies_the_cosine_momentum_to_the_key_encoder():
    # Oracle: algorithm 1's f_k.params = m * f_k.params + (1 - m) * f_q.params in float64, for every parameter
    # of the key encoder and the key projector, with m from its closed form (Sec. 4's half cosine).
    torch.manual_seed(0)
    method = build_method(_cfg("vit_pico"))
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    total = 10
    pairs = [(method.key_encoder, method.encoder), (method.key_projector, method.projector)]
    for step in range(3):
        out = method(_batch(step))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        before = [[p.detach().double().clone() for p in key.parameters()] for key, _ in pairs]
        method.after_step(step, total)
        m = 1 - (1 - 0.9) * (math.cos(math.pi * (step + 1) / total) + 1) / 2  # MoCo v3 Sec. 4, after step k+1
        assert math.isclose(method.current_momentum, m, rel_tol=1e-12) and m > 0.9
        for (key, online), key_before in zip(pairs, before):
            for b, p, o in zip(key_before, key.parameters(), online.parameters(), strict=True):
                torch.testing.assert_close(p.double(), m * b + (1 - m) * o.detach().double(), rtol=1e-6,
                                           atol=1e-7)
            # Not vacuous: the optimiser moved this branch's query side, so skipping its EMA would not pass.
            assert any(not torch.equal(b, o.detach().double()) for b, o in zip(key_before, online.parameters()))
    assert method(_batch()).logs["momentum"] == method.current_momentum


def test_drloc_adds_the_mean_over_both_views():
    # Oracle: the symmetric InfoNCE of algorithm 1 plus lambda times the mean over the two views of L_drloc,
    # computed by hand on the pairs the method draws (its only draws from the global RNG: view 1's, then 2's).
    torch.manual_seed(0)
    n, pairs, weight = 6, 4, 0.25
    method = build_method(_cfg("vit_pico", drloc_weight=weight, drloc_pairs=pairs)).double()
    perturb_(method.key_encoder, method.key_projector, seed=99)  # no longer copies of the query branch
    batch = _batch()
    x1, x2 = (v.double() for v in batch.views)
    torch.manual_seed(7)
    out = method(ViewBatch((x1, x2), batch.labels, batch.indices))
    torch.manual_seed(7)
    drawn = [sample_pairs(n, 4, 4, pairs, "cpu") for _ in range(2)]
    enc = method.encoder
    with torch.no_grad():
        q1, q2 = (method.predictor(method.projector(enc(x))).numpy() for x in (x1, x2))
        k1, k2 = (method.key_projector(method.key_encoder(x)).numpy() for x in (x1, x2))
        grids = [enc.forward_features(x)[:, 1:].reshape(n, 4, 4, -1) for x in (x1, x2)]  # [CLS] first
        aux = [drloc_reference(method.drloc.mlp, grid, u, v) for grid, (u, v) in zip(grids, drawn)]
    expect = paper_ctr(q1, k2, 0.2) + paper_ctr(q2, k1, 0.2) + weight * 0.5 * (aux[0] + aux[1])
    np.testing.assert_allclose(out.loss.item(), expect, rtol=1e-5)
    assert abs(aux[0] - aux[1]) > 1e-3  # the two views' terms differ: a mean over one view would not pass


@pytest.mark.parametrize("method, fragment", [
    (dict(temperature=0.0), "method.temperature must be > 0"),
    (dict(pred_layers=-1), "method.pred_layers must be >= 0"),
    (dict(momentum=-0.1), "method.momentum must be in [0, 1]"),
    (dict(drloc_weight=0.1), "is not a ViT"),
])
def test_bad_config_is_one_clear_error(method, fragment):
    with pytest.raises(UserError) as e:
        build_method(_cfg(**method))
    assert fragment in str(e.value)


RECIPES = sorted(p.name for pattern in ("moco*.yaml", "vit*.yaml") for p in (ROOT / "recipes").glob(pattern))


@pytest.mark.parametrize("name", RECIPES)
def test_every_moco_and_vit_recipe_validates_and_builds(name):
    cfg = load_config(ROOT / "recipes" / name)
    assert cfg.method.name in ("mocov2", "mocov3")
    if cfg.method.name == "mocov2":
        assert cfg.method.queue_size % cfg.data.batch_size == 0
    with torch.device("meta"):  # structure only: ViT-B and a 65536-key queue cost nothing here
        method = build_method(cfg)
    assert method.encoder.num_features > 0
