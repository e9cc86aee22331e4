"""pipelines/ops.py against independent oracles: torchvision's RandomResizedCrop.get_params and
transforms.v2.functional colour/blur kernels, a float64 numpy model of box-filtered bilinear resampling,
and binomial statistics for the per-sample application rates."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

from conftest import chi2_critical
from pipelines import ops
from pipelines.augment import ViewSpec

SIZES = [(48, 64), (90, 40), (64, 64), (20, 100)]  # (20, 100) falls back to the centre crop often
NO_OPS = ViewSpec(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov D (exact with ties: both ECDFs evaluated at every pooled value)."""
    grid = np.unique(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def ks_critical(n: int, m: int, alpha: float = 1e-6) -> float:
    # Asymptotic two-sample KS critical value c(alpha) sqrt((n + m) / (n m)); conservative for discrete
    # data (integer box sides), so a false failure has probability below alpha.
    return math.sqrt(-0.5 * math.log(alpha / 2)) * math.sqrt((n + m) / (n * m))


def binomial_ok(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def box_features(boxes: np.ndarray, hw: np.ndarray) -> dict[str, np.ndarray]:
    y0, x0, h, w = boxes.T
    H, W = hw.T
    return {"area": h * w / (H * W), "log_aspect": np.log(w / h), "centre_y": (y0 + h / 2) / H,
            "centre_x": (x0 + w / 2) / W}


# (0.5, 1): a ratio range not symmetric in log space, where drawing h / w instead of w / h shows (only tall
# crops, log-aspect in [log 0.5, 0], against only wide ones).
@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.2, 1.0), (0.5, 2.0)),
                                         ((0.2, 1.0), (0.5, 1.0))])
def test_crop_boxes_match_torchvision_get_params_distribution(scale, ratio):
    n = 3000
    hw = np.array([SIZES[i % len(SIZES)] for i in range(n)], dtype=np.float64)
    ours = ops.sample_crop_boxes(hw[:, 0], hw[:, 1], scale, ratio, np.random.default_rng(0))
    torch.manual_seed(0)
    ref = np.array([RandomResizedCrop.get_params(torch.empty(1, int(h), int(w)), list(scale), list(ratio))
                    for h, w in hw], dtype=np.float64)
    y0, x0, h, w = ours.T
    assert np.all((y0 >= 0) & (x0 >= 0) & (h >= 1) & (w >= 1))
    assert np.all((y0 + h <= hw[:, 0]) & (x0 + w <= hw[:, 1]))
    assert np.all(ours == np.round(ours)), "torchvision boxes are integer pixels"
    fo, fr = box_features(ours, hw), box_features(ref, hw)
    for key in fo:
        d = ks_statistic(fo[key], fr[key])
        assert d < ks_critical(n, n), (key, d)


@pytest.mark.parametrize("hw", [(10, 200), (200, 10), (30, 31)])
def test_crop_fallback_is_torchvisions_centre_crop(hw):
    # Scale (0.9, 1) with a 3/4..4/3 ratio can never fit a 20:1 image, so every try fails and the clamped
    # centre crop is deterministic; the square-ish image with scale (1, 1) and ratio (2, 3) also falls back.
    scale, ratio = ((0.9, 1.0), (3 / 4, 4 / 3)) if hw[0] != 30 else ((1.0, 1.0), (2.0, 3.0))
    ours = ops.sample_crop_boxes([hw[0]] * 5, [hw[1]] * 5, scale, ratio, np.random.default_rng(1))
    ref = RandomResizedCrop.get_params(torch.empty(1, *hw), list(scale), list(ratio))
    np.testing.assert_array_equal(ours, np.tile(np.array(ref, dtype=np.float64), (5, 1)))


def test_crop_boxes_with_torch_generator_are_deterministic():
    a = ops.sample_crop_boxes([50, 60], [70, 40], (0.08, 1), (3 / 4, 4 / 3), torch.Generator().manual_seed(3))
    b = ops.sample_crop_boxes([50, 60], [70, 40], (0.08, 1), (3 / 4, 4 / 3), torch.Generator().manual_seed(3))
    assert isinstance(a, torch.Tensor) and a.shape == (2, 4)
    assert torch.equal(a, b)


