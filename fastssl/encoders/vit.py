"""timm ViTs with the uniform `num_classes=0` feature interface (the [CLS] token)."""

from __future__ import annotations

import timm
from torch import nn

from fastssl.encoders import ENCODERS


def _vit(timm_name: str):
    def build(model_cfg, image_size: int) -> nn.Module:
        return timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=image_size)

    return build


for _name, _timm in (("vit_tiny", "vit_tiny_patch16_224"), ("vit_small", "vit_small_patch16_224"),
                     ("vit_base", "vit_base_patch16_224")):
    ENCODERS.register(_name)(_vit(_timm))
