"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers").

No queue: the negatives of each query are the other keys of the global batch. Query branch = encoder,
projector and predictor; key branch = EMA of encoder and projector (algorithm 1). The loss is symmetric,
ctr(q1, k2) + ctr(q2, k1), each InfoNCE scaled by 2T (the reference code's `* 2 * T`, which makes the
gradient scale independent of T). The momentum rises from `method.momentum` to 1 on a half cosine.
"""

from __future__ import annotations

import torch
from torch import nn

from fastssl.encoders import create_encoder
from fastssl.errors import UserError
from fastssl.heads import build_mlp
from fastssl.losses import info_nce
from fastssl.methods.base import METHODS, LossOutput, Method, refuse_simclr_loss_scale
from fastssl.methods.drloc import DenseRelativeLoc, tokens_and_features, validate_drloc
from fastssl.momentum import cosine_momentum, ema_update, momentum_copy, validate_momentum

from pipelines.base import ViewBatch


class MoCoV3(Method):
    # main_moco.py converts every BN to SyncBN: statistics of the global batch (the loop does it).
    global_bn = True

    def __init__(self, cfg):
        super().__init__()
        m = cfg.method
        self.temperature = m.temperature
        self.loss_impl = m.loss_impl
        self.base_momentum = m.momentum
        self.current_momentum = m.momentum
        self.drloc_weight = m.drloc_weight
        self.encoder = create_encoder(cfg.model, cfg.data.image_size)
        # Sec. 4 / moco-v3 builder.py `_build_mlp`: no Linear has a bias, BN after every hidden Linear, the
        # projector's last BN without affine; the predictor ends in such a BN for ViTs (MoCo_ViT) and in the
        # plain Linear for ResNets (MoCo_ResNet): method.pred_last_bn. Hidden 4096, out 256.
        self.projector = build_mlp(m.proj_layers, self.encoder.num_features, m.proj_hidden, m.proj_dim,
                                   last_bn=m.proj_last_bn, hidden_bn=m.proj_hidden_bn, last_bias=False)
        self.predictor = (build_mlp(m.pred_layers, m.proj_dim, m.pred_hidden, m.proj_dim, last_bn=m.pred_last_bn,
                                    last_bias=False) if m.pred_layers else nn.Identity())
        self.drloc = DenseRelativeLoc(self.encoder.num_features, m.drloc_pairs) if m.drloc_weight > 0 else None
        self.key_encoder = momentum_copy(self.encoder)
        self.key_projector = momentum_copy(self.projector)

    def _query(self, x: torch.Tensor):
        if self.drloc is not None:
            features, grid = tokens_and_features(self.encoder, x)
            aux = self.drloc(grid)
        else:
            features, aux = self.encoder(x), None
        return self.predictor(self.projector(features)), aux

    def forward(self, batch: ViewBatch) -> LossOutput:
        x1, x2 = batch.views[0], batch.views[1]
        # One call per view, as algorithm 1 writes it: each view's BN statistics are its own.
        q1, aux1 = self._query(x1)
        q2, aux2 = self._query(x2)
        with torch.no_grad():
            k1 = self.key_projector(self.key_encoder(x1))
            k2 = self.key_projector(self.key_encoder(x2))
        scale = 2.0 * self.temperature
        loss = scale * (info_nce(q1, k2, self.temperature, impl=self.loss_impl)
                        + info_nce(q2, k1, self.temperature, impl=self.loss_impl))
        logs: dict = {"info_nce": loss.detach(), "momentum": self.current_momentum}
        if aux1 is not None:
            aux = 0.5 * (aux1 + aux2)
            logs["drloc"] = aux.detach()
            loss = loss + self.drloc_weight * aux
        return LossOutput(loss, logs)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        # The reference code sets m and updates the key encoder at the start of each iteration; after step
        # s that is iteration s + 1's value.
        self.resume_at(step + 1, total_steps)
        ema_update(self.key_encoder, self.encoder, self.current_momentum)
        ema_update(self.key_projector, self.projector, self.current_momentum)

    def resume_at(self, steps_done: int, total_steps: int) -> None:
        self.current_momentum = cosine_momentum(self.base_momentum, steps_done, total_steps)


def validate(cfg) -> None:
    m = cfg.method
    if m.temperature <= 0:
        raise UserError(f"method.temperature must be > 0, got {m.temperature}")
    if m.proj_layers < 1:
        raise UserError(f"method.proj_layers must be >= 1, got {m.proj_layers}")
    if m.pred_layers < 0:
        raise UserError(f"method.pred_layers must be >= 0 (MoCo v3: 2), got {m.pred_layers}")
    validate_momentum(m.momentum)
    refuse_simclr_loss_scale(cfg)
    validate_drloc(cfg)


@METHODS.register("mocov3")
def build(cfg) -> MoCoV3:
    validate(cfg)
    return MoCoV3(cfg)