def _images(n=6, h=17, w=23, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# Tolerances: brightness, blur and solarize are the same float32 arithmetic up to reassociation (1e-6);
# contrast/saturation/grayscale use luma 0.299 (PIL, the spec) where torchvision's tensor kernel uses
# 0.2989, so they differ by at most 1e-4 * |1 - f| <= 1e-4 (2e-4 allowed); hue is the same HSV rotation
# written without the division by V (float32 rounding, 1e-5).
@pytest.mark.parametrize("name,tol", [("brightness", 1e-6), ("contrast", 2e-4), ("saturation", 2e-4)])
def test_blend_ops_equal_torchvision(name, tol):
    x = _images()
    f = torch.tensor([0.0, 0.2, 0.7, 1.0, 1.5, 1.8])
    ours = getattr(ops, f"adjust_{name}")(x, f)
    ref = torch.stack([getattr(TF, f"adjust_{name}")(x[i], float(f[i])) for i in range(len(f))])
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)


def test_hue_equals_torchvision():
    x = _images()
    x[0, :, :4] = 0.5  # grey pixels (no hue) and exact ties between channels
    x[1, 0], x[1, 1] = x[1, 2], x[1, 2]
    shift = torch.tensor([-0.5, -0.31, -0.05, 0.0, 0.17, 0.5])
    ref = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(len(shift))])
    torch.testing.assert_close(ops.adjust_hue(x, shift), ref, rtol=0, atol=1e-5)


def test_grayscale_blur_solarize_equal_torchvision():
    x = _images()
    torch.testing.assert_close(ops.grayscale(x).expand_as(x), TF.rgb_to_grayscale(x, num_output_channels=3),
                               rtol=0, atol=2e-4)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.3, 2.0, 3.0])
    for k in (3, 5, 7):
        ref = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2) for i in range(len(sigma))])
        torch.testing.assert_close(ops.gaussian_blur(x, sigma, k), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ops.solarize(x, 0.6), TF.solarize(x, 0.6), rtol=0, atol=0)


def test_color_jitter_applies_each_samples_order_like_torchvision():
    n = 24
    x = _images(n)
    g = torch.Generator().manual_seed(5)
    view = ViewSpec(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, jitter_p=0.75)
    p = ops.sample_view_params(n, view, g)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    refs = []
    for i in range(n):  # the oracle: torchvision's ColorJitter.forward with this sample's order and factors
        y = x[i]
        if p.jitter[i]:
            for op in p.order[i].tolist():
                y = fns[op](y, float(p.factors[i, op]))
        refs.append(y)
    # Four chained ops: the 1e-4 luma difference can be amplified by later factors (<= 1.8) and by the hue
    # rotation's slope (<= 6 per unit of input), so 2e-3.
    torch.testing.assert_close(ops.color_jitter(x, p, view), torch.stack(refs), rtol=0, atol=2e-3)
    assert 0 < int(p.jitter.sum()) < n


