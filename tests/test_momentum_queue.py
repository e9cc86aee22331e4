"""EMA against its formula in float64, the cosine momentum schedule against its closed form, and the queue
against a plain-Python FIFO."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
from torch import nn

from fastssl.momentum import cosine_momentum, ema_update, momentum_copy
from fastssl.queue import FeatureQueue


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).double()


def test_momentum_copy_starts_equal_and_frozen():
    torch.manual_seed(0)
    online = _net()
    target = momentum_copy(online)
    for (name, p), q in zip(online.named_parameters(), target.parameters()):
        assert not q.requires_grad, name
        assert q.data_ptr() != p.data_ptr(), name
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    assert all(p.requires_grad for p in online.parameters())


def test_momentum_copy_drops_nothing_in_train_mode():
    # The key encoder makes targets: in train mode (the loop's) it must compute what the online network
    # computes in eval mode, with no block or unit dropped at random; the online network keeps its rates.
    from timm.layers import DropPath

    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(6, 32), DropPath(0.5), nn.Dropout(0.5), nn.Linear(32, 4)).double()
    target = momentum_copy(online).train()
    x = torch.randn(64, 6, dtype=torch.float64)
    expected = online.eval()(x)
    torch.testing.assert_close(target(x), expected, rtol=0, atol=0)
    online.train()
    assert not torch.equal(online(x), expected)


def test_ema_equals_the_formula_in_float64_over_several_steps():
    torch.manual_seed(0)
    online, m = _net(), 0.9
    target = momentum_copy(online)
    # Oracle: numpy float64, theta_k <- m theta_k + (1 - m) theta_q (He et al. 2020, eq. 2).
    expect = [p.detach().numpy().copy() for p in target.parameters()]
    for step in range(4):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(torch.randn_like(p))  # stands in for an optimiser step
        ema_update(target, online, m)
        expect = [m * e + (1 - m) * p.detach().numpy() for e, p in zip(expect, online.parameters())]
        for e, q in zip(expect, target.parameters()):
            np.testing.assert_allclose(q.detach().numpy(), e, rtol=1e-12, atol=1e-12)


def test_ema_leaves_buffers_to_the_key_encoders_own_forward():
    torch.manual_seed(0)
    online = _net()
    target = momentum_copy(online)
    online(torch.randn(16, 5, dtype=torch.float64))  # moves the online BN running mean
    ema_update(target, online, 0.5)
    assert not torch.equal(online[1].running_mean, target[1].running_mean)
    assert torch.equal(target[1].running_mean, torch.zeros(7, dtype=torch.float64))


def test_ema_follows_modules_moved_after_construction():
    # .to() and accelerate's prepare may replace tensors; the update must reach the live ones.
    torch.manual_seed(0)
    online = _net()
    target = momentum_copy(online)
    online, target = online.float(), target.float()
    with torch.no_grad():
        online[0].weight.fill_(1.0)
    ema_update(target, online, 0.0)
    torch.testing.assert_close(target[0].weight, torch.ones_like(target[0].weight))


def test_cosine_momentum_closed_form():
    base, total = 0.99, 100
    assert cosine_momentum(base, 0, total) == base
    assert math.isclose(cosine_momentum(base, total, total), 1.0)
    assert math.isclose(cosine_momentum(base, total // 2, total), 1 - 0.5 * (1 - base))  # cos(pi/2) = 0
    # MoCo v3 / BYOL: m = 1 - (1 - m0) * (cos(pi k / K) + 1) / 2; off the midpoint a linear ramp differs
    for step in (total // 4, 3 * total // 4, 7):
        expected = 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2
        assert math.isclose(cosine_momentum(base, step, total), expected, rel_tol=1e-12)
    values = [cosine_momentum(base, s, total) for s in range(total + 1)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_queue_equals_a_python_fifo_after_k_pushes():
    torch.manual_seed(0)
    k, d = 12, 4
    q = FeatureQueue(k, d)
    fifo = deque((tuple(r) for r in q.queue.tolist()), maxlen=k)  # oldest first
    g = torch.Generator().manual_seed(1)
    for n in (5, 3, 4, 7, 12, 1, 6):  # sizes that wrap around the ring at different offsets
        keys = torch.randn(n, d, generator=g)
        q.push(keys)
        unit = keys / keys.norm(dim=1, keepdim=True)
        fifo.extend(tuple(r) for r in unit.tolist())
        torch.testing.assert_close(q.ordered(), torch.tensor(list(fifo)), rtol=1e-6, atol=1e-6)
        assert q.ptr.dtype == torch.long and q.ptr.dim() == 0


def test_queue_is_checkpointed_with_its_pointer():
    q = FeatureQueue(8, 3)
    q.push(torch.randn(3, 3))
    state = q.state_dict()
    assert set(state) == {"queue", "ptr"} and int(state["ptr"]) == 3
    r = FeatureQueue(8, 3)
    r.load_state_dict(state)
    x = torch.randn(2, 3)
    q.push(x)
    r.push(x)
    torch.testing.assert_close(r.queue, q.queue)


def test_queue_push_traces_without_a_host_sync():
    # No .item(): torch.compile with fullgraph=True would raise on a graph break.
    q = FeatureQueue(8, 3)
    push = torch.compile(q.push, fullgraph=True, backend="eager")
    push(torch.randn(5, 3))
    push(torch.randn(5, 3))
    assert int(q.ptr) == 2
