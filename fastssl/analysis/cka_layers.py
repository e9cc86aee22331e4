"""Per-layer features for CKA, from forward hooks on an encoder's stages.

Which layers: for a ResNet, the stem and every residual block (`layer{s}.{b}`); for a ViT, the patch
embedding and every transformer block. The last entry is always the encoder's own output (pooled features):
for a ResNet that is the last block's map averaged, so its row repeats the last block's (kept: every encoder
shows the same last row).
How a layer becomes one vector per image: spatial maps (B, C, H, W) are averaged over H x W (global
average pooling, as the ResNet's head does); token sequences (B, T, D) are averaged over the patch tokens,
leaving out [CLS] / register tokens so that a layer's vector does not depend on the pooling the method chose.
"""

from __future__ import annotations

import torch
from torch import nn

from fastssl.errors import UserError


def _layers(encoder: nn.Module, name: str) -> tuple[list[tuple[str, nn.Module]], int | None]:
    """[(label, module)] and, for a ViT, its number of prefix tokens (None for a CNN)."""
    from fastssl.analysis.attention import num_prefix_tokens, vit_of

    try:
        vit = vit_of(encoder)
    except UserError:
        vit = None
    if vit is not None:
        found = [("patch_embed", vit.patch_embed)] if isinstance(getattr(vit, "patch_embed", None), nn.Module) else []
        found += [(f"block{i}", b) for i, b in enumerate(vit.blocks)]
        return found, num_prefix_tokens(vit)
    stages = [getattr(encoder, f"layer{s}", None) for s in (1, 2, 3, 4)]
    if all(isinstance(s, nn.Sequential) for s in stages):
        stem = getattr(encoder, "maxpool", None)
        found = [("stem", stem)] if isinstance(stem, nn.Module) else []
        found += [(f"layer{s + 1}.{b}", block) for s, stage in enumerate(stages) for b, block in enumerate(stage)]
        return found, None
    what = f"{name!r} ({type(encoder).__name__})" if name else type(encoder).__name__
    raise UserError(f"CKA needs a ResNet (layer1..layer4) or a ViT (blocks) encoder; the encoder is {what}")


def _pool(out: torch.Tensor, prefix: int | None) -> torch.Tensor:
    if out.ndim == 4:
        return out.float().mean((2, 3))
    if out.ndim == 3:
        if prefix is not None and out.shape[1] > prefix:
            out = out[:, prefix:]
        return out.float().mean(1)
    return out.float().flatten(1)


@torch.no_grad()
def layer_features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 64,
                   name: str = "") -> tuple[list[str], list[torch.Tensor]]:
    """(layer labels, [(N, features) on the CPU per layer]) for N images, in eval mode."""
    layers, prefix = _layers(encoder, name)
    # The patch embedding's output has no prefix tokens yet.
    prefixes = {lbl: (0 if lbl == "patch_embed" else prefix) for lbl, _ in layers}
    current: dict[str, torch.Tensor] = {}

    def hook(label):
        def fn(module, args, out):
            out = out[0] if isinstance(out, (tuple, list)) else out
            current[label] = _pool(out, prefixes[label]).cpu()
        return fn

    handles = [m.register_forward_hook(hook(lbl)) for lbl, m in layers]
    collected: dict[str, list[torch.Tensor]] = {lbl: [] for lbl, _ in layers}
    collected["output"] = []
    was_training = encoder.training
    try:
        encoder.eval()
        for chunk in images.split(batch_size):
            current.clear()
            out = encoder(chunk)
            for lbl, _ in layers:
                collected[lbl].append(current[lbl])
            collected["output"].append(_pool(out, prefix).cpu())
    finally:
        for h in handles:
            h.remove()
        encoder.train(was_training)
    labels = list(collected)
    return labels, [torch.cat(collected[lbl]) for lbl in labels]
