"""What the training loop knows about a method: forward -> LossOutput, then after_step."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
from torch import nn

from fastssl.errors import UserError
from fastssl.registry import Registry

from pipelines.base import ViewBatch


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, the one the optimiser minimises
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)  # extra scalars for metrics.jsonl


class Method(nn.Module):
    """A self-supervised method.

    `forward` is pure: it computes the loss of one batch. Side effects that must follow the optimiser
    step (momentum encoder update, queue write, momentum schedule) happen in `after_step`, which the loop
    calls with the step just finished.
    """

    encoder: nn.Module  # the backbone whose features are evaluated (kNN, linear probe)
    # Normalise with global-batch BN statistics when distributed (SimCLR's global BN, MoCo v3's SyncBN).
    # MoCo v2 sets False: its shuffle BN is the fix for the same leak.
    global_bn: bool = True

    def forward(self, batch: ViewBatch) -> LossOutput:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        pass

    def discard_step(self) -> None:
        """Forget what forward passes left for after_step when no optimiser step follows them (a FLOPs probe):
        the next after_step then sees only its own step's forwards."""

    def resume_at(self, steps_done: int, total_steps: int) -> None:
        """Schedule-driven state that is not in the checkpoint, as after_step(steps_done - 1) would leave it:
        a resumed run continues from there."""

    def compiled_modules(self) -> list[nn.Module]:
        """The networks torch.compile wraps (model.compile): every child with parameters, the momentum copies
        included (their keys are about a quarter of MoCo's FLOPs). The EMA writes their parameters in place
        between calls; compiled graphs take parameters as inputs, so that recompiles nothing
        (tests/test_compile.py counts the graphs per step)."""
        return [m for m in self.children() if any(True for _ in m.parameters())]


# name -> builder(cfg: Config) -> Method
METHODS: Registry = Registry("method")

_MODULES = ("simclr", "mocov2", "mocov3")


def build_method(cfg) -> Method:
    from fastssl.encoders.vit import check_model_config
    from fastssl.errors import UserError
    from fastssl.losses import IMPLS

    if cfg.method.loss_impl not in IMPLS:  # checked here so a typo fails before any data is read
        raise UserError(f"unknown method.loss_impl {cfg.method.loss_impl!r}; valid: {', '.join(IMPLS)}")
    check_model_config(cfg.model)  # the encoder name, and ViT options given to a ResNet, for every method
    for name in _MODULES:  # importing registers the method; a missing module is simply not offered
        try:
            importlib.import_module(f"fastssl.methods.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"fastssl.methods.{name}":
                raise
    return METHODS.get(cfg.method.name)(cfg)


def refuse_simclr_loss_scale(cfg) -> None:
    """MoCo's loss scale is its paper's (v3: 2T, in the method); method.loss_scale is SimCLR's knob."""
    if cfg.method.loss_scale != 1.0:
        raise UserError(f"method.loss_scale={cfg.method.loss_scale} applies to SimCLR only; {cfg.method.name} "
                        f"scales its loss as its paper does: remove method.loss_scale")
