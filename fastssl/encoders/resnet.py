"""timm ResNets with the uniform `num_classes=0` feature interface."""

from __future__ import annotations

import timm
from torch import nn

from fastssl.encoders import ENCODERS


def _resnet(timm_name: str):
    def build(model_cfg, image_size: int) -> nn.Module:
        # zero_init_last: each residual branch's last BN starts at gamma 0 (SimCLR's and MoCo v3's
        # zero_init_residual); MoCo v1/v2's torchvision ResNet does not (model.zero_init_residual=false).
        model = timm.create_model(timm_name, pretrained=False, num_classes=0,
                                  zero_init_last=model_cfg.zero_init_residual)
        if model_cfg.small_input:
            # CIFAR-style stem (SimCLR appendix B.9): on 32-64 px images the 7x7/2 conv and max-pool
            # would leave a 1-2 px feature map.
            model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        return model

    return build


for _name in ("resnet18", "resnet34", "resnet50"):
    ENCODERS.register(_name)(_resnet(_name))
