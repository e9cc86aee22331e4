"""The one MLP builder behind every projector and predictor (MoCo v3's `_build_mlp`)."""

from __future__ import annotations

from torch import nn


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, *, last_bn: bool = True,
              last_bn_affine: bool = False) -> nn.Sequential:
    """Linear-BN-ReLU x (num_layers - 1), then Linear (+ BN).

    Linear layers carry no bias because a BatchNorm follows each (MoCo v3, sec. 4 / main_moco.py). The
    last BN has no affine parameters by default, as MoCo v3's projector and SimCLR v2's do; a 1-layer head
    (MoCo v1's linear projection) is a single Linear with a bias when no BN follows.
    """
    if num_layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*layers)