def test_gray_first_greys_before_the_jitter_like_moco_v1s_transforms():
    # MoCo v1's main_moco.py: RandomGrayscale(p=0.2), then ColorJitter(0.4, 0.4, 0.4, 0.4). Oracle:
    # torchvision's functional ops in that order with this sample's draws, on the whole (square) image.
    n = 24
    images = (_images(n)[:, :, :17, :17] * 255).round().to(torch.uint8)
    view = ViewSpec(jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4, gray_p=0.5,
                    gray_first=True, flip_p=0.0, blur_p=0.0, solarize_p=0.0)
    p = ops.sample_view_params(n, view, torch.Generator().manual_seed(7))
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    refs = []
    for i in range(n):
        y = images[i].float() / 255
        y = TF.rgb_to_grayscale(y, num_output_channels=3) if p.gray[i] else y
        for op in p.order[i].tolist():
            y = fns[op](y, float(p.factors[i, op]))
        refs.append(y)
    boxes = torch.tensor([[0, 0, 17, 17]] * n)
    out = ops.apply_view(images, boxes, p, view, 17, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    torch.testing.assert_close(out, torch.stack(refs), rtol=0, atol=2e-3)
    grey = p.gray.bool()
    assert 0 < int(grey.sum()) < n
    # A grey image stays grey through saturation and hue: all channels equal, unlike jitter-then-grey.
    torch.testing.assert_close(out[grey][:, 0], out[grey][:, 2], rtol=0, atol=1e-5)


def test_view_params_ranges_and_rates():
    n = 20000
    view = ViewSpec(brightness=0.8, contrast=0.3, saturation=1.5, hue=0.2, flip_p=0.5, jitter_p=0.8,
                    gray_p=0.2, blur_p=0.1, solarize_p=0.3, blur_sigma=(0.1, 2.0))
    p = ops.sample_view_params(n, view, torch.Generator().manual_seed(0))
    lo = torch.tensor([0.2, 0.7, 0.0, -0.2])
    hi = torch.tensor([1.8, 1.3, 2.5, 0.2])
    assert torch.all(p.factors >= lo) and torch.all(p.factors <= hi)
    # A uniform on [lo, hi] leaves a gap of 1% of the range at either end with probability 0.99^n ~ 1e-87.
    span = hi - lo
    assert torch.all(p.factors.min(0).values < lo + 0.01 * span)
    assert torch.all(p.factors.max(0).values > hi - 0.01 * span)
    assert torch.all((p.sigma >= 0.1) & (p.sigma <= 2.0))
    assert torch.equal(p.order.sort(1).values, torch.arange(4).expand(n, 4))
    for k in range(4):  # each op is at each position with probability 1/4
        for op in range(4):
            assert binomial_ok(int((p.order[:, k] == op).sum()), n, 0.25)
    for mask, prob in [(p.flip, 0.5), (p.jitter, 0.8), (p.gray, 0.2), (p.blur, 0.1), (p.solarize, 0.3)]:
        assert binomial_ok(int(mask.sum()), n, prob)


def test_view_params_are_jointly_uniform_and_independent():
    # The rates and positions above hold one parameter at a time; these hold them together. Oracles: the 24
    # jitter orders are equally likely (a uniform random permutation, as torchvision's RandomOrder-style
    # ColorJitter draws it); every pair of yes/no decisions is independent (P(A and B) = pA pB); a blurred view's
    # sigma is U(lo, hi) whatever decided the blur (KS against numpy's own uniforms).
    n = 20000
    view = ViewSpec(flip_p=0.5, jitter_p=0.8, gray_p=0.2, blur_p=0.5, solarize_p=0.3, blur_sigma=(0.1, 2.0))
    p = ops.sample_view_params(n, view, torch.Generator().manual_seed(1))
    perms = sorted(set(itertools.permutations(range(4))))
    code = {perm: i for i, perm in enumerate(perms)}
    counts = np.bincount([code[tuple(o)] for o in p.order.tolist()], minlength=24)
    expected = n / 24
    assert ((counts - expected) ** 2 / expected).sum() < chi2_critical(23)
    masks = {"flip": (p.flip, 0.5), "jitter": (p.jitter, 0.8), "gray": (p.gray, 0.2), "blur": (p.blur, 0.5),
             "solarize": (p.solarize, 0.3)}
    for (a, (ma, pa)), (b, (mb, pb)) in itertools.combinations(masks.items(), 2):
        assert binomial_ok(int((ma & mb).sum()), n, pa * pb), (a, b)
    blurred = p.sigma[p.blur].numpy()
    reference = np.random.default_rng(0).uniform(0.1, 2.0, len(blurred))
    assert ks_statistic(blurred, reference) < ks_critical(len(blurred), len(reference))


def _pil_weights(in_size: int, out_size: int) -> np.ndarray:
    """out_size x in_size float64 weights of PIL's bilinear resampling (Pillow's Resample.c precompute_coeffs,
    which torchvision's antialiased tensor resize follows): window [int(c - s + 0.5), int(c + s + 0.5)) clipped
    to the image, triangle weights filter((x + xmin - c + 0.5) / max(scale, 1)), normalised."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    out = np.zeros((out_size, in_size))
    for i in range(out_size):
        centre = (i + 0.5) * scale
        xmin = max(int(centre - support + 0.5), 0)
        xmax = min(int(centre + support + 0.5), in_size)
        ws = [max(0.0, 1.0 - abs((x + xmin - centre + 0.5) / support)) for x in range(xmax - xmin)]
        out[i, xmin:xmax] = np.array(ws) / sum(ws)
    return out


def pil_crop_resize(img: np.ndarray, box, size: int) -> np.ndarray:
    """float64 C x size x size: crop the integer box, then PIL's separable bilinear resample, in 0..1."""
    y0, x0, h, w = (int(v) for v in box)
    crop = img[:, y0:y0 + h, x0:x0 + w]
    return np.einsum("sh,chw,tw->cst", _pil_weights(h, size), crop, _pil_weights(w, size)) / 255.0


def test_crop_resize_matches_pil_and_torchvision_on_an_edge_padded_batch():
    rng = np.random.default_rng(0)
    shapes = [(30, 41), (52, 25), (17, 60)]
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    batch = torch.from_numpy(ops.pad_batch(imgs))
    # Boxes touching the right/bottom edge (the padding beyond must not be read), enlargements and reductions
    # by non-integer factors in either direction.
    boxes = torch.tensor([[5.0, 11.0, 25.0, 30.0], [0.0, 0.0, 52.0, 25.0], [3.0, 7.0, 10.0, 40.0]])
    # fp32 sums of up to ~60 products of 0-255 values: ~60 x 255 x 6e-8 / 255 ~ 4e-6, so 1e-5.
    for size in (8, 16, 29):
        out = ops.crop_resize(batch, boxes, size)
        for i, img in enumerate(imgs):
            chw = img.transpose(2, 0, 1)
            np.testing.assert_allclose(out[i].numpy(), pil_crop_resize(chw.astype(np.float64), boxes[i].tolist(),
                                                                       size), rtol=0, atol=1e-5)
            y0, x0, h, w = (int(v) for v in boxes[i].tolist())
            ref = TF.resized_crop(torch.from_numpy(chw).float(), y0, x0, h, w, [size, size], antialias=True)
            torch.testing.assert_close(out[i], (ref / 255).clamp(0, 1), rtol=0, atol=1e-5)


def test_fractional_boxes_read_only_their_pixels_and_interpolate_linearly():
    # The torch backend's pre-shrunk regions give fractional boxes. Closed forms: enlarging is linear
    # interpolation, so a ramp I(y, x) = x (pixel x centred at x + 0.5) comes back as the output pixels' centres
    # x0 + (j + 0.5) w / S - 0.5 wherever both neighbours are in the box; and whatever the scale, pixels whose
    # centres lie outside the box are never read (a spike of 10^4 there would show), a constant stays constant.
    size, hgt, wid = 12, 40, 90
    ramp = torch.arange(wid, dtype=torch.float32).expand(1, 3, hgt, wid).contiguous()
    x0, w = 10.25, 9.5
    out = ops.crop_resize(ramp, torch.tensor([[0.75, x0, 20.25, w]]), size)[0, 0] * 255
    centres = x0 + (np.arange(size) + 0.5) * w / size
    interior = (centres - 1 >= np.ceil(x0 - 0.5) + 0.5) & (centres + 1 <= np.floor(x0 + w - 0.5) + 0.5)
    assert interior.sum() >= size // 2
    np.testing.assert_allclose(out.numpy()[:, interior], np.broadcast_to(centres - 0.5, (size, size))[:, interior],
                               rtol=0, atol=1e-4)
    for box in ((3.5, 7.25, 30.5, 70.0), (0.75, 10.25, 20.25, 9.5)):
        y0, x0, h, w = box
        img = torch.full((1, 3, hgt, wid), 100.0)
        ys, xs = torch.arange(hgt) + 0.5, torch.arange(wid) + 0.5
        outside = ~(((ys >= y0) & (ys < y0 + h))[:, None] & ((xs >= x0) & (xs < x0 + w))[None, :])
        img[:, :, outside] = 1e4
        torch.testing.assert_close(ops.crop_resize(img, torch.tensor([box]), size) * 255,
                                   torch.full((1, 3, size, size), 100.0), rtol=0, atol=1e-3)


def test_identity_box_equals_source_resize():
    img = torch.randint(0, 256, (2, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([[0.0, 0.0, 20.0, 24.0]] * 2)
    # Enlarging: torchvision's bilinear resize (antialiasing does nothing there), also at unequal scales.
    torch.testing.assert_close(ops.crop_resize(img, box, 31), TF.resize(img.float() / 255, [31, 31], antialias=True),
                               rtol=0, atol=1e-5)
    sq = img[:, :, :, :20]
    sq_box = torch.tensor([[0.0, 0.0, 20.0, 20.0]] * 2)
    torch.testing.assert_close(ops.crop_resize(sq, sq_box, 20), sq.float() / 255, rtol=0, atol=1e-6)
    # Shrinking, by an integer factor or not: torchvision's antialiased (triangle-filter) resize.
    for size in (33, 47, 10, 7):
        ref = TF.resize(sq.float() / 255, [size, size], antialias=True)
        torch.testing.assert_close(ops.crop_resize(sq, sq_box, size), ref, rtol=0, atol=1e-5)


def _single_op_outputs(view: ViewSpec, n: int, seed: int = 0):
    imgs = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]]).expand(n, 4)
    out = ops.make_view(imgs, boxes, view, 8, (0, 0, 0), (1, 1, 1), torch.Generator().manual_seed(seed + 1))
    return imgs.float() / 255, out


