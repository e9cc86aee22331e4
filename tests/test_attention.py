"""Attention maps read from timm's blocks against a manual softmax(q k^T / sqrt(d)) of the same block's
input, and attention rollout against a float64 numpy transcription of Abnar & Zuidema 2020."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from fastssl.analysis.attention import attention_maps, cls_attention, rollout
from fastssl.errors import UserError


def _tiny_vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=0, qkv_bias=True)
    args.update(kw)
    return timm.models.vision_transformer.VisionTransformer(**args)


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _manual_attention(block, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head)) from the block's own qkv weights, written out by hand."""
    attn = block.attn
    b, t, c = x.shape
    h = attn.num_heads
    d = c // h
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k = qkv[..., :c], qkv[..., c:2 * c]
    q = q.reshape(b, t, h, d).transpose(1, 2)
    k = k.reshape(b, t, h, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-2, -1) / d ** 0.5, dim=-1)


def test_attention_rows_sum_to_one_and_equal_manual_softmax():
    vit = _tiny_vit().train()
    images = _images(2)
    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in vit.blocks]
    fused_before = [b.attn.fused_attn for b in vit.blocks]
    maps = attention_maps(vit, images)
    for h in hooks:
        h.remove()
    assert len(maps) == 3 and maps[0].shape == (2, 3, 17, 17)  # 4x4 patches + [CLS]
    for block, x, a in zip(vit.blocks, inputs, maps):
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 17), rtol=0, atol=1e-5)
        torch.testing.assert_close(a, _manual_attention(block, x), rtol=1e-4, atol=1e-6)
    assert [b.attn.fused_attn for b in vit.blocks] == fused_before and vit.training


def _numpy_rollout(maps: list[np.ndarray]) -> np.ndarray:
    """Abnar & Zuidema 2020 sec. 3: A_res = 0.5 W_att + 0.5 I per layer (heads averaged),
    rollout(l_i) = A_res(l_i) rollout(l_{i-1}), rollout(l_0) = A_res(l_0)."""
    out = None
    for a in maps:
        a_res = 0.5 * a.mean(1) + 0.5 * np.eye(a.shape[-1])
        out = a_res if out is None else np.einsum("bij,bjk->bik", a_res, out)
    return out


def test_rollout_matches_numpy_and_stays_row_stochastic():
    rng = np.random.default_rng(0)
    maps = []
    for _ in range(4):
        logits = rng.normal(size=(2, 3, 6, 6)) * 2
        maps.append(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
    got = rollout([torch.tensor(m, dtype=torch.float32) for m in maps]).double().numpy()
    np.testing.assert_allclose(got, _numpy_rollout(maps), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)


def test_cls_attention_maps_are_image_shaped_and_taken_from_the_cls_row():
    vit = _tiny_vit()
    images = _images(2)
    res = cls_attention(vit, images)
    assert res["heads"].shape == (2, 3, 4, 4) and res["rollout"].shape == (2, 4, 4)
    last = attention_maps(vit, images)[-1]
    torch.testing.assert_close(res["heads"].flatten(2), last[:, :, 0, 1:])
    # The [CLS] row minus its own entry: what is left of a row that sums to 1.
    torch.testing.assert_close(res["heads"].sum((2, 3)), 1 - last[:, :, 0, 0])


def test_resnet_and_cls_free_vit_are_clear_errors():
    from fastssl.config import ModelConfig
    from fastssl.encoders import create_encoder

    resnet = create_encoder(ModelConfig(encoder="resnet18", small_input=True), 32)
    with pytest.raises(UserError, match="need a ViT encoder"):
        attention_maps(resnet, _images(1))
    no_cls = _tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(UserError, match=r"no \[CLS\] token"):
        cls_attention(no_cls, _images(1))


@pytest.mark.parametrize("flags", [{}, {"stem": "conv"}, {"spt_lsa": True}, {"pos_embed": "sincos"}])
def test_registered_vit_variants_give_row_stochastic_maps(flags):
    from fastssl.config import ModelConfig
    from fastssl.encoders import create_encoder

    torch.manual_seed(0)
    enc = create_encoder(ModelConfig(encoder="vit_pico", **flags), 32)
    maps = attention_maps(enc, _images(2))
    assert len(maps) == len(enc.blocks)
    t = maps[0].shape[-1]
    for a in maps:
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), rtol=0, atol=1e-5)
    if flags.get("spt_lsa"):
        # Lee et al. 2021 sec. 3.2: LSA masks each token's attention to itself.
        assert all(float(a.diagonal(dim1=-2, dim2=-1).abs().max()) == 0.0 for a in maps)
    res = cls_attention(enc, _images(1, seed=2))
    assert res["rollout"].numel() == t - 1
