"""Locality Self-Attention (Lee, Lee, Song 2021, "Vision Transformer for Small-Size Datasets", sec. 3.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LocalitySelfAttention(nn.Module):
    """Multi-head self-attention with a learnable temperature and the diagonal masked.

    Why: with few images, attention scores come out smooth (every token attends almost uniformly, and most
    strongly to itself). Masking each token's similarity with itself and learning the softmax temperature
    (initialised at sqrt(d_head), the usual scale) sharpens attention towards other, informative tokens.
    As the authors' code (SPT_LSA_ViT models/vit.py): one learnable scale 1/tau per head, the raw parameter
    (its gradient and weight decay act on 1/tau itself), and no qkv bias (build_vit passes qkv_bias=False).
    Same constructor as timm's Attention, so it is a drop-in `attn_layer`.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, **unused):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.scale = nn.Parameter(torch.full((num_heads,), self.head_dim ** -0.5))
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q * self.scale.view(1, -1, 1, 1), k, v

    @staticmethod
    def _mask(n: int, device, attn_mask: torch.Tensor | None) -> torch.Tensor:
        keep = ~torch.eye(n, dtype=torch.bool, device=device)  # True = may attend
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise ValueError("locality self-attention takes boolean attention masks only")
            keep = keep & attn_mask
        return keep

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, N) softmax weights, built explicitly (for analysis and tests)."""
        q, k, _ = self._qkv(x)
        logits = (q @ k.transpose(-2, -1)).masked_fill(~self._mask(x.shape[1], x.device, None), float("-inf"))
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        b, n, c = x.shape
        q, k, v = self._qkv(x)
        # The learnable scale is already in q; SDPA's own scale must then be 1.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(n, x.device, attn_mask),
                                             dropout_p=self.attn_drop if self.training else 0.0, scale=1.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))
