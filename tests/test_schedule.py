"""Learning-rate scaling and warmup + cosine against their closed forms."""

from __future__ import annotations

import math

import pytest

from fastssl.errors import UserError
from fastssl.schedule import lr_at, scaled_lr


def test_scaling_rules():
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)  # SimCLR B.1: 0.3 x 4096/256
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(0.3)  # 0.075 x sqrt(4096 / 256)
    assert scaled_lr(1.5e-4, 256, "none") == 1.5e-4
    with pytest.raises(UserError, match="lr_scaling"):
        scaled_lr(0.1, 256, "cubic")


def test_warmup_is_linear_and_cosine_ends_at_min():
    total, warm, peak, lo = 100, 10, 2.0, 0.1
    assert [lr_at(s, total, warm, peak, lo) for s in range(warm)] == pytest.approx(
        [peak * (s + 1) / warm for s in range(warm)])
    for s in (10, 30, 55, 99, 100):
        t = (s - warm) / (total - warm)
        assert lr_at(s, total, warm, peak, lo) == pytest.approx(lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * t)))
    assert lr_at(total, total, warm, peak, lo) == pytest.approx(lo)
    assert lr_at(0, 10, 0, 1.0) == pytest.approx(1.0)
