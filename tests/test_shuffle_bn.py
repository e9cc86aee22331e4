"""Shuffle BN: un-shuffling restores the order, and on one process the key BN statistics come from
sub-batches of the shuffled batch (oracle: float64 numpy batch norm over those sub-batches)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fastssl.losses.dist import rank_and_world
from fastssl.methods.shuffle_bn import gather, shuffle_order, shuffled_forward, unshuffle


def test_single_process_helpers_are_identities():
    assert rank_and_world() == (0, 1)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assert gather(x) is x


def test_unshuffle_inverts_the_permutation():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(40.0).reshape(20, 2)
    perm = shuffle_order(20, x.device, g)
    assert sorted(perm.tolist()) == list(range(20)) and perm.tolist() != list(range(20))
    torch.testing.assert_close(unshuffle(x[perm], perm), x, rtol=0, atol=0)


def test_per_sample_network_gives_outputs_in_the_original_order():
    torch.manual_seed(0)  # the Linear's initialisation
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    out = shuffled_forward(net, x, splits=4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, net(x))


@pytest.mark.parametrize("splits", [1, 4])
def test_key_bn_statistics_come_from_sub_batches_of_the_shuffled_batch(splits):
    n, c = 24, 3
    # Seeded: the splits > 1 check below needs sub-batch statistics that differ from the full batch's by a
    # margin, which a lucky draw could in principle erase.
    scale, shift = torch.tensor([1.0, 3.0, 0.5]), torch.tensor([0.0, 2.0, -1.0])
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(0)) * scale + shift
    bn = nn.BatchNorm1d(c, affine=False)  # training mode: batch statistics
    out = shuffled_forward(bn, x, splits, generator=torch.Generator().manual_seed(7))

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7)).numpy()
    xs = x.double().numpy()[perm]
    expect_shuffled = np.concatenate([(b - b.mean(0)) / np.sqrt(b.var(0) + bn.eps)  # biased var, as BN
                                      for b in np.split(xs, splits)])
    expect = np.empty_like(expect_shuffled)
    expect[perm] = expect_shuffled
    np.testing.assert_allclose(out.double().numpy(), expect, rtol=1e-5, atol=1e-5)
    if splits > 1:  # not merely full-batch BN
        full = (x.double().numpy() - xs.mean(0)) / np.sqrt(xs.var(0) + bn.eps)
        assert np.abs(out.double().numpy() - full).max() > 1e-2


def test_no_gradient_reaches_the_key_network():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    out = shuffled_forward(net, torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), 2,
                           generator=torch.Generator().manual_seed(1))
    assert not out.requires_grad


def _two_process_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from fastssl.step import leave_together

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)) * 2 + 1
    bn = nn.BatchNorm1d(3, affine=False)
    out = shuffled_forward(bn, x[rank * 8:(rank + 1) * 8], splits=4, generator=torch.Generator().manual_seed(7))
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    leave_together()


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_shuffle_across_ranks_like_one_process_emulates(tmp_path):
    # Oracle: on one process with 4 splits, the 4 BN groups are consecutive quarters of x[perm]; across 2
    # processes with the same permutation each rank takes one half of x[perm] and splits it in 2 groups, so
    # every sample must come back normalised by the same group statistics, on its own rank, in its own row.
    import torch.multiprocessing as mp

    mp.spawn(_two_process_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)) * 2 + 1
    expect = shuffled_forward(nn.BatchNorm1d(3, affine=False), x, 4, generator=torch.Generator().manual_seed(7))
    got = torch.cat([torch.load(tmp_path / f"rank{r}.pt") for r in range(2)])
    torch.testing.assert_close(got, expect)
