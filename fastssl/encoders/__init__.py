"""Encoders by name (timm style). Every encoder returns pooled features and has `num_features`."""

from __future__ import annotations

import importlib

from torch import nn

from fastssl.registry import Registry

# name -> builder(model_cfg: ModelConfig, image_size: int) -> nn.Module with .num_features
ENCODERS: Registry = Registry("encoder")

_MODULES = ("resnet", "vit")


def _load_all() -> None:
    for name in _MODULES:
        importlib.import_module(f"fastssl.encoders.{name}")


def create_encoder(model_cfg, image_size: int) -> nn.Module:
    _load_all()
    return ENCODERS.get(model_cfg.encoder)(model_cfg, image_size)


def encoder_names() -> list[str]:
    _load_all()
    return ENCODERS.names()