@pytest.mark.parametrize("op", ["flip", "jitter", "gray", "blur", "solarize"])
def test_application_rates_measured_on_outputs(op):
    n, prob = 2000, 0.3
    kw = {"flip": dict(flip_p=prob), "jitter": dict(jitter_p=prob, brightness=0.5, contrast=0, saturation=0, hue=0),
          "gray": dict(gray_p=prob), "blur": dict(blur_p=prob, blur_sigma=(1.0, 2.0)),
          "solarize": dict(solarize_p=prob, solarize_threshold=0.0)}[op]
    base, out = _single_op_outputs(replace(NO_OPS, **kw), n)
    changed = (out - base).abs().amax(dim=(1, 2, 3)) > 1e-6
    if op == "flip":
        assert torch.all(changed == (out - base.flip(3)).abs().amax(dim=(1, 2, 3)).le(1e-6))
    if op == "gray":
        assert torch.all(changed == (out[:, 0] == out[:, 1]).all(-1).all(-1))
    if op == "solarize":
        assert torch.all(changed == (out - (1 - base)).abs().amax(dim=(1, 2, 3)).le(1e-6))
    assert binomial_ok(int(changed.sum()), n, prob), int(changed.sum())


def test_make_view_shape_determinism_and_normalisation():
    imgs = torch.randint(0, 256, (4, 3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0.0, 0.0, 30.0, 40.0], [2.0, 3.0, 20.0, 20.0], [10.0, 5.0, 15.0, 30.0], [0, 0, 8, 8]])
    view = ViewSpec(solarize_p=0.5)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    a = ops.make_view(imgs, boxes, view, 16, mean, std, torch.Generator().manual_seed(7))
    b = ops.make_view(imgs, boxes, view, 16, mean, std, torch.Generator().manual_seed(7))
    c = ops.make_view(imgs, boxes, view, 16, mean, std, torch.Generator().manual_seed(8))
    assert a.shape == (4, 3, 16, 16) and a.dtype == torch.float32 and a.device == imgs.device
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = ops.make_view(imgs, boxes, NO_OPS, 16, mean, std, torch.Generator().manual_seed(7))
    m, sd = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    expect = (ops.crop_resize(imgs, boxes, 16) - m) / sd
    torch.testing.assert_close(plain, expect, rtol=0, atol=1e-6)


