"""fastssl/step.py's training step, for the benchmarks: same method, autocast, backward and optimiser.

`bench model` feeds it a synthetic batch and `bench step` the real loader, so the two differ only in where
the views come from, which is what the input-bound ratio compares.
"""

from __future__ import annotations

import torch

from fastssl.bench import flops
from fastssl.bench.sweep import fresh_compile_caches
from fastssl.config import Config
from fastssl.errors import resolve_compile
from fastssl.optim import build_optimizer
from fastssl.schedule import scaled_lr
from fastssl.step import build_training_method, channels_last_views, compile_networks, forward_backward, optimizer_step

from pipelines.base import ViewBatch


class TrainingStep:
    """fastssl/step.py's step: forward under autocast, backward, optimiser step, zero_grad, after_step.

    The learning rate stays at the scaled peak (the schedule changes no arithmetic), and `after_step`
    is told a long run so MoCo v3's momentum schedule stays in its normal range.
    """

    def __init__(self, cfg: Config, accelerator, total_steps: int = 10_000):
        self.cfg, self.accelerator, self.total_steps = cfg, accelerator, total_steps
        device = accelerator.device
        torch.manual_seed(cfg.seed)
        method, self.channels_last = build_training_method(cfg, device)
        self.method = method.to(device)
        self.compiled = resolve_compile(cfg.model.compile, device)
        if self.compiled or resolve_compile(cfg.data.compile, device, "data.compile"):
            fresh_compile_caches()  # before the warm-up, which compiles this row's networks (and views)
        self.precision = accelerator.mixed_precision
        self._counted: int | None = None  # FLOPs of the batch count_flops was first given
        self._compile_pending = self.compiled
        peak_lr = scaled_lr(cfg.optim.lr, cfg.data.batch_size, cfg.optim.lr_scaling)
        self.optimizer = build_optimizer(cfg.optim, self.method, peak_lr)
        self.method, self.optimizer = accelerator.prepare(self.method, self.optimizer)
        self.unwrapped = accelerator.unwrap_model(self.method)
        self.method.train()
        self.step_index = 0

    def count_flops(self, batch: ViewBatch) -> int:
        """FLOPs of one forward+backward on `batch`, counted eagerly before any compilation (once: later calls
        return the first count, whatever batch they pass)."""
        if self._counted is None:
            if self.step_index and self.compiled:
                raise RuntimeError("count_flops must run before the first compiled step")  # a bug
            batch = self._layout(batch)

            def fwd_bwd():
                forward_backward(self.method, self.accelerator, batch, self.cfg.train.grad_accum)

            self._counted = flops.count_flops(fwd_bwd)
            self.optimizer.zero_grad(set_to_none=True)
            self.unwrapped.discard_step()  # the probe's keys must not join MoCo v2's queue at the next step
        return self._counted

    def _layout(self, batch: ViewBatch) -> ViewBatch:
        return channels_last_views(batch) if self.channels_last else batch

    def __call__(self, batch: ViewBatch) -> torch.Tensor:
        if self._compile_pending:
            compile_networks(self.unwrapped)  # after count_flops, which needs the eager graph
            self._compile_pending = False
        out = optimizer_step(self.method, self.optimizer, self.accelerator, self._layout(batch),
                             self.cfg.train.grad_accum)
        self.unwrapped.after_step(self.step_index, self.total_steps)
        self.step_index += 1
        return out.loss.detach()

    def close(self) -> None:
        self.accelerator.free_memory()  # drops accelerate's references so an OOM back-off can free memory
