"""Global BN's CPU conversion (fastssl/sync_bn.py): what it keeps of the module it replaces, and its
normalisation against the BN formula in float64 numpy, on one process and on 2 gloo processes. Its part in a
whole training step is in test_distributed.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

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


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from fastssl.step import leave_together

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    x, upstream = _global_batch()
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    # Its own group, as convert_global_bn sets it up for the trainer. (With the reductions on the default group, or
    # without leave_together's barrier, a rank aborted in teardown now and then: "terminate called without an
    # active exception".)
    GlobalBatchNorm.group = dist.new_group(backend="gloo")
    bn = GlobalBatchNorm(len(OFFSETS))
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
    xr = torch.from_numpy(x[rows]).requires_grad_()
    y = bn(xr)
    (y * torch.from_numpy(upstream[rows])).sum().backward()  # each rank its part of one global objective
    torch.save({"y": y.detach(), "grad": xr.grad, "running_var": bn.running_var}, f"{out_dir}/rank{rank}.pt")
    leave_together()  # both ranks done with every group before either tears them down


@pytest.mark.dist
def test_two_process_global_bn_equals_float64_bn_of_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
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

