"""Weighted kNN against a brute-force numpy re-implementation of Wu et al. 2018's vote."""

from __future__ import annotations

import numpy as np
import torch

from fastssl.eval.knn import knn_accuracy, knn_predict


def _numpy_knn(train, labels, query, c, k, t):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    query = query / np.linalg.norm(query, axis=1, keepdims=True)
    out = np.zeros((len(query), c))
    for i, q in enumerate(query):
        sim = train @ q
        nn_idx = np.argsort(-sim, kind="stable")[:k]
        for j in nn_idx:
            out[i, labels[j]] += np.exp(sim[j] / t)
    return out


def test_knn_votes_match_numpy():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 16))
    labels = rng.integers(0, 5, 200)
    query = rng.normal(size=(37, 16))
    got = knn_predict(torch.tensor(train), torch.tensor(labels), torch.tensor(query), 5, k=20, temperature=0.07,
                      chunk=8)
    np.testing.assert_allclose(got.double().numpy(), _numpy_knn(train, labels, query, 5, 20, 0.07), rtol=1e-4)


def test_knn_accuracy_on_clustered_features_is_perfect_and_random_is_near_chance():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, 32)) * 5
    ytr, yva = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    tr = centers[ytr] + rng.normal(size=(400, 32))
    va = centers[yva] + rng.normal(size=(400, 32))
    res = knn_accuracy(torch.tensor(tr), torch.tensor(ytr), torch.tensor(va), torch.tensor(yva), 4)
    assert res["top1"] == 100.0
    noise = knn_accuracy(torch.tensor(rng.normal(size=(400, 32))), torch.tensor(ytr),
                         torch.tensor(rng.normal(size=(400, 32))), torch.tensor(yva), 4)
    # chance is 25%; binomial sd over 400 queries is ~2.2 points, so 25 +- 11 is > 4.5 sd
    assert 14 < noise["top1"] < 36
