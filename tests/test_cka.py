"""Linear CKA against a float64 numpy re-implementation of Kornblith et al. 2019's HSIC form, its stated
invariances, and the per-layer features the heatmap is built from."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from fastssl.analysis.cka import cka_matrix, linear_cka
from fastssl.analysis.cka_layers import layer_features
from fastssl.errors import UserError


def _numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019 eq. 1-4: HSIC(K, L) = tr(K H L H) / (n-1)^2 with the centring matrix H,
    linear kernels K = X X^T, L = Y Y^T; CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


# (n examples, p, q): n < p q / (p + q) takes the Gram path, the others the cross-covariance path.
@pytest.mark.parametrize("n,p,q", [(10, 64, 48), (200, 8, 5), (40, 40, 40)])
def test_linear_cka_matches_numpy_hsic(n, p, q):
    rng = np.random.default_rng(n + p + q)
    x = rng.normal(size=(n, p)) + 3.0  # an offset, so centring matters
    y = x[:, :min(p, q)] @ rng.normal(size=(min(p, q), q)) + 0.5 * rng.normal(size=(n, q))
    want = _numpy_cka(x, y)
    assert 0.05 < want < 0.99  # a non-trivial pair, so agreement is informative
    # float32 inputs are converted to float64 inside; the only float32 error is the inputs' rounding (~1e-7)
    assert linear_cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)) == \
        pytest.approx(want, rel=1e-5)
    assert linear_cka(torch.tensor(x), torch.tensor(y)) == pytest.approx(want, rel=1e-10)


def test_cka_is_one_for_identical_and_invariant_to_orthogonal_maps_and_isotropic_scaling():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(50, 20)))
    y = torch.tensor(rng.normal(size=(50, 12))) + x[:, :12]
    q, _ = torch.linalg.qr(torch.tensor(rng.normal(size=(20, 20))))
    base = linear_cka(x, y)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(base, rel=1e-10)
    # ...but not to anisotropic scaling, which is what makes the invariances above a real check.
    scale = torch.tensor(np.geomspace(0.01, 10.0, 20))
    assert abs(linear_cka(x * scale, y) - base) > 0.05


def test_cka_of_constant_features_is_nan():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    assert np.isnan(linear_cka(torch.ones(10, 3), x))


def test_cka_matrix_equals_pairwise_numpy():
    rng = np.random.default_rng(3)
    a = [rng.normal(size=(30, d)) for d in (4, 16, 64)]
    b = [a[1] @ rng.normal(size=(16, 8)), rng.normal(size=(30, 100))]
    got = cka_matrix([torch.tensor(x) for x in a], [torch.tensor(y) for y in b]).numpy()
    want = np.array([[_numpy_cka(x, y) for y in b] for x in a])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # returned as float32
    self_sim = cka_matrix([torch.tensor(x) for x in a]).numpy()
    np.testing.assert_allclose(np.diag(self_sim), 1.0, rtol=1e-6)
    np.testing.assert_allclose(self_sim, self_sim.T, rtol=1e-6)
    with pytest.raises(ValueError):
        cka_matrix([torch.zeros(5, 2)], [torch.zeros(6, 2)])


def test_resnet_layer_features_pool_each_block_and_end_at_the_output():
    from fastssl.config import ModelConfig
    from fastssl.encoders import create_encoder

    torch.manual_seed(0)
    enc = create_encoder(ModelConfig(encoder="resnet18", small_input=True), 32).eval()
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    names, feats = layer_features(enc, images, batch_size=2)
    assert names == ["stem"] + [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in (0, 1)] + ["output"]
    assert [f.shape for f in feats][1:3] == [torch.Size([5, 64])] * 2 and feats[-2].shape == (5, 512)
    with torch.no_grad():
        full = enc(images)
        # timm's ResNet head is global average pooling of the last block: the oracle for our pooling
        manual = enc.layer4(enc.layer3(enc.layer2(enc.layer1(enc.maxpool(enc.act1(enc.bn1(enc.conv1(images))))))))
    torch.testing.assert_close(feats[-1], full)
    torch.testing.assert_close(feats[-2], manual.mean((2, 3)))
    assert enc.training is False


def test_vit_layer_features_average_patch_tokens_without_cls():
    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3,
                                                           num_heads=3, num_classes=0).train()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    names, feats = layer_features(vit, images, batch_size=3)
    assert names == ["patch_embed", "block0", "block1", "block2", "output"]
    assert vit.training is True  # restored after the hooked forward ran in eval mode
    vit.eval()
    with torch.no_grad():
        x = vit.patch_embed(images)
        want = [x.mean(1)]
        x = vit.norm_pre(vit._pos_embed(x))
        for blk in vit.blocks:
            x = blk(x)
            want.append(x[:, 1:].mean(1))
        want.append(vit(images))
    for got, ref in zip(feats, want):
        torch.testing.assert_close(got, ref)


def test_layer_features_reject_an_unknown_architecture():
    with pytest.raises(UserError, match="ResNet .* or a ViT"):
        layer_features(torch.nn.Linear(3, 3), torch.zeros(2, 3), name="mlp")
