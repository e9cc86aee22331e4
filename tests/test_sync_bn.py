"""Global BN's CPU conversion (fastssl/sync_bn.py) on one process: what it keeps of the module it replaces,
and its normalisation against the BN formula in float64 numpy. Its 2-process maths is in test_distributed.py."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fastssl.momentum import momentum_copy
from fastssl.sync_bn import GlobalBatchNorm, _convert_cpu


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
