"""Dense relative localisation (Liu et al. 2021, "Efficient Training of Visual Transformers with Small
Datasets", sec. 4): an auxiliary self-supervised loss for any ViT method.

Why: without convolutions' locality bias a ViT must learn spatial structure from data; on small data it
does so poorly. Asking a small MLP to predict, from two output tokens alone, how far apart their patches
lie forces the token embeddings to carry where they are. Per image, m pairs of cells (i, j), (h, p) of the
k x k output grid are sampled uniformly; the target is (|i - h| / k, |j - p| / k) and the loss is the L1
distance to the prediction, averaged over pairs and images (the paper's L_drloc). The method adds it with
the recipe's weight (method.drloc_weight, the paper's lambda).
"""

from __future__ import annotations

import torch
from torch import nn

from fastssl.errors import UserError
from fastssl.heads import build_mlp


def tokens_and_features(encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features as encoder(x) returns them, patch-token grid B x rows x cols x D) in one pass."""
    tokens = encoder.forward_features(x)
    features = encoder.forward_head(tokens, pre_logits=True)
    rows, cols = encoder.patch_embed.grid_size
    grid = tokens[:, encoder.num_prefix_tokens:].reshape(tokens.shape[0], rows, cols, tokens.shape[-1])
    return features, grid


def sample_pairs(batch: int, rows: int, cols: int, pairs: int, device,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (B, m) tensors of flat cell indices, uniform over the grid, drawn independently."""
    u = torch.randint(rows * cols, (batch, pairs), device=device, generator=generator)
    v = torch.randint(rows * cols, (batch, pairs), device=device, generator=generator)
    return u, v


def relative_offsets(u: torch.Tensor, v: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, m, 2) targets (|row_u - row_v| / rows, |col_u - col_v| / cols), in [0, 1)."""
    du = (torch.div(u, cols, rounding_mode="floor") - torch.div(v, cols, rounding_mode="floor")).abs()
    dv = (u % cols - v % cols).abs()
    return torch.stack([du / rows, dv / cols], dim=-1).float()


class DenseRelativeLoc(nn.Module):
    """The localisation MLP and L_drloc. Its parameters train with the method's optimiser."""

    def __init__(self, dim: int, pairs: int = 64, hidden: int = 512):
        super().__init__()
        self.pairs = pairs
        # Sec. 4: a small MLP on the concatenated pair of embeddings, two outputs (row and column offset);
        # Linear(+bias)-ReLU layers without BN as the authors' aux_modules.py (BN would couple the pairs of a
        # batch, and become a SyncBN all-reduce under MoCo v3's global BN).
        self.mlp = build_mlp(3, 2 * dim, hidden, 2, last_bn=False, hidden_bn=False)

    def forward(self, grid: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, rows, cols, d = grid.shape
        u, v = sample_pairs(b, rows, cols, self.pairs, grid.device, generator)
        flat = grid.reshape(b, rows * cols, d)
        e_u = torch.gather(flat, 1, u[..., None].expand(-1, -1, d))
        e_v = torch.gather(flat, 1, v[..., None].expand(-1, -1, d))
        pred = self.mlp(torch.cat([e_u, e_v], dim=-1).reshape(b * self.pairs, 2 * d))
        target = relative_offsets(u, v, rows, cols).reshape(b * self.pairs, 2)
        # L1 norm of the 2-vector per pair (eq. of L_drloc), then the mean over pairs and images.
        return (pred.float() - target).abs().sum(dim=-1).mean()


def validate_drloc(cfg) -> None:
    from fastssl.encoders.vit import ARCHS, is_vit

    m = cfg.method
    if m.drloc_weight < 0:
        raise UserError(f"method.drloc_weight must be >= 0 (0 = off), got {m.drloc_weight}")
    if m.drloc_weight > 0 and not is_vit(cfg.model.encoder):
        raise UserError(f"method.drloc_weight={m.drloc_weight} needs a ViT's token grid but model.encoder="
                        f"{cfg.model.encoder!r} is not a ViT; ViTs: {', '.join(sorted(ARCHS))}")
    if m.drloc_pairs < 1:
        raise UserError(f"method.drloc_pairs must be >= 1, got {m.drloc_pairs}")
