"""Token embeddings for the ViT variants: fixed 2-D sin-cos positions, the convolutional stem (ViT_C) and
shifted patch tokenization (SPT). Each stem is a drop-in for timm's PatchEmbed (same constructor and
attributes, NLC output), so timm's VisionTransformer takes it as `embed_layer`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(rows*cols, dim) fixed position embedding, tokens in row-major order.

    MoCo v3 (Chen, Xie, He 2021) sec. 5 / vits.py: a quarter of the channels each for sin and cos of the
    row, then sin and cos of the column, at frequencies temperature^(-i / (dim/4)) as in the Transformer.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = grid
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    a_r = r.reshape(-1, 1) * omega
    a_c = c.reshape(-1, 1) * omega
    return torch.cat([a_r.sin(), a_r.cos(), a_c.sin(), a_c.cos()], dim=1).float()


class _Tokenizer(nn.Module):
    """The attributes timm's VisionTransformer reads from its patch embedding."""

    def _set_geometry(self, img_size, patch_size: int) -> None:
        size = img_size if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        self.img_size = tuple(size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True):
        return self.patch_size[0] if as_scalar else self.patch_size


class ConvStem(_Tokenizer):
    """Xiao et al. 2021, "Early Convolutions Help Transformers See Better", sec. 3 / table 1.

    log2(p) 3x3 stride-2 convs with BN and ReLU (channels doubling up to the width d, as in ViT_C-1GF
    [24, 48, 96, 192] and -4GF [48, 96, 192, 384]), then a 1x1 conv to d: the same token grid as a p x p
    patchify. Its FLOPs are about one transformer block's, which is why ViT_C drops a block.
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 bias: bool = True, **unused):
        super().__init__()
        n = int(round(math.log2(patch_size)))
        if patch_size < 2 or 2 ** n != patch_size:
            raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch_size}")
        self._set_geometry(img_size, patch_size)
        widths = [max(8, embed_dim // 2 ** (n - 1 - i)) for i in range(n)]
        layers: list[nn.Module] = []
        c = in_chans
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        layers.append(nn.Conv2d(c, embed_dim, 1, bias=bias))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def shift_image(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., i, j] = x[..., i + dy, j + dx], zero where that falls outside the image."""
    s = max(abs(dy), abs(dx))
    h, w = x.shape[-2:]
    padded = F.pad(x, (s, s, s, s))
    return padded[..., s + dy:s + dy + h, s + dx:s + dx + w]


class ShiftedPatchTokenization(_Tokenizer):
    """Lee, Lee, Song 2021, "Vision Transformer for Small-Size Datasets", sec. 3.1 (SPT).

    The image and four copies shifted by half a patch along the diagonals are concatenated on channels, so
    each token also sees its neighbours' pixels (a wider receptive field); the 5C x p x p patches are
    flattened, layer-normalised and linearly projected.
    """

    SHIFTS = ((-1, -1), (-1, 1), (1, -1), (1, 1))  # left-up, right-up, left-down, right-down

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 bias: bool = True, **unused):
        super().__init__()
        if patch_size < 2:
            raise ValueError(f"shifted patch tokens need a patch size of at least 2, got {patch_size}")
        self._set_geometry(img_size, patch_size)
        patch_dim = (1 + len(self.SHIFTS)) * in_chans * patch_size * patch_size
        self.norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, embed_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.patch_size[0] // 2
        x = torch.cat([x] + [shift_image(x, dy * s, dx * s) for dy, dx in self.SHIFTS], dim=1)
        b, c, h, w = x.shape
        p = self.patch_size[0]
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        return self.proj(self.norm(patches))
