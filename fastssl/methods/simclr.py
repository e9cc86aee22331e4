"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

The loss is the paper's NT-Xent, the mean over the 2N views (sec. 2.1), times `method.loss_scale`. The released
code (objective.py) returns the sum of its two directions' means, twice the mean: with scale 1, a learning rate
moves biases and BN parameters (not adapted by LARS) half as far as there, and weight decay weighs twice as
much against the gradient. Recipes that take the paper's lr and weight decay set loss_scale 2.
"""

from __future__ import annotations

import torch

from fastssl.encoders import create_encoder
from fastssl.errors import UserError
from fastssl.heads import build_mlp
from fastssl.losses import nt_xent
from fastssl.methods.base import METHODS, LossOutput, Method

from pipelines.base import ViewBatch


class SimCLR(Method):
    def __init__(self, cfg):
        super().__init__()
        m = cfg.method
        self.temperature = m.temperature
        self.loss_impl = m.loss_impl
        self.loss_scale = m.loss_scale
        self.encoder = create_encoder(cfg.model, cfg.data.image_size)
        # Sec. 2.1 / SimCLR v2: an MLP projection head g(.) whose output the loss sees; the encoder's
        # features h are what is evaluated.
        # SimCLR v2's head (model_util.py) ends in a BN with a scale and no shift; fastssl's last BN has
        # neither (MoCo v3's choice, build_mlp's default).
        self.projector = build_mlp(m.proj_layers, self.encoder.num_features, m.proj_hidden, m.proj_dim,
                                   last_bn=m.proj_last_bn, hidden_bn=m.proj_hidden_bn)

    def forward(self, batch: ViewBatch) -> LossOutput:
        # Both views through the encoder as one batch: one launch per layer, and BN statistics over the 2N
        # views as in the paper's global BN.
        n = batch.views[0].shape[0]
        z = self.projector(self.encoder(torch.cat(batch.views[:2])))
        loss = nt_xent(z[:n], z[n:], self.temperature, impl=self.loss_impl)
        if self.loss_scale == 1.0:
            return LossOutput(loss)
        return LossOutput(self.loss_scale * loss, {"nt_xent": loss.detach()})


def validate(cfg) -> None:
    if cfg.method.temperature <= 0:
        raise UserError(f"method.temperature must be > 0, got {cfg.method.temperature}")
    if cfg.method.proj_layers < 1:
        raise UserError(f"method.proj_layers must be >= 1, got {cfg.method.proj_layers}")


@METHODS.register("simclr")
def build(cfg) -> SimCLR:
    validate(cfg)
    return SimCLR(cfg)
