"""MoCo v2 (Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum Contrastive Learning") on
MoCo v1 (He et al. 2020): a query encoder trained by InfoNCE against one positive key and a queue of
negative keys, the key encoder an EMA of the query encoder, Shuffle BN in the key encoder.

With `method.proj_layers: 1` and T 0.07 the same method is MoCo v1 (linear projection).
"""

from __future__ import annotations

import torch

from fastssl.encoders import create_encoder
from fastssl.errors import UserError
from fastssl.heads import build_mlp
from fastssl.losses import info_nce
from fastssl.methods.base import METHODS, LossOutput, Method, refuse_simclr_loss_scale
from fastssl.methods.drloc import DenseRelativeLoc, tokens_and_features, validate_drloc
from fastssl.methods.shuffle_bn import gather, shuffled_forward
from fastssl.momentum import ema_update, momentum_copy, validate_momentum
from fastssl.queue import FeatureQueue

from pipelines.base import ViewBatch


class MoCoV2(Method):
    # Per-process BN, as in MoCo: Shuffle BN (not global BN) is its fix for the statistics leak.
    global_bn = False

    def __init__(self, cfg):
        super().__init__()
        m = cfg.method
        self.temperature = m.temperature
        self.loss_impl = m.loss_impl
        self.momentum = m.momentum
        self.shuffle_bn_splits = m.shuffle_bn_splits
        self.drloc_weight = m.drloc_weight
        self.encoder = create_encoder(cfg.model, cfg.data.image_size)
        # MoCo v2 sec. 2: a 2-layer MLP head (hidden 2048, ReLU) replaces v1's linear fc; 128-d output. The
        # reference's head is Linear(+bias)-ReLU-Linear(+bias), no BN: method.proj_hidden_bn=false,
        # proj_last_bn=false (the ImageNet recipe).
        self.projector = build_mlp(m.proj_layers, self.encoder.num_features, m.proj_hidden, m.proj_dim,
                                   last_bn=m.proj_last_bn, hidden_bn=m.proj_hidden_bn)
        self.key_encoder = momentum_copy(self.encoder)
        self.key_projector = momentum_copy(self.projector)
        self.queue = FeatureQueue(m.queue_size, m.proj_dim)
        self.drloc = DenseRelativeLoc(self.encoder.num_features, m.drloc_pairs) if m.drloc_weight > 0 else None
        self._pending_keys: torch.Tensor | None = None  # this step's keys (every micro-batch), for after_step

    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_projector(self.key_encoder(x))

    def forward(self, batch: ViewBatch) -> LossOutput:
        x_q, x_k = batch.views[0], batch.views[1]
        logs: dict = {}
        if self.drloc is not None:
            features, grid = tokens_and_features(self.encoder, x_q)
            aux = self.drloc(grid)
        else:
            features, aux = self.encoder(x_q), None
        q = self.projector(features)
        with torch.no_grad():
            k = shuffled_forward(self._key, x_k, self.shuffle_bn_splits)
        # Algorithm 1: the negatives are the queue as it was before this batch's keys join it.
        loss = info_nce(q, k, self.temperature, queue=self.queue.queue, impl=self.loss_impl)
        logs["info_nce"] = loss.detach()
        if aux is not None:
            logs["drloc"] = aux.detach()
            loss = loss + self.drloc_weight * aux
        # A side effect deferred to after_step, which the loop calls right after the optimiser step. With
        # gradient accumulation a step runs several micro-batches: all their keys join the queue. An
        # eval-mode forward enqueues nothing.
        if self.training:
            k = k.detach()
            self._pending_keys = k if self._pending_keys is None else torch.cat([self._pending_keys, k])
        return LossOutput(loss, logs)

    def discard_step(self) -> None:
        self._pending_keys = None

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        # He et al. 2020 eq. (2): theta_k <- m theta_k + (1 - m) theta_q, with the q just updated; the
        # reference code does this at the start of the next step, which is the same point in time.
        ema_update(self.key_encoder, self.encoder, self.momentum)
        ema_update(self.key_projector, self.projector, self.momentum)
        if self._pending_keys is not None:
            self.queue.push(gather(self._pending_keys))  # the global batch's keys, in rank order
            self._pending_keys = None


def validate(cfg) -> None:
    m, batch = cfg.method, cfg.data.batch_size
    if m.temperature <= 0:
        raise UserError(f"method.temperature must be > 0, got {m.temperature}")
    if m.proj_layers < 1:
        raise UserError(f"method.proj_layers must be >= 1 (1: MoCo v1's linear head), got {m.proj_layers}")
    if m.pred_layers != 0:
        raise UserError(f"method.pred_layers={m.pred_layers}: MoCo v2 has no predictor (MoCo v3 does); set "
                        f"method.pred_layers=0 or method.name=mocov3")
    validate_momentum(m.momentum)
    refuse_simclr_loss_scale(cfg)
    if m.queue_size < 1 or m.queue_size % batch:
        raise UserError(f"method.queue_size={m.queue_size} must be a positive multiple of the global batch "
                        f"data.batch_size={batch} (each step replaces one batch of keys)")
    if m.shuffle_bn_splits < 1 or batch % m.shuffle_bn_splits:
        raise UserError(f"method.shuffle_bn_splits={m.shuffle_bn_splits} must divide the global batch "
                        f"data.batch_size={batch}")
    validate_drloc(cfg)


@METHODS.register("mocov2")
def build(cfg) -> MoCoV2:
    validate(cfg)
    return MoCoV2(cfg)
