"""One optimiser step of a method on a fixed global batch, on 1 process or under torchrun (each rank takes its
contiguous chunk, as pipelines.base.shard_batches does). Writes the loss (mean over ranks) and the parameters
before and after the step from rank 0. With a third argument `manual`, DDP's gradient reduction is replaced by a plain
all-reduce of the same local gradients (the oracle for DDP's own); with `compiled`, the networks go through
the trainer's compile_networks first. Used by tests/test_distributed.py; not a test module itself."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(out: str, method_name: str, reduction: str = "ddp") -> None:
    import contextlib

    import torch.distributed as dist

    from accelerate.utils import set_seed

    from fastssl.config import load_config
    from fastssl.optim import build_optimizer
    from fastssl.step import build_training_method, compile_networks, make_accelerator, step_logs
    from pipelines.base import ViewBatch

    overrides = {
        "simclr": ["method.name=simclr", "method.proj_layers=2", "method.proj_hidden=32", "method.proj_dim=16",
                   "optim.name=lars"],
        "mocov3": ["method.name=mocov3", "method.temperature=0.2", "optim.name=lars"],
        "mocov2": ["method.name=mocov2", "method.queue_size=16", "method.shuffle_bn_splits=2", "optim.name=lars"],
    }[method_name]
    cfg = load_config(None, ["model.encoder=resnet18", "model.small_input=true", "data.image_size=16",
                             "data.batch_size=8", "train.precision=fp32", *overrides])
    acc = make_accelerator(cfg.train.precision)  # the trainer's, DDP options included
    set_seed(0)
    method, _ = build_training_method(cfg, acc.device)
    if reduction == "compiled":  # where train.py compiles: before the optimiser and accelerate's DDP wrap
        compile_networks(method)
    opt = build_optimizer(cfg.optim, method, lr=0.5)
    method, opt = acc.prepare(method, opt)

    before = {k: v.detach().clone() for k, v in acc.unwrap_model(method).state_dict().items()}
    g = torch.Generator().manual_seed(123)
    views = tuple(torch.randn(8, 3, 16, 16, generator=g) for _ in range(2))
    r, w = acc.process_index, acc.num_processes
    n = 8 // w
    local = ViewBatch(tuple(v[r * n:(r + 1) * n] for v in views), torch.zeros(n, dtype=torch.long),
                      torch.arange(r * n, (r + 1) * n))
    manual = reduction == "manual" and w > 1
    with method.no_sync() if manual else contextlib.nullcontext():
        out_ = method(local)
        acc.backward(out_.loss)
    if manual:
        for p in method.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= w
    opt.step()
    acc.unwrap_model(method).after_step(0, 10)
    loss = step_logs(acc, out_)["loss"]  # what the trainer logs
    if acc.is_main_process:
        state = {k: v.detach().clone() for k, v in acc.unwrap_model(method).state_dict().items()}
        ddp = {k: getattr(method, k) for k in ("broadcast_buffers", "gradient_as_bucket_view")} if w > 1 else {}
        from torch._dynamo.utils import counters

        torch.save({"loss": loss, "state": state, "before": before, "world": w, "ddp": ddp,
                    "graphs": counters["stats"]["unique_graphs"]}, out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
