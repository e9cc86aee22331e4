"""One optimiser step of a method on a fixed global batch, on 1 process or under torchrun (each rank takes its
contiguous chunk, as pipelines.base.shard_batches does). Writes the loss (mean over ranks) and the updated
parameters from rank 0. Used by tests/test_distributed.py; not a test module itself."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(out: str, method_name: str) -> None:
    from accelerate.utils import set_seed

    from fastssl.config import load_config
    from fastssl.optim import build_optimizer
    from fastssl.train import build_training_method, make_accelerator
    from pipelines.base import ViewBatch

    overrides = {
        "simclr": ["method.name=simclr", "method.proj_layers=2", "method.proj_hidden=32", "method.proj_dim=16",
                   "optim.name=lars"],
        "mocov3": ["method.name=mocov3", "method.temperature=0.2", "optim.name=lars"],
    }[method_name]
    cfg = load_config(None, ["model.encoder=resnet18", "model.small_input=true", "data.image_size=16",
                             "data.batch_size=8", "train.precision=fp32", *overrides])
    acc = make_accelerator(cfg)  # the trainer's, DDP options included
    set_seed(0)
    method, _ = build_training_method(cfg, acc.device)
    opt = build_optimizer(cfg.optim, method, lr=0.5)
    method, opt = acc.prepare(method, opt)

    g = torch.Generator().manual_seed(123)
    views = tuple(torch.randn(8, 3, 16, 16, generator=g) for _ in range(2))
    r, w = acc.process_index, acc.num_processes
    n = 8 // w
    local = ViewBatch(tuple(v[r * n:(r + 1) * n] for v in views), torch.zeros(n, dtype=torch.long),
                      torch.arange(r * n, (r + 1) * n))
    out_ = method(local)
    acc.backward(out_.loss)
    opt.step()
    acc.unwrap_model(method).after_step(0, 10)
    loss = acc.reduce(out_.loss.detach(), reduction="mean")
    if acc.is_main_process:
        state = {k: v.detach().clone() for k, v in acc.unwrap_model(method).state_dict().items()}
        torch.save({"loss": loss, "state": state, "world": w}, out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
