"""Attention of the [CLS] token: per head in the last block, and attention rollout through all blocks.

timm computes attention inside F.scaled_dot_product_attention, which never materialises the weights. For the
duration of one forward we switch each block to timm's explicit path (`fused_attn = False`: softmax(q k^T
* scale), then `attn_drop`, an identity in eval mode) and read the weights as `attn_drop`'s input. The
weights are therefore what the block itself computes, including whatever a variant changes in between
(q/k norm, a mask), not a re-derivation that could drift from it. An attention module that builds its
weights its own way (fastssl's locality self-attention) says so with an `attention_probs(x)` method, which
is called on the block's own input.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastssl.errors import UserError


def vit_of(encoder: nn.Module, name: str = "") -> nn.Module:
    """The vision transformer inside `encoder` (itself or a submodule): the module with `.blocks`."""
    for m in encoder.modules():
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) and all(
                hasattr(b, "attn") for b in blocks):
            return m
    what = f"{name!r} ({type(encoder).__name__})" if name else type(encoder).__name__
    raise UserError(f"attention maps need a ViT encoder (transformer blocks with self-attention); "
                    f"the encoder is {what}")


def num_prefix_tokens(vit: nn.Module) -> int:
    return int(getattr(vit, "num_prefix_tokens", 1))


def patch_grid(vit: nn.Module, num_patches: int) -> tuple[int, int]:
    grid = getattr(getattr(vit, "patch_embed", None), "grid_size", None)
    if grid is not None and grid[0] * grid[1] == num_patches:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise UserError(f"cannot lay out {num_patches} patch tokens as a square grid")
    return side, side


@torch.no_grad()
def attention_maps(encoder: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The attention weights of every block, each (B, heads, T, T) with rows summing to 1 (eval mode)."""
    vit = vit_of(encoder)
    captured: list[torch.Tensor] = []
    handles, fused = [], []
    for i, block in enumerate(vit.blocks):
        attn = block.attn
        if callable(getattr(attn, "attention_probs", None)):
            handles.append(attn.register_forward_pre_hook(
                lambda m, args: captured.append(m.attention_probs(args[0]).float())))
            continue
        if not isinstance(getattr(attn, "attn_drop", None), nn.Module):
            raise UserError(f"block {i}'s attention ({type(attn).__name__}) has neither an attention_probs(x) "
                            f"method nor an attn_drop module to read the weights from; expected timm's Attention "
                            f"or a module that follows it")
        fused.append((attn, getattr(attn, "fused_attn", None)))
        if hasattr(attn, "fused_attn"):
            attn.fused_attn = False
        handles.append(attn.attn_drop.register_forward_hook(lambda m, args, out: captured.append(args[0].float())))
    was_training = encoder.training
    try:
        encoder.eval()
        encoder(images)
    finally:
        for h in handles:
            h.remove()
        for attn, value in fused:
            if value is not None:
                attn.fused_attn = value
        encoder.train(was_training)
    if len(captured) != len(vit.blocks):
        raise UserError(f"read {len(captured)} attention maps from {len(vit.blocks)} blocks; the encoder's "
                        f"attention does not follow timm's explicit path")
    return captured


def rollout(attns: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020, sec. 3): heads averaged, the residual connection modelled as
    0.5 A + 0.5 I (A + I with rows renormalised), then multiplied through the layers, last on the left.
    Returns (B, T, T); row t is how much each input token flows into output token t."""
    out = None
    for a in attns:
        a = a.double().mean(1)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True)
        out = a if out is None else a @ out
    return out.float()


def cls_attention(encoder: nn.Module, images: torch.Tensor) -> dict:
    """[CLS]-to-patch attention as image-shaped maps: `heads` (B, H, gh, gw) from the last block and
    `rollout` (B, gh, gw) through all blocks; prefix tokens (CLS, registers) are dropped from the maps."""
    vit = vit_of(encoder)
    prefix = num_prefix_tokens(vit)
    if prefix < 1 or getattr(vit, "cls_token", True) is None:
        raise UserError("the ViT has no [CLS] token (class_token=False); [CLS] attention maps need one")
    attns = attention_maps(encoder, images)
    b, h, t, _ = attns[-1].shape
    gh, gw = patch_grid(vit, t - prefix)
    return {"heads": attns[-1][:, :, 0, prefix:].reshape(b, h, gh, gw),
            "rollout": rollout(attns)[:, 0, prefix:].reshape(b, gh, gw),
            "num_blocks": len(attns)}
