"""Dense relative localisation (Liu et al. 2021): targets against a plain-Python oracle, the loss against a
by-hand computation on the same sampled pairs, shapes, and that the task is learnable."""

from __future__ import annotations

import numpy as np
import torch

from conftest import chi2_critical, drloc_reference
from fastssl.config import ModelConfig
from fastssl.encoders import create_encoder
from fastssl.methods.drloc import DenseRelativeLoc, relative_offsets, sample_pairs, tokens_and_features


def test_offsets_match_the_papers_normalised_distances():
    rows, cols = 3, 5
    u = torch.tensor([[0, 14, 7, 4]])
    v = torch.tensor([[14, 0, 7, 10]])
    got = relative_offsets(u, v, rows, cols)[0].tolist()
    expect = []
    for a, b in zip(u[0].tolist(), v[0].tolist()):  # cell index = row * cols + col
        expect.append([abs(a // cols - b // cols) / rows, abs(a % cols - b % cols) / cols])
    np.testing.assert_allclose(got, expect)


def test_pairs_are_uniform_independent_cells_and_offsets_follow_their_closed_form():
    # The by-hand loss below takes its pairs from sample_pairs, so the sampler needs its own oracle. On a 5 x 7
    # grid, 50,000 pairs: u and v each uniform over the 35 cells and jointly uniform over the 1,225 (u, v)
    # (chi-square); the row offset |du| = d has P = 1/R at d = 0 and 2(R - d)/R^2 otherwise (two independent
    # uniform rows), the column offset likewise.
    rows, cols, b, m = 5, 7, 200, 250
    u, v = sample_pairs(b, rows, cols, m, "cpu", torch.Generator().manual_seed(0))
    u, v = u.reshape(-1).numpy(), v.reshape(-1).numpy()
    n = len(u)

    def chi2(counts, p):
        return (((counts - n * p) ** 2) / (n * p)).sum()

    cells = rows * cols
    for side in (u, v):
        assert chi2(np.bincount(side, minlength=cells), np.full(cells, 1 / cells)) < chi2_critical(cells - 1)
    joint = np.bincount(u * cells + v, minlength=cells * cells)
    assert chi2(joint, np.full(cells * cells, 1 / cells**2)) < chi2_critical(cells * cells - 1)
    targets = relative_offsets(torch.from_numpy(u)[None], torch.from_numpy(v)[None], rows, cols)[0].numpy()
    for axis, size in ((0, rows), (1, cols)):
        d = np.rint(targets[:, axis] * size).astype(int)
        p = np.array([1 / size] + [2 * (size - k) / size**2 for k in range(1, size)])
        assert chi2(np.bincount(d, minlength=size), p) < chi2_critical(size - 1)


def test_loss_equals_l1_of_mlp_on_the_sampled_pairs():
    torch.manual_seed(0)
    b, rows, cols, d, m = 3, 4, 4, 6, 10
    grid = torch.randn(b, rows, cols, d)
    head = DenseRelativeLoc(d, pairs=m)  # its MLP has no BN: each pair's prediction is independent of the rest
    loss = head(grid, generator=torch.Generator().manual_seed(5))
    u, v = sample_pairs(b, rows, cols, m, "cpu", torch.Generator().manual_seed(5))
    assert u.shape == v.shape == (b, m)
    np.testing.assert_allclose(loss.item(), drloc_reference(head.mlp, grid, u, v), rtol=1e-5)


def test_token_grid_of_a_vit_and_its_pooled_features():
    torch.manual_seed(0)
    enc = create_encoder(ModelConfig(encoder="vit_pico", patch_size=4), 16)
    enc.eval()
    x = torch.randn(2, 3, 16, 16)
    feats, grid = tokens_and_features(enc, x)
    assert grid.shape == (2, 4, 4, enc.num_features)
    torch.testing.assert_close(feats, enc(x))
    tokens = enc.forward_features(x)
    torch.testing.assert_close(enc(x), tokens[:, 0], rtol=0, atol=0)  # the features are the [CLS] token's
    torch.testing.assert_close(grid[1, 2, 3], tokens[1, 1 + 2 * 4 + 3])  # row-major after [CLS]


def test_the_task_is_learnable_from_tokens_that_carry_position():
    # Tokens = a random code per cell: the MLP can learn the offsets, so the loss must fall well below
    # that of the best constant prediction (the per-axis median offset).
    torch.manual_seed(0)
    rows = cols = 4
    codes = torch.randn(rows, cols, 16)
    grid = codes.expand(8, -1, -1, -1)
    head = DenseRelativeLoc(16, pairs=32, hidden=64)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(150):
        loss = head(grid)
        opt.zero_grad()
        loss.backward()
        opt.step()
    u, v = sample_pairs(4096, rows, cols, 1, "cpu", torch.Generator().manual_seed(0))
    t = relative_offsets(u, v, rows, cols).reshape(-1, 2)
    constant = (t - t.median(0).values).abs().sum(1).mean().item()
    head.eval()
    assert head(grid).item() < 0.5 * constant
