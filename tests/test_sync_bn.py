"""Global BN's CPU conversion (fastssl/sync_bn.py): what it keeps of the module it replaces, and its
normalisation against the BN formula in float64 numpy, on one process and on 2 gloo processes (this file is
then also the worker: `python tests/test_sync_bn.py OUT_DIR` under RANK/WORLD_SIZE/MASTER_*). Its part in a
whole training step is in test_distributed.py."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import free_port
from fastssl.momentum import momentum_copy
from fastssl.sync_bn import GlobalBatchNorm, _convert_cpu

WORLD, ROWS = 2, 256
# Channel means far from 0 against a unit spread, as activations after a ReLU or an un-normalised input can be:
# the variance as E[x^2] - mean^2 cancels catastrophically there in fp32 (at 3000: outputs off by ~1e3).
OFFSETS = np.array([0.0, 10.0, 1000.0, 3000.0])


def test_conversion_keeps_the_parameters_and_a_frozen_copy_frozen():
    # torch's convert_sync_batchnorm (the CUDA path) keeps the Parameter objects; the CPU path must too, or the
    # momentum encoder's BN would turn trainable and DDP would wait for gradients it never gets.
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    frozen = momentum_copy(online)
    before = {name: p for name, p in frozen.named_parameters()}
    buffers = {name: b for name, b in frozen.named_buffers()}
    converted = _convert_cpu(frozen)
    assert isinstance(converted[1], GlobalBatchNorm)
    assert {name: p for name, p in converted.named_parameters()} == before  # the same objects
    assert all(b is buffers[name] for name, b in converted.named_buffers())
    assert not any(p.requires_grad for p in converted.parameters())
    assert all(p.requires_grad for p in _convert_cpu(online).parameters())


def test_one_process_global_bn_is_batch_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 5, 5, generator=g, dtype=torch.float64) * 2 + 1
    bn = GlobalBatchNorm(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    y = bn(x).detach().numpy()
    xs = x.numpy()
    mean, var = xs.mean((0, 2, 3), keepdims=True), xs.var((0, 2, 3), keepdims=True)  # biased, as BN
    expect = (xs - mean) / np.sqrt(var + bn.eps) * np.array([0.5, 1.0, 2.0])[None, :, None, None] \
        + np.array([0.0, -1.0, 3.0])[None, :, None, None]
    np.testing.assert_allclose(y, expect, rtol=1e-10, atol=1e-10)


def _global_batch():
    g = np.random.default_rng(0)
    x = (OFFSETS + g.standard_normal((WORLD * ROWS, len(OFFSETS)))).astype(np.float32)
    upstream = g.standard_normal(x.shape).astype(np.float32)
    return x, upstream


def _worker(out_dir: Path) -> None:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    x, upstream = _global_batch()
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    bn = GlobalBatchNorm(len(OFFSETS))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
    xr = torch.from_numpy(x[rows]).requires_grad_()
    y = bn(xr)
    (y * torch.from_numpy(upstream[rows])).sum().backward()  # each rank its part of one global objective
    torch.save({"y": y.detach(), "grad": xr.grad, "running_var": bn.running_var}, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.dist
def test_two_process_global_bn_equals_float64_bn_of_the_whole_batch(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), WORLD_SIZE=str(WORLD))
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path)], cwd=root, env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    x, upstream = (a.astype(np.float64) for a in _global_batch())
    weight = np.array([0.5, 1.0, 2.0, -1.0])
    mean, var = x.mean(0), x.var(0)
    sigma = np.sqrt(var + 1e-5)
    x_hat = (x - mean) / sigma
    y = x_hat * weight
    gy = upstream * weight  # d objective / d x_hat
    grad = (gy - gy.mean(0) - x_hat * (gy * x_hat).mean(0)) / sigma  # BN's input gradient, closed form
    # fp32 sums of n values err like a random walk, ~sqrt(n) u |x| (4 sigma allowed), relative to the spread.
    n, u = WORLD * ROWS, 2.0 ** -24
    tol = 4 * np.sqrt(n) * u * np.abs(x).max(0) / sigma
    for r in range(WORLD):
        rows = slice(r * ROWS, (r + 1) * ROWS)
        assert (np.abs(got[r]["y"].double().numpy() - y[rows]) <= tol * np.abs(weight) + 1e-6).all()
        assert (np.abs(got[r]["grad"].double().numpy() - grad[rows])
                <= tol * np.abs(gy).max(0) / sigma + 1e-6).all()
        np.testing.assert_allclose(got[r]["running_var"].double().numpy(), 0.9 + 0.1 * var * n / (n - 1),
                                   rtol=1e-4)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
