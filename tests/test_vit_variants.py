"""The ViT variants: registry-wide interface, frozen random patch projection, fixed 2-D sin-cos positions
(oracle: the formula of MoCo v3's vits.py in numpy), the conv stem (token grid and FLOPs against ViT_P),
shifted patch tokens (oracle: numpy shifts) and locality self-attention (masking, temperature)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastssl.config import ModelConfig, config_from_dict
from fastssl.encoders import create_encoder
from fastssl.encoders.vit import ARCHS, check_model_config
from fastssl.encoders.vit_embed import ShiftedPatchTokenization, shift_image
from fastssl.encoders.vit_lsa import LocalitySelfAttention
from fastssl.errors import UserError
from fastssl.methods import build_method
from fastssl.optim import build_optimizer

from pipelines.base import ViewBatch


@pytest.mark.parametrize("name", sorted(ARCHS))
@pytest.mark.parametrize("variant", [{}, dict(stem="conv"), dict(spt_lsa=True)])
def test_every_registered_vit_returns_cls_features(name, variant):
    with torch.device("meta"):  # shapes and structure only: no weights materialised, no arithmetic
        enc = create_encoder(ModelConfig(encoder=name, patch_size=8, **variant), 32)
        out = enc(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, ARCHS[name].width) == (2, enc.num_features)
    assert len(enc.blocks) == ARCHS[name].depth - (variant.get("stem") == "conv")


def _numpy_sincos(rows, cols, dim, temperature=10000.0):
    # MoCo v3 vits.py build_2d_sincos_position_embedding, written out in float64.
    q = dim // 4
    omega = 1.0 / temperature ** (np.arange(q) / q)
    out = np.zeros((rows * cols, dim))
    for r in range(rows):
        for c in range(cols):
            t = r * cols + c
            out[t] = np.concatenate([np.sin(r * omega), np.cos(r * omega), np.sin(c * omega), np.cos(c * omega)])
    return out


def _moco_vit_cfg(**model):
    return config_from_dict(dict(
        data=dict(batch_size=4, image_size=16),
        model=dict(dict(encoder="vit_pico", patch_size=4), **model),
        method=dict(name="mocov3", proj_layers=2, proj_hidden=16, proj_dim=8, pred_layers=2, pred_hidden=16),
        optim=dict(name="adamw", weight_decay=0.1)))


def test_frozen_patch_projection_and_sincos_never_change_across_steps():
    torch.manual_seed(0)
    cfg = _moco_vit_cfg(frozen_patch_embed=True, pos_embed="sincos")
    method = build_method(cfg)
    enc = method.encoder
    proj = enc.patch_embed.proj
    assert not proj.weight.requires_grad and not proj.bias.requires_grad
    # MoCo v3 vits.py: uniform(+-sqrt(6 / (3 p^2 + d))), zero bias.
    bound = math.sqrt(6.0 / (3 * 4 * 4 + 96))
    assert proj.weight.abs().max() <= bound and proj.weight.abs().max() > 0.9 * bound
    np.testing.assert_allclose(enc.pos_embed[0, 1:].double().numpy(), _numpy_sincos(4, 4, 96), atol=1e-6)
    assert torch.count_nonzero(enc.pos_embed[0, 0]) == 0  # [CLS] gets no position
    frozen = {"w": proj.weight.clone(), "b": proj.bias.clone(), "pos": enc.pos_embed.clone()}
    block = enc.blocks[0].attn.qkv.weight.clone()
    opt = build_optimizer(cfg.optim, method, lr=1e-2)  # AdamW with weight decay: decay alone would move them
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        batch = ViewBatch(tuple(torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)),
                          torch.zeros(4, dtype=torch.long), torch.arange(4))
        method(batch).loss.backward()
        assert proj.weight.grad is None and proj.bias.grad is None and enc.pos_embed.grad is None
        opt.step()
        opt.zero_grad()
        method.after_step(step, 3)
    assert torch.equal(proj.weight, frozen["w"]) and torch.equal(proj.bias, frozen["b"])
    assert torch.equal(enc.pos_embed, frozen["pos"])
    assert not torch.equal(enc.blocks[0].attn.qkv.weight, block)  # the rest trains
    assert torch.equal(method.key_encoder.patch_embed.proj.weight, frozen["w"])


@pytest.mark.parametrize("name, size, patch", [("vit_tiny", 224, 16), ("vit_small", 224, 16), ("vit_pico", 64, 8)])
def test_conv_stem_gives_the_same_token_grid_and_flops_within_5_percent(name, size, patch):
    flops, shapes = {}, {}
    for stem in ("patch", "conv"):
        with torch.device("meta"), torch.no_grad():  # FLOPs are counted from shapes; nothing is computed
            enc = create_encoder(ModelConfig(encoder=name, stem=stem, patch_size=patch), size).eval()
            x = torch.randn(1, 3, size, size)
            shapes[stem] = enc.forward_features(x).shape
            with FlopCounterMode(display=False) as counter:
                enc(x)
        flops[stem] = counter.get_total_flops()
        assert enc.patch_embed.grid_size == (size // patch, size // patch)
    assert shapes["conv"] == shapes["patch"]
    if name != "vit_pico":  # Xiao et al. 2021 table 1 compares the 1GF and 4GF models at 224 px
        assert abs(flops["conv"] / flops["patch"] - 1) < 0.05, flops


def test_conv_stem_is_3x3_stride_2_convs_with_bn_relu_then_a_1x1():
    enc = create_encoder(ModelConfig(encoder="vit_small", stem="conv"), 224)
    layers = list(enc.patch_embed.proj)
    convs = [m for m in layers if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 4 + [(1, 1)]
    assert [c.stride for c in convs[:4]] == [(2, 2)] * 4
    assert [c.out_channels for c in convs] == [48, 96, 192, 384, 384]  # ViT_C-4GF
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in layers) == 4


def _np_shift(x, dy, dx):
    out = np.zeros_like(x)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                out[..., i, j] = x[..., i + dy, j + dx]
    return out


def test_shifted_patch_tokens_see_the_diagonal_neighbours():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for dy, dx in ShiftedPatchTokenization.SHIFTS:
        np.testing.assert_array_equal(shift_image(x, 2 * dy, 2 * dx).numpy(), _np_shift(x.numpy(), 2 * dy, 2 * dx))
    spt = ShiftedPatchTokenization(img_size=8, patch_size=4, in_chans=3, embed_dim=10)
    assert spt.norm.normalized_shape == (5 * 3 * 4 * 4,)
    tokens = spt(x)
    assert tokens.shape == (2, 4, 10)
    # Oracle for token (row 1, col 0): the 4x4 window of the image and of each half-patch shift, layer-normed
    # over all 240 values (order inside the vector is a fixed permutation, so compare sorted values).
    xs = np.concatenate([x.numpy()] + [_np_shift(x.numpy(), 2 * dy, 2 * dx) for dy, dx in spt.SHIFTS], axis=1)
    window = xs[1, :, 4:8, 0:4].reshape(-1)
    normed = (window - window.mean()) / np.sqrt(window.var() + spt.norm.eps)
    b, c, h, w = xs.shape
    got = spt.norm(torch.tensor(xs).reshape(b, c, 2, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(b, 4, -1))
    np.testing.assert_allclose(np.sort(got[1, 2].detach().numpy()), np.sort(normed), rtol=1e-4, atol=1e-5)


def test_locality_self_attention_masks_the_diagonal_and_learns_its_temperature():
    torch.manual_seed(0)
    attn = LocalitySelfAttention(24, num_heads=3)
    assert attn.qkv.bias is None  # the authors' to_qkv has no bias
    torch.testing.assert_close(attn.scale.detach(), torch.full((3,), 8 ** -0.5))  # tau = sqrt(d_head) at init
    with torch.no_grad():
        attn.scale.copy_(torch.tensor([0.2, 0.5, 1.5]))  # one temperature per head (the authors' code)
    x = torch.randn(2, 5, 24)
    probs = attn.attention_probs(x)
    assert torch.all(torch.diagonal(probs, dim1=-2, dim2=-1) == 0)
    # Oracle in float64 numpy from the layer's weights: per head h, softmax over j != i of s_h q_i . k_j.
    xd = x.double().numpy()
    qkv = xd @ attn.qkv.weight.detach().double().numpy().T
    q, k, v = (qkv[..., i * 24:(i + 1) * 24].reshape(2, 5, 3, 8).transpose(0, 2, 1, 3) for i in range(3))
    logits = np.einsum("bhid,bhjd->bhij", q, k) * np.array([0.2, 0.5, 1.5]).reshape(1, 3, 1, 1)
    logits[:, :, np.arange(5), np.arange(5)] = -np.inf
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs.detach().double().numpy(), ref, rtol=1e-5, atol=1e-6)
    heads = np.einsum("bhij,bhjd->bhid", ref, v).transpose(0, 2, 1, 3).reshape(2, 5, 24)
    expect = heads @ attn.proj.weight.detach().double().numpy().T + attn.proj.bias.detach().double().numpy()
    out = attn(x)
    np.testing.assert_allclose(out.detach().double().numpy(), expect, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert attn.scale.grad is not None and torch.all(attn.scale.grad != 0)


def test_spt_lsa_flag_uses_both_modules():
    enc = create_encoder(ModelConfig(encoder="vit_small_data", spt_lsa=True), 32)
    assert isinstance(enc.patch_embed, ShiftedPatchTokenization)
    assert all(isinstance(b.attn, LocalitySelfAttention) for b in enc.blocks)
    assert len(enc.blocks) == 9 and enc.patch_embed.grid_size == (8, 8)


@pytest.mark.parametrize("model, size, fragment", [
    (dict(encoder="resnet18", spt_lsa=True), 32, "model.spt_lsa=True is a ViT option but model.encoder='resnet18'"),
    (dict(encoder="resnet50", pos_embed="sincos"), 32, "is not a ViT; ViTs: vit_base"),
    (dict(encoder="vit_tiny", stem="conv", spt_lsa=True), 32, "pick one"),
    (dict(encoder="vit_tiny", stem="conv", frozen_patch_embed=True), 32, "needs model.stem=patch"),
    (dict(encoder="vit_tiny", pos_embed="rope"), 32, "unknown model.pos_embed 'rope'"),
    (dict(encoder="vit_tiny", stem="hybrid"), 32, "unknown model.stem 'hybrid'"),
    (dict(encoder="vit_tiny", patch_size=5), 32, "data.image_size=32 is not a multiple of the ViT patch size 5"),
    (dict(encoder="vit_tiny", patch_size=6, stem="conv"), 36, "power-of-two patch size"),
    (dict(encoder="vit_huge"), 32, "unknown encoder 'vit_huge'; registered:"),
])
def test_bad_model_config_is_one_clear_error(model, size, fragment):
    with pytest.raises(UserError) as e:
        check_model_config(ModelConfig(**model))
        create_encoder(ModelConfig(**model), size)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["simclr", "mocov2", "mocov3"])
def test_every_method_rejects_vit_options_on_a_resnet(method):
    # build_method checks the model section for all methods (SimCLR once ignored them silently).
    from fastssl.config import load_config
    from fastssl.methods import build_method

    cfg = load_config(None, [f"method.name={method}", "model.encoder=resnet18", "model.frozen_patch_embed=true"])
    with pytest.raises(UserError, match="model.frozen_patch_embed=True is a ViT option"):
        build_method(cfg)


def test_moco_init_is_moco_v3s_uniform_xavier_with_qkv_as_three_matrices():
    # moco-v3 vits.py: every Linear xavier-uniform, qkv treated as three (d -> d) matrices, biases zero, the
    # patch projection xavier on its flattened (3 p^2 -> d) matrix. Oracle: the uniform bound b of each
    # (all |w| <= b, std = b / sqrt(3) within sampling error), against timm's trunc-normal(0.02).
    torch.manual_seed(0)
    d = ARCHS["vit_small"].width
    enc = create_encoder(ModelConfig(encoder="vit_small", init="moco", pos_embed="sincos"), 64)
    blk = enc.blocks[0]
    proj = enc.patch_embed.proj
    for w, bound in ((blk.attn.qkv.weight, math.sqrt(6.0 / (d + d))),  # fan (3d / 3) + d
                     (blk.mlp.fc1.weight, math.sqrt(6.0 / (d + 4 * d))),
                     (blk.attn.proj.weight, math.sqrt(6.0 / (2 * d))),
                     (proj.weight, math.sqrt(6.0 / (proj.weight[0].numel() + d)))):
        w = w.detach().double()
        assert w.abs().max() <= bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 5 * bound / math.sqrt(3) / math.sqrt(2 * w.numel())
    assert all(torch.all(b == 0) for b in (blk.attn.qkv.bias, blk.mlp.fc1.bias, proj.bias))
    assert proj.weight.requires_grad  # initialised as MoCo v3 does, frozen only with frozen_patch_embed
    timm = create_encoder(ModelConfig(encoder="vit_small"), 64).blocks[0].attn.qkv.weight
    assert abs(timm.std().item() - 0.02) < 1e-3


def test_unknown_init_is_a_config_error():
    from fastssl.errors import UserError

    with pytest.raises(UserError, match="unknown model.init 'xavier'; valid: timm, moco"):
        check_model_config(ModelConfig(encoder="vit_small", init="xavier"))
    with pytest.raises(UserError, match="model.init='moco' is a ViT option"):
        check_model_config(ModelConfig(encoder="resnet18", init="moco"))
    with pytest.raises(UserError, match="model.zero_init_residual=False is a ResNet option"):
        check_model_config(ModelConfig(encoder="vit_small", zero_init_residual=False))


def _pico(drop_path: float, **model) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_encoder(ModelConfig(encoder="vit_pico", patch_size=4, drop_path=drop_path, **model), 16)


def _branch_drop_rates(enc) -> list[tuple[float, float]]:
    """(attention, MLP) residual-branch drop probability of each block; an Identity (rate 0) counts as 0."""
    from timm.layers import DropPath

    return [tuple(m.drop_prob if isinstance(m, DropPath) else 0.0 for m in (b.drop_path1, b.drop_path2))
            for b in enc.blocks]


@pytest.mark.parametrize("variant", [{}, dict(stem="conv")])
def test_drop_path_rate_rises_linearly_over_the_blocks(variant):
    # Stochastic depth's linear decay rule (Huang et al. 2016 sec. 3) as timm and DeiT apply it: block l of L
    # drops both its residual branches with probability drop_path * l / (L - 1), 0 for the first block.
    enc = _pico(0.3, **variant)
    depth = len(enc.blocks)
    expect = np.linspace(0.0, 0.3, depth)
    assert depth == 4 - bool(variant)
    np.testing.assert_allclose(np.array(_branch_drop_rates(enc)), np.stack([expect, expect], 1), atol=1e-7)
    assert _branch_drop_rates(_pico(0.0, **variant)) == [(0.0, 0.0)] * depth


def test_drop_path_drops_whole_residual_branches_per_sample_at_each_blocks_rate():
    # Stochastic depth (Huang et al. 2016), timm's inverted form: in training each sample's residual branch
    # is either dropped (exactly 0) or kept and scaled by 1 / (1 - p), independently per sample, with
    # P(drop) = p. Binomial tolerance: n = 512 samples per branch, 4.5 sd.
    from timm.layers import DropPath

    enc = _pico(0.6).train()
    n, seen = 512, []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod.drop_prob, inp[0], out)))
             for m in enc.modules() if isinstance(m, DropPath)]
    assert len(hooks) == 2 * (len(enc.blocks) - 1)  # the first block's rate is 0: no DropPath at all
    with torch.no_grad():
        enc(torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    for h in hooks:
        h.remove()
    assert len(seen) == len(hooks)
    for p, x, y in seen:
        dropped = (y == 0).flatten(1).all(1)
        assert (x != 0).flatten(1).any(1).all()  # a zero row in y is a drop, not a zero branch
        torch.testing.assert_close(y[~dropped], x[~dropped] / (1 - p), rtol=1e-6, atol=1e-6)
        rate = dropped.float().mean().item()
        assert abs(rate - p) <= 4.5 * math.sqrt(p * (1 - p) / n), (p, rate)


def test_drop_path_is_stochastic_in_training_and_off_in_eval():
    enc, plain = _pico(0.5), _pico(0.0)
    plain.load_state_dict(enc.state_dict())  # the same weights; stochastic depth has no parameters
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)).expand(16, -1, -1, -1)
    torch.manual_seed(3)
    with torch.no_grad():
        enc.train()
        a, b = enc(x), enc(x)
        enc.eval()
        plain.eval()
        e1, e2, ref = enc(x), enc(x), plain(x)
    assert not torch.allclose(a, b)  # a fresh draw every forward
    # 16 copies of one image: a per-batch draw would give 16 equal rows; per-sample draws give several.
    assert len({tuple(r) for r in a.round(decimals=4).tolist()}) > 1
    assert torch.equal(e1, e2)  # eval: deterministic ...
    torch.testing.assert_close(e1, ref, rtol=0, atol=0)  # ... and exactly the network without stochastic depth
