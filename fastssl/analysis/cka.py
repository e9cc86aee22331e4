"""Linear centred kernel alignment (Kornblith et al. 2019, "Similarity of Neural Network Representations
Revisited", eq. 4 with linear kernels).

For features X (n, p) and Y (n, q) of the same n examples, with columns centred:
    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) = <K, L>_F / (||K||_F ||L||_F),  K = X X^T, L = Y Y^T.
It is invariant to orthogonal transforms and isotropic scaling of either side (not to arbitrary invertible
linear maps), and 1 when X = Y. Computed in float64: the numerator is a sum of n^2 products of Gram
entries whose magnitudes differ by orders between early and late layers, where float32 loses digits.
"""

from __future__ import annotations

import torch


def _centred(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().to(torch.float64).flatten(1)
    return x - x.mean(0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between (n, p) and (n, q) features of the same n examples. NaN when either is constant."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares the same examples: got {x.shape[0]} and {y.shape[0]} rows")
    x, y = _centred(x), _centred(y)
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    if n < p * q / (p + q):  # cheaper through the n x n Gram matrices than the p x q cross-covariance
        k, l_ = x @ x.T, y @ y.T
        num, den = (k * l_).sum(), torch.linalg.norm(k) * torch.linalg.norm(l_)
    else:
        num = torch.linalg.norm(y.T @ x) ** 2
        den = torch.linalg.norm(x.T @ x) * torch.linalg.norm(y.T @ y)
    return float(num / den) if den > 0 else float("nan")


def _unit_gram(x: torch.Tensor) -> torch.Tensor:
    k = _centred(x)
    k = k @ k.T
    norm = torch.linalg.norm(k)
    return k / norm if norm > 0 else torch.full_like(k, float("nan"))


def cka_matrix(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor] | None = None) -> torch.Tensor:
    """CKA between every layer of A (rows) and every layer of B (columns; B = A when omitted), each layer
    given as (n, features) for the same n examples. Each Gram matrix is built once: n^2 per layer."""
    grams_a = [_unit_gram(x) for x in feats_a]
    grams_b = grams_a if feats_b is None else [_unit_gram(y) for y in feats_b]
    n = {g.shape[0] for g in grams_a + grams_b}
    if len(n) != 1:
        raise ValueError(f"CKA compares the same examples: layers have {sorted(n)} rows")
    a = torch.stack([g.flatten() for g in grams_a])
    b = torch.stack([g.flatten() for g in grams_b])
    return (a @ b.T).float()  # <K/||K||, L/||L||>_F for every pair
