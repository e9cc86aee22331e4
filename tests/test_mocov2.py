"""MoCo v2: InfoNCE against a float64 numpy reference (value and gradients, with and without a queue), the
queue after k training steps against a Python FIFO of the keys, the key encoder and key projector against the
EMA formula, and the config-time errors."""

from __future__ import annotations

import copy
from collections import deque

import numpy as np
import pytest
import torch

from conftest import assert_user_error, drloc_reference, perturb_, run_tool
from fastssl.config import config_from_dict
from fastssl.errors import UserError
from fastssl.losses import info_nce
from fastssl.methods import build_method
from fastssl.methods.drloc import sample_pairs
from fastssl.optim import build_optimizer

from pipelines.base import ViewBatch


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _through_normalise(x, g_unit):
    """d/dx of a loss given its gradient w.r.t. x/|x|: (I - u u^T) g / |x| per row."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    u = x / norm
    return (g_unit - u * (u * g_unit).sum(1, keepdims=True)) / norm


def numpy_info_nce(q, k, t, queue=None):
    """Float64 InfoNCE and its gradients w.r.t. q and k, derived by hand (He et al. 2020, eq. 1)."""
    qu, ku = _unit(q), _unit(k)
    n = len(q)
    if queue is None:  # MoCo v3: logits q.k_j, positive on the diagonal
        logits = qu @ ku.T / t
        target = np.arange(n)
    else:  # MoCo v2: column 0 is the positive, then the queue
        logits = np.concatenate([(qu * ku).sum(1, keepdims=True), qu @ _unit(queue).T], 1) / t
        target = np.zeros(n, int)
    mx = logits.max(1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(1))
    loss = float(np.mean(lse - logits[np.arange(n), target]))
    dlogits = np.exp(logits - lse[:, None])
    dlogits[np.arange(n), target] -= 1
    dlogits /= n * t
    if queue is None:
        g_qu, g_ku = dlogits @ ku, dlogits.T @ qu
    else:
        g_qu = dlogits[:, :1] * ku + dlogits[:, 1:] @ _unit(queue)
        g_ku = dlogits[:, :1] * qu
    return loss, _through_normalise(q, g_qu), _through_normalise(k, g_ku)


@pytest.mark.parametrize("with_queue", [False, True])
def test_info_nce_matches_float64_numpy_value_and_grads(with_queue):
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)) * 3
    queue = rng.normal(size=(10, 5)) if with_queue else None
    loss, gq, gk = numpy_info_nce(q, k, 0.2, queue)
    tq = torch.tensor(q, dtype=torch.float32, requires_grad=True)
    tk = torch.tensor(k, dtype=torch.float32, requires_grad=True)
    tqueue = torch.tensor(queue, dtype=torch.float32) if with_queue else None
    out = info_nce(tq, tk, 0.2, queue=tqueue, impl="naive")
    out.backward()
    # fp32 against fp64: logits of size ~1/T = 5 carry ~1e-6 relative error.
    np.testing.assert_allclose(out.item(), loss, rtol=1e-5)
    np.testing.assert_allclose(tq.grad.numpy(), gq, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tk.grad.numpy(), gk, rtol=1e-4, atol=1e-6)
    if with_queue:
        assert torch.equal(tqueue, torch.tensor(queue, dtype=torch.float32))  # not modified


def _cfg(**method):
    m = dict(name="mocov2", temperature=0.2, queue_size=16, proj_layers=2, proj_hidden=32, proj_dim=8,
             momentum=0.9, shuffle_bn_splits=2)
    m.update(method)
    return config_from_dict(dict(data=dict(batch_size=4, image_size=16),
                                 model=dict(encoder="resnet18", small_input=True),
                                 method=m, optim=dict(name="lars", weight_decay=1e-4)))


def _batch(g, n=4, size=16):
    return ViewBatch(tuple(torch.randn(n, 3, size, size, generator=g) for _ in range(2)),
                     torch.zeros(n, dtype=torch.long), torch.arange(n))


def test_training_steps_fill_the_queue_fifo_and_move_the_key_encoder_by_ema():
    torch.manual_seed(0)
    cfg = _cfg()
    method = build_method(cfg)
    opt = build_optimizer(cfg.optim, method, lr=0.5)
    assert not any(p.requires_grad for p in method.key_encoder.parameters())
    assert all(id(p) not in {id(q) for g in opt.param_groups for q in g["params"]}
               for p in method.key_encoder.parameters())
    fifo = deque((tuple(r) for r in method.queue.queue.tolist()), maxlen=16)
    g = torch.Generator().manual_seed(1)
    m = cfg.method.momentum
    pairs = [(method.key_encoder, method.encoder), (method.key_projector, method.projector)]
    for step in range(6):  # 24 keys through a queue of 16: wraps around
        queue_before = method.queue.queue.clone()
        out = method(_batch(g))
        torch.testing.assert_close(method.queue.queue, queue_before, rtol=0, atol=0)  # forward is pure
        keys = method._pending_keys.clone()
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        key_before = [[p.detach().double().clone() for p in key.parameters()] for key, _ in pairs]
        method.after_step(step, 6)
        # He et al. 2020 eq. (2) in float64, for every parameter of the key encoder and the key projector.
        for (key, online), before in zip(pairs, key_before):
            for kb, p, o in zip(before, key.parameters(), online.parameters(), strict=True):
                torch.testing.assert_close(p.double(), m * kb + (1 - m) * o.detach().double(), rtol=1e-6,
                                           atol=1e-7)
            # Not vacuous: the optimiser moved this branch's query side, so skipping its EMA would not pass.
            assert any(not torch.equal(kb, o.detach().double()) for kb, o in zip(before, online.parameters()))
        fifo.extend(tuple(r) for r in torch.nn.functional.normalize(keys, dim=1).tolist())
        torch.testing.assert_close(method.queue.ordered(), torch.tensor(list(fifo)), rtol=1e-6, atol=1e-6)
    assert not torch.equal(method.key_encoder.conv1.weight, method.encoder.conv1.weight)


def test_a_step_of_accumulated_micro_batches_enqueues_every_micro_batchs_keys():
    # train.grad_accum=2 (allowed explicitly): the step's two forwards are one global batch, whose 8 keys
    # must all join the queue (MoCo enqueues the whole batch), in micro-batch order; an eval-mode forward
    # enqueues nothing.
    torch.manual_seed(0)
    method = build_method(_cfg())
    g = torch.Generator().manual_seed(5)
    keys = []
    for _ in range(2):
        method(_batch(g))
        keys.append(method._pending_keys[-4:].clone())
    method.eval()
    method(_batch(g))
    method.train()
    before = method.queue.ordered().clone()
    method.after_step(0, 1)
    assert int(method.queue.ptr) == 8
    expect = torch.cat([before[8:], torch.nn.functional.normalize(torch.cat(keys), dim=1)])
    torch.testing.assert_close(method.queue.ordered(), expect, rtol=1e-6, atol=1e-6)


def test_head_without_bn_is_the_reference_mlp():
    # moco builder.py (mlp=True): Sequential(Linear(d, d), ReLU, fc) -- biases, no BN (the ImageNet recipe).
    head = build_method(_cfg(proj_hidden_bn=False, proj_last_bn=False)).projector
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Linear"]
    assert all(m.bias is not None for m in head if isinstance(m, torch.nn.Linear))


def _reference_keys(method, x_k, perm, splits):
    """He et al. 2020 sec. 3.3 written out: the key network on the shuffled batch, one BN group per split
    (one GPU each), then un-shuffled so that key i belongs to image i. A copy, so BN buffers stay as they were."""
    net = copy.deepcopy(torch.nn.Sequential(method.key_encoder, method.key_projector)).train()
    with torch.no_grad():
        shuffled = torch.cat([net(chunk) for chunk in x_k[perm].chunk(splits)])
    keys = torch.empty_like(shuffled)
    keys[perm] = shuffled
    return keys.numpy()


def test_loss_uses_the_queue_as_negatives_and_the_key_of_the_same_image_as_positive():
    torch.manual_seed(0)
    method = build_method(_cfg()).double()
    method.train()
    perturb_(method.key_encoder, method.key_projector, seed=99)  # no longer copies of the query branch
    batch = _batch(torch.Generator().manual_seed(3))
    x_q, x_k = (v.double() for v in batch.views)
    torch.manual_seed(11)
    out = method(ViewBatch((x_q, x_k), batch.labels, batch.indices))
    torch.manual_seed(11)
    perm = torch.randperm(4)  # the forward's one draw from the global RNG: Shuffle BN's permutation
    with torch.no_grad():
        q = method.projector(method.encoder(x_q)).numpy()  # training-mode BN: the same batch statistics
    k = _reference_keys(method, x_k, perm, splits=2)
    queue = method.queue.queue.numpy()
    loss, _, _ = numpy_info_nce(q, k, 0.2, queue)
    np.testing.assert_allclose(out.loss.item(), loss, rtol=1e-5)  # the loss runs in fp32
    # The oracle tells the alternatives apart: keys of the query network, keys without Shuffle BN, or each
    # query paired with another image's key would each give another loss.
    with torch.no_grad():
        online = method.projector(method.encoder(x_k)).numpy()
        unshuffled = method.key_projector(method.key_encoder(x_k)).numpy()
    for wrong in (online, unshuffled, np.roll(k, 1, axis=0)):
        assert abs(numpy_info_nce(q, wrong, 0.2, queue)[0] - loss) > 1e-4 * loss


def test_drloc_on_a_vit_adds_its_weighted_loss_and_trains_its_mlp():
    # Oracle: InfoNCE against the queue (checked above) plus lambda * L_drloc computed by hand on the pairs the
    # method draws for the query view (its first draw from the global RNG; the shuffle comes after).
    torch.manual_seed(0)
    cfg = config_from_dict(dict(data=dict(batch_size=4, image_size=16),
                                model=dict(encoder="vit_pico", patch_size=4),
                                method=dict(name="mocov2", queue_size=8, proj_layers=2, proj_hidden=16,
                                            proj_dim=8, drloc_weight=0.5, drloc_pairs=8, shuffle_bn_splits=2)))
    method = build_method(cfg)
    batch = _batch(torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    out = method(batch)
    torch.manual_seed(5)
    u, v = sample_pairs(4, 4, 4, 8, "cpu")
    with torch.no_grad():
        grid = method.encoder.forward_features(batch.views[0])[:, 1:].reshape(4, 4, 4, -1)  # [CLS] first
        aux = drloc_reference(method.drloc.mlp, grid, u, v)
    np.testing.assert_allclose(out.logs["drloc"].item(), aux, rtol=1e-5)
    np.testing.assert_allclose(out.loss.item(), out.logs["info_nce"].item() + 0.5 * aux, rtol=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for p in method.drloc.parameters())


@pytest.mark.parametrize("method, model, fragment", [
    (dict(pred_layers=2), {}, "method.pred_layers=2: MoCo v2 has no predictor"),
    (dict(queue_size=10), {}, "method.queue_size=10 must be a positive multiple of the global batch"),
    (dict(shuffle_bn_splits=3), {}, "method.shuffle_bn_splits=3 must divide"),
    (dict(momentum=1.5), {}, "method.momentum must be in [0, 1]"),
    (dict(drloc_weight=0.1), {}, "needs a ViT's token grid"),
    ({}, dict(frozen_patch_embed=True), "model.frozen_patch_embed=True is a ViT option"),
    ({}, dict(encoder="resnet5"), "unknown encoder 'resnet5'; registered: resnet18"),
])
def test_bad_config_is_one_clear_error_at_build_time(method, model, fragment):
    d = dict(data=dict(batch_size=4, image_size=16), model=dict(dict(encoder="resnet18"), **model),
             method=dict(dict(name="mocov2", queue_size=16, shuffle_bn_splits=2), **method))
    with pytest.raises(UserError) as e:
        build_method(config_from_dict(d))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_train_tool_reports_a_predictor_on_mocov2_before_reading_data(tmp_path):
    proc = run_tool("tools/train.py", "--help")
    assert proc.returncode == 0
    proc = run_tool("tools/train.py", "recipes/mocov2_resnet18_synthetic.yaml", f"output_dir={tmp_path / 'run'}",
                    f"data.path={tmp_path / 'does-not-exist'}", "method.pred_layers=2", "eval.knn_val_path=")
    assert_user_error(proc, "method.pred_layers=2", "MoCo v2 has no predictor")


def test_resnet_residual_init_follows_the_method_reference():
    # SimCLR / MoCo v3 zero-init each block's last BN (zero_init_residual); MoCo v1/v2's torchvision
    # resnet50 keeps gamma 1 there -- the recipes say which. With gamma 0, a fresh block is the identity.
    from conftest import ROOT
    from fastssl.config import ModelConfig, load_config
    from fastssl.encoders import create_encoder

    zero = create_encoder(ModelConfig(encoder="resnet18", small_input=True), 16)
    ones = create_encoder(ModelConfig(encoder="resnet18", small_input=True, zero_init_residual=False), 16)
    assert torch.all(zero.layer1[0].bn2.weight == 0) and torch.all(ones.layer1[0].bn2.weight == 1)
    for name in ("mocov1_resnet50_in1k", "mocov2_resnet50_in1k", "mocov1_resnet18_synthetic",
                 "mocov2_resnet18_synthetic"):
        assert load_config(ROOT / "recipes" / f"{name}.yaml", []).model.zero_init_residual is False, name
