"""One training step, shared by the loop (fastssl/train.py) and the benchmarks (fastssl/bench/trainstep.py), so
that a benchmark measures the code that trains: the Accelerator, the method as trained (global BN,
channels-last, compiled networks), autocast, backward over micro-batches and the optimiser step."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

from fastssl.config import Config
from fastssl.errors import UserError, resolve_device
from fastssl.methods import build_method
from fastssl.methods.base import LossOutput
from fastssl.sync_bn import convert_global_bn

from pipelines.base import ViewBatch


def resolve_precision(precision: str) -> str:
    valid = ("auto", "bf16", "fp16", "fp32")
    if precision not in valid:
        raise UserError(f"unknown train.precision {precision!r}; valid: {', '.join(valid)}")
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if precision in ("bf16", "fp16") and not cuda:
        return "no"  # CPU autocast to bf16 is slow and changes numerics; the CPU path trains in fp32
    return "no" if precision == "fp32" else precision


def split_batch(batch: ViewBatch, parts: int) -> list[ViewBatch]:
    if parts == 1:
        return [batch]
    views = [v.chunk(parts) for v in batch.views]
    return [ViewBatch(tuple(v[i] for v in views), batch.labels.chunk(parts)[i], batch.indices.chunk(parts)[i])
            for i in range(parts)]


# torch >= 2.12 deprecates DDP's broadcast_buffers for forward_sync_buffers, on every rank of every run. The two
# differ only in the sync at construction (ranks start from the same seed here), and accelerate's
# DistributedDataParallelKwargs has no forward_sync_buffers yet: this notice alone is silenced, once.
warnings.filterwarnings("ignore", message=r"`broadcast_buffers` is deprecated", category=FutureWarning)


def ddp_options():
    """DDP as the loop wants it. Every trainable parameter gets a gradient each step (the momentum copies are
    frozen), so no find_unused_parameters graph walk. No buffer broadcast before each forward: BN statistics
    are already global where the method wants them (global BN) and only rank 0's are saved, and MoCo v2's
    65,536-key queue is the same on every rank by construction; broadcasting them cost a collective on the
    critical path of every step. Gradients as views of DDP's buckets: no second copy of every gradient."""
    from accelerate.utils import DistributedDataParallelKwargs

    return DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True)


def make_accelerator(precision: str = "auto", device: str = "auto"):
    """The Accelerator of the loop and of the benchmarks (one per process: accelerate's state is a process-wide
    singleton): train.precision, the CPU when torch sees no GPU or `device` says so (`--device cpu` in the
    benchmarks; fp32 there, as resolve_precision gives a CPU), DDP's ddp_options.

    Never accelerate's own torch.compile: an accelerate config with a dynamo backend (`accelerate config` asks)
    would wrap the whole method, momentum updates and queue included, on top of model.compile's networks. It
    is set aside with a one-line note, and model.compile / data.compile decide. So is a mixed precision the
    config (or `accelerate launch --mixed_precision`) asks for that train.precision does not give."""
    from accelerate import Accelerator

    cpu = resolve_device(device) == "cpu"
    asked = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no")
    asked_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    accelerator = Accelerator(mixed_precision="no" if cpu else resolve_precision(precision), cpu=cpu,
                              kwargs_handlers=[ddp_options()], dynamo_backend="no")
    if accelerator.is_main_process:
        if asked.lower() != "no":
            print(f"note: the accelerate config's dynamo_backend={asked} is not used; fastssl compiles with "
                  "model.compile and data.compile (auto: on CUDA)", file=sys.stderr)
        if asked_precision.lower() != "no" and asked_precision.lower() != accelerator.mixed_precision:
            print(f"note: the accelerate config's mixed_precision={asked_precision} is not used; train.precision="
                  f"{precision} decides ({accelerator.mixed_precision} here)", file=sys.stderr)
    return accelerator


def leave_together() -> None:
    """Every process reaches this point, then the process groups are torn down (a no-op on one process). A
    process that exited with its gloo groups alive, or destroyed them, while another was still finishing
    aborted now and then: `terminate called without an active exception`, SIGABRT, a failed job after a good
    run (3 of 40 2-process CPU trainer runs stopped by train.stop_after_steps, 4 of 80 runs of a test's DDP
    worker; 0 of 40 and 0 of 80 with this)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def build_training_method(cfg: Config, device: torch.device):
    """The method as the loop trains it: global BN when distributed, channels-last on CUDA. Returns it and
    whether batches must be made channels-last too. Shared with the benchmarks (fastssl/bench/trainstep.py)."""
    method = build_method(cfg)
    if method.global_bn:
        method = convert_global_bn(method, device)
    channels_last = cfg.model.channels_last and device.type == "cuda"
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    return method, channels_last


def compile_networks(method) -> None:
    # nn.Module.compile keeps parameter names, so checkpoints load in eager mode too. Only the networks are
    # compiled: momentum updates and queue writes stay outside the graphs (no recompiles per step).
    for net in method.compiled_modules():
        net.compile(dynamic=False)
    if getattr(method, "drloc", None) is not None:
        # DRLoc reads the token grid through encoder.forward_features (drloc.tokens_and_features), which the
        # compiled __call__ above never sees: without this the query ViT of a DRLoc recipe trained eager.
        method.encoder.forward_features = torch.compile(method.encoder.forward_features, dynamic=False)


def channels_last_views(batch: ViewBatch) -> ViewBatch:
    return ViewBatch(tuple(v.contiguous(memory_format=torch.channels_last) for v in batch.views), batch.labels,
                     batch.indices)


def forward_backward(method, accelerator, batch: ViewBatch, grad_accum: int) -> LossOutput:
    """Forward under autocast and backward, over `grad_accum` micro-batches. Returns the step's loss and logs
    (means over the micro-batches, detached when there are several)."""
    if grad_accum == 1:
        with accelerator.autocast():
            out = method(batch)
        accelerator.backward(out.loss)
        return out
    outs = []
    for i, micro in enumerate(split_batch(batch, grad_accum)):
        # DDP reduces the gradients once, after the last micro-batch: the sum is the same, the traffic 1/k.
        with accelerator.no_sync(method) if i < grad_accum - 1 else contextlib.nullcontext():
            with accelerator.autocast():
                out = method(micro)
            accelerator.backward(out.loss / grad_accum)
        outs.append(out)
    mean = lambda values: sum(values) / grad_accum  # noqa: E731
    return LossOutput(mean([o.loss.detach() for o in outs]),
                      {k: mean([o.logs[k] for o in outs]) for k in outs[-1].logs})


def optimizer_step(method, optimizer, accelerator, batch: ViewBatch, grad_accum: int):
    """One training step before the method's after_step hook: forward_backward, step, zero_grad."""
    out = forward_backward(method, accelerator, batch, grad_accum)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def step_logs(accelerator, out: LossOutput) -> dict[str, float]:
    """A logged step's loss and the method's other values, each the mean over processes: a process's loss is
    over its own anchors, and their mean is the global batch's loss (what one process on the whole batch
    computes). One all-reduce of a few floats, and the logging step's host sync."""
    tensors = {"loss": out.loss, **{k: v for k, v in out.logs.items() if torch.is_tensor(v)}}
    values = torch.stack([v.detach().float().reshape(()) for v in tensors.values()])
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="mean")
    logs = dict(zip(tensors, values.tolist()))
    logs.update({k: float(v) for k, v in out.logs.items() if not torch.is_tensor(v)})
    return logs