def test_a_batch_converted_to_float_once_gives_the_same_views():
    # The backends convert a batch to float32 once for all its views; the views must not change.
    imgs = torch.randint(0, 256, (6, 3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = torch.from_numpy(ops.sample_crop_boxes([30] * 6, [40] * 6, (0.08, 1), (3 / 4, 4 / 3),
                                                   np.random.default_rng(0))).float()
    view = ViewSpec(solarize_p=0.5)
    a, b = (ops.make_view(x, boxes, view, 16, (0.5,) * 3, (0.25,) * 3, torch.Generator().manual_seed(3))
            for x in (imgs, imgs.float()))
    assert torch.equal(a, b)


def test_accelerator_path_gives_the_cpu_paths_values(monkeypatch):
    # On accelerators masked ops are computed densely and selected (no host sync); on the CPU only the
    # selected samples are computed. Both must give the same views (per-sample ops: bitwise equal).
    imgs = torch.randint(0, 256, (16, 3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    boxes = torch.from_numpy(ops.sample_crop_boxes([30] * 16, [40] * 16, (0.08, 1), (3 / 4, 4 / 3),
                                                   np.random.default_rng(0))).float()
    view = ViewSpec(hue=0.3, blur_p=0.5, solarize_p=0.5, gray_p=0.3)
    sparse = ops.make_view(imgs, boxes, view, 16, (0.5,) * 3, (0.25,) * 3, torch.Generator().manual_seed(1))
    monkeypatch.setattr(ops, "where_sampled", ops.where_sampled_dense)
    dense = ops.make_view(imgs, boxes, view, 16, (0.5,) * 3, (0.25,) * 3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size, side", [(32, 3), (64, 7), (96, 9), (176, 17), (224, 23), (256, 25)])
def test_blur_kernel_side_is_simclrs(size, side):
    # google-research/simclr data_util.py: kernel_size = height // 10; radius = kernel_size // 2;
    # side = 2 * radius + 1 -- written out here per size from that rule, not from fastssl's formula.
    from pipelines.augment import ViewSpec

    assert ViewSpec().blur_kernel_size(size) == side
