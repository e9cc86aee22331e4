"""Vision transformers (timm's VisionTransformer) with the uniform `num_classes=0` interface: the encoder
returns the normalised [CLS] token; `forward_features` returns all tokens (DRLoc reads the patch grid).

Recipe flags (ModelConfig) switch on the variants that make ViTs train stably or learn from small data:
  pos_embed: sincos        fixed 2-D sin-cos positions (MoCo v3 sec. 5)
  frozen_patch_embed: true random patch projection that is never trained (MoCo v3 sec. 5)
  stem: conv               convolutional stem, one block fewer (Xiao et al. 2021, ViT_C)
  spt_lsa: true            shifted patch tokens + locality self-attention (Lee et al. 2021)
  init: moco               MoCo v3's initialisation (vits.py): xavier-uniform Linears, qkv as three separate
                           matrices, zero biases, xavier patch projection (timm's weight_init="moco" + the
                           projection, which timm leaves out); default "timm", trunc-normal(0.02)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fastssl.encoders import ENCODERS, encoder_names
from fastssl.encoders.vit_embed import ConvStem, ShiftedPatchTokenization, sincos_2d
from fastssl.encoders.vit_lsa import LocalitySelfAttention
from fastssl.errors import UserError


@dataclass(frozen=True)
class ViTArch:
    width: int
    depth: int
    heads: int
    patch: int = 16
    mlp_ratio: float = 4.0


ARCHS: dict[str, ViTArch] = {
    "vit_tiny": ViTArch(192, 12, 3),  # DeiT-Ti (Touvron et al. 2021, table 1)
    "vit_small": ViTArch(384, 12, 6),  # DeiT-S (Touvron et al. 2021, table 1)
    "vit_base": ViTArch(768, 12, 12),  # ViT-B/16 (Dosovitskiy et al. 2021, table 1)
    # MoCo v3 sec. 4 / vits.py: its ViT-S uses 12 heads (not DeiT-S's 6), the model of its table 2.
    "vit_small_mocov3": ViTArch(384, 12, 12),
    # Lee et al. 2021 sec. 4.1: the ViT they train from scratch on CIFAR (patch 4) and Tiny-ImageNet
    # (patch 8): depth 9, 12 heads of 16 dims, MLP ratio 2.
    "vit_small_data": ViTArch(192, 9, 12, patch=4, mlp_ratio=2.0),
    # Not from a paper: a ViT small enough for the *_synthetic recipes to train on 2 CPU cores.
    "vit_pico": ViTArch(96, 4, 3, patch=8, mlp_ratio=2.0),
}

VIT_FLAGS = ("patch_size", "pos_embed", "frozen_patch_embed", "stem", "spt_lsa", "drop_path", "init")
RESNET_FLAGS = ("small_input", "zero_init_residual")  # meaningless on a ViT: an error there too
POS_EMBEDS = ("learned", "sincos")
INITS = ("timm", "moco")
STEMS = ("patch", "conv")


def is_vit(encoder: str) -> bool:
    return encoder in ARCHS


def _flag_defaults(names: tuple[str, ...] = VIT_FLAGS) -> dict:
    from fastssl.config import ModelConfig

    return {f.name: f.default for f in fields(ModelConfig) if f.name in names}


def check_model_config(model_cfg) -> None:
    """Config-time checks of the encoder name and the ViT flags (before any data is read)."""
    names = encoder_names()
    if model_cfg.encoder not in names:
        ENCODERS.get(model_cfg.encoder)  # raises the one-line error that lists the registered names
    defaults = _flag_defaults()
    resnet_defaults = _flag_defaults(RESNET_FLAGS)
    if not is_vit(model_cfg.encoder):
        for name, default in defaults.items():
            value = getattr(model_cfg, name)
            if value != default:
                raise UserError(f"model.{name}={value!r} is a ViT option but model.encoder="
                                f"{model_cfg.encoder!r} is not a ViT; ViTs: {', '.join(sorted(ARCHS))}")
        return
    for name in RESNET_FLAGS:
        if getattr(model_cfg, name) != resnet_defaults[name]:
            raise UserError(f"model.{name}={getattr(model_cfg, name)!r} is a ResNet option but model.encoder="
                            f"{model_cfg.encoder!r} is a ViT")
    if model_cfg.pos_embed not in POS_EMBEDS:
        raise UserError(f"unknown model.pos_embed {model_cfg.pos_embed!r}; valid: {', '.join(POS_EMBEDS)}")
    if model_cfg.init not in INITS:
        raise UserError(f"unknown model.init {model_cfg.init!r}; valid: {', '.join(INITS)}")
    if model_cfg.stem not in STEMS:
        raise UserError(f"unknown model.stem {model_cfg.stem!r}; valid: {', '.join(STEMS)}")
    if model_cfg.patch_size < 0:
        raise UserError(f"model.patch_size must be >= 0 (0: the encoder's own), got {model_cfg.patch_size}")
    if not 0.0 <= model_cfg.drop_path < 1.0:
        raise UserError(f"model.drop_path must be in [0, 1), got {model_cfg.drop_path}")
    if model_cfg.stem == "conv" and model_cfg.spt_lsa:
        raise UserError("model.stem=conv and model.spt_lsa=true both replace the patchify stem; pick one")
    if model_cfg.frozen_patch_embed and (model_cfg.stem != "patch" or model_cfg.spt_lsa):
        raise UserError("model.frozen_patch_embed=true freezes the linear patch projection; it needs "
                        f"model.stem=patch and model.spt_lsa=false, got stem={model_cfg.stem!r}, "
                        f"spt_lsa={model_cfg.spt_lsa}")


def _xavier_patch_projection(model: VisionTransformer) -> None:
    # MoCo v3 vits.py: Xavier-uniform on the flattened 3*p*p -> d matrix of the patchify convolution.
    proj = model.patch_embed.proj
    fan_in = proj.weight[0].numel()
    bound = math.sqrt(6.0 / float(fan_in + proj.weight.shape[0]))
    with torch.no_grad():
        nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(proj.bias)


def _freeze_patch_projection(model: VisionTransformer) -> None:
    # MoCo v3 sec. 5: a random patch projection, then stop-gradient; it removes the training instability
    # that shows up as loss dips.
    _xavier_patch_projection(model)
    model.patch_embed.proj.requires_grad_(False)


def build_vit(name: str, model_cfg, image_size: int) -> VisionTransformer:
    check_model_config(model_cfg)
    arch = ARCHS[name]
    patch = model_cfg.patch_size or arch.patch
    if image_size % patch:
        raise UserError(f"data.image_size={image_size} is not a multiple of the ViT patch size {patch} "
                        f"(model.patch_size)")
    depth = arch.depth
    kwargs: dict = {}
    if model_cfg.stem == "conv":
        if patch < 2 or patch & (patch - 1):
            raise UserError(f"model.stem=conv needs a power-of-two patch size, got {patch}")
        # Xiao et al. 2021 sec. 3: the stem costs about one block, so ViT_C has one block fewer than ViT_P.
        kwargs["embed_layer"] = ConvStem
        depth -= 1
    if model_cfg.spt_lsa:
        if patch < 2:
            raise UserError(f"model.spt_lsa=true shifts by half a patch; it needs a patch size >= 2, got {patch}")
        # The authors' attention has no qkv bias (their to_qkv); timm's blocks would pass qkv_bias=True.
        kwargs.update(embed_layer=ShiftedPatchTokenization, attn_layer=LocalitySelfAttention, qkv_bias=False)
    if model_cfg.init == "moco":
        kwargs["weight_init"] = "moco"
    if model_cfg.pos_embed == "sincos" and arch.width % 4:
        raise UserError(f"model.pos_embed=sincos needs a width divisible by 4; {name} has {arch.width}")
    model = VisionTransformer(img_size=image_size, patch_size=patch, embed_dim=arch.width, depth=depth,
                              num_heads=arch.heads, mlp_ratio=arch.mlp_ratio, num_classes=0,
                              drop_path_rate=model_cfg.drop_path, **kwargs)
    if model_cfg.pos_embed == "sincos":
        grid = model.patch_embed.grid_size
        table = torch.cat([torch.zeros(1, arch.width), sincos_2d(grid, arch.width)])  # [CLS] gets zeros
        model.pos_embed = nn.Parameter(table[None], requires_grad=False)
    if model_cfg.frozen_patch_embed:
        _freeze_patch_projection(model)
    elif model_cfg.init == "moco" and model_cfg.stem == "patch" and not model_cfg.spt_lsa:
        _xavier_patch_projection(model)
    return model


def _register(name: str) -> None:
    ENCODERS.register(name)(lambda model_cfg, image_size: build_vit(name, model_cfg, image_size))


for _name in ARCHS:
    _register(_name)
