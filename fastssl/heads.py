"""The one MLP builder behind every projector and predictor (MoCo v3's `_build_mlp`)."""

from __future__ import annotations

from torch import nn


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, *, last_bn: bool = True,
              last_bn_affine: bool = False, hidden_bn: bool = True, last_bias: bool | None = None) -> nn.Sequential:
    """Linear-BN-ReLU x (num_layers - 1), then Linear (+ BN).

    The defaults are MoCo v3's `_build_mlp` (moco-v3 builder.py): no Linear carries a bias (a BatchNorm
    follows each hidden one; `last_bias=False` keeps the last one bias-free too, as MoCo v3 does even where
    no BN follows it) and the last BN has no affine parameters (MoCo v3 removed SimCLR v2's scale as well as
    its shift). `hidden_bn=False` gives the plain Linear(+bias)-ReLU hidden layers of MoCo v2's head and
    DRLoc's MLP. By default the last Linear has a bias exactly when no BN follows it (MoCo v1's fc).
    """
    if num_layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        if hidden_bn:
            layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim)]
        else:
            layers.append(nn.Linear(dim, hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=(not last_bn) if last_bias is None else last_bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*layers)
