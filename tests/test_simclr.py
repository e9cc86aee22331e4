"""SimCLR at method level: the loss of a batch against eq. (1) of Chen et al. 2020 written out in float64 numpy
over the method's own networks, and the projection head's structure (sec. 2.1, appendix B.9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fastssl.config import config_from_dict
from fastssl.methods import build_method

from pipelines.base import ViewBatch


def _cfg(encoder="resnet18", **method):
    m = dict(name="simclr", temperature=0.2, proj_hidden=32, proj_dim=16)
    m.update(method)
    model = dict(encoder=encoder, small_input=True) if encoder.startswith("resnet") else \
        dict(encoder=encoder, patch_size=4)
    return config_from_dict(dict(data=dict(batch_size=6, image_size=16), model=model, method=m))


def paper_nt_xent(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    """Eq. (1): views 2k and 2k+1 of image k are a positive pair; l(i, j) = -log exp(sim(z_i, z_j)/tau) /
    sum_{k != i} exp(sim(z_i, z_k)/tau), sim the cosine; L is the mean of l over all 2N ordered positive pairs."""
    z = np.empty((2 * len(z1), z1.shape[1]))
    z[0::2], z[1::2] = z1, z2
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = i + 1 if i % 2 == 0 else i - 1
        sim = [z[i] @ z[k] / (np.linalg.norm(z[i]) * np.linalg.norm(z[k])) / tau for k in range(n2)]
        denom = sum(np.exp(sim[k]) for k in range(n2) if k != i)
        total += -np.log(np.exp(sim[j]) / denom)
    return total / n2


@pytest.mark.parametrize("encoder", ["resnet18", "vit_pico"])
def test_loss_equals_eq_1_over_the_methods_networks(encoder):
    torch.manual_seed(0)
    method = build_method(_cfg(encoder)).double().train()
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        out = method(ViewBatch((x1, x2), torch.zeros(6, dtype=torch.long), torch.arange(6)))
        # Both views in one batch: BN statistics over the 2N views, as the paper's global BN.
        z = method.projector(method.encoder(torch.cat([x1, x2]))).numpy()
        z_own_bn = [method.projector(method.encoder(x)).numpy() for x in (x1, x2)]
    expect = paper_nt_xent(z[:6], z[6:], 0.2)
    np.testing.assert_allclose(out.loss.item(), expect, rtol=1e-5)  # the loss runs in fp32
    # Not vacuous: pairing each view with another image's, or per-view BN statistics, gives another loss.
    assert abs(paper_nt_xent(z[:6], np.roll(z[6:], 1, axis=0), 0.2) - expect) > 1e-3
    assert abs(paper_nt_xent(*z_own_bn, 0.2) - expect) > 1e-4


def released_code_objective(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    """SimCLR's objective.py: logits of a against [b, a] with a's self-similarity masked, cross-entropy towards
    its own b (loss_a, a mean over N); the same from b (loss_b); the loss is loss_a + loss_b."""
    a = z1 / np.linalg.norm(z1, axis=1, keepdims=True)
    b = z2 / np.linalg.norm(z2, axis=1, keepdims=True)

    def direction(x, y):
        logits = np.concatenate([x @ y.T, x @ x.T - 1e9 * np.eye(len(x))], axis=1) / tau
        lse = np.log(np.exp(logits).sum(1))
        return np.mean(lse - np.diag(logits[:, :len(x)]))

    return direction(a, b) + direction(b, a)


def test_loss_scale_2_is_the_released_codes_objective():
    torch.manual_seed(0)
    method = build_method(_cfg(loss_scale=2.0)).double().train()
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        out = method(ViewBatch((x1, x2), torch.zeros(6, dtype=torch.long), torch.arange(6)))
        z = method.projector(method.encoder(torch.cat([x1, x2]))).numpy()
    np.testing.assert_allclose(out.loss.item(), released_code_objective(z[:6], z[6:], 0.2), rtol=1e-5)
    np.testing.assert_allclose(out.logs["nt_xent"].item(), paper_nt_xent(z[:6], z[6:], 0.2), rtol=1e-5)


@pytest.mark.parametrize("name", ["mocov2", "mocov3"])
def test_loss_scale_is_refused_for_moco(name):
    from fastssl.errors import UserError

    cfg = config_from_dict(dict(data=dict(batch_size=8), method=dict(name=name, loss_scale=2.0, queue_size=64,
                                                                      shuffle_bn_splits=2)))
    with pytest.raises(UserError, match=f"method.loss_scale=2.0 applies to SimCLR only; {name} scales"):
        build_method(cfg)


def test_projection_head_is_a_3_layer_mlp_ending_in_bn():
    # Appendix B.9 / SimCLR v2: a 3-layer head (2 hidden, BN + ReLU) on the encoder's features; its last BN here
    # has no affine (MoCo v3's choice, documented in fastssl/methods/simclr.py).
    method = build_method(_cfg())
    head = method.projector
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert head[0].in_features == method.encoder.num_features and head[-2].out_features == 16
    assert not head[-1].affine
    assert all(m.bias is None for m in head if isinstance(m, nn.Linear))
