"""The augmentation spec compiled to batched torch operators that run where the images are (CPU or GPU).

Every sample of a batch gets its own random parameters, drawn as tensors and applied with masks and
`torch.where`: no Python loop over samples, and no host-device synchronisation, so a CUDA batch is
queued without stalling the training step. Only the crop boxes are drawn on the host
(`sample_crop_boxes`), because they depend on each original image's size and decide what is decoded and
shipped. Semantics are those of pipelines/augment.py (torchvision's), tested against
torchvision.transforms.v2.functional in tests/test_ops.py. Backend-agnostic: the torch and FFCV backends
call `make_view` after their own decode.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.augment import ViewSpec

_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params
# ITU-R 601-2 luma as in PIL's convert("L"); torchvision's tensor kernels use 0.2989 for red (1e-4 apart).
_LUMA = (0.299, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # jitter op ids, the columns of ViewParams.factors


def sample_crop_boxes(heights, widths, scale, ratio, generator: np.random.Generator | torch.Generator):
    """RandomResizedCrop boxes (y0, x0, h, w), one per image, with torchvision's get_params semantics.

    Per image: up to 10 tries of area ~ U(scale) * H * W and log-aspect ~ U(log ratio), sides rounded
    half-to-even as Python's round(); the first try that fits wins, at a uniform integer offset; else the
    centre crop with the aspect clamped to `ratio`. All tries are drawn at once (a fixed number of draws
    per image keeps the stream independent of the outcome). Returns an (N, 4) float64 numpy array for a
    numpy generator and a float64 CPU tensor for a torch generator.
    """
    height = np.asarray(heights, dtype=np.float64).reshape(-1)
    width = np.asarray(widths, dtype=np.float64).reshape(-1)
    n = height.shape[0]
    if isinstance(generator, torch.Generator):
        u = torch.rand((n, _CROP_ATTEMPTS, 4), generator=generator, dtype=torch.float64,
                       device=generator.device).cpu().numpy()
    else:
        u = generator.random((n, _CROP_ATTEMPTS, 4))
    area = (height * width)[:, None]
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = np.rint(np.sqrt(target * aspect))
    h = np.rint(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    w, h = w[rows, first], h[rows, first]
    # floor(u * (count)) is a uniform integer in [0, count), as torch.randint(0, H - h + 1).
    y0 = np.floor(u[rows, first, 2] * (height - h + 1))
    x0 = np.floor(u[rows, first, 3] * (width - w + 1))

    in_ratio = width / height
    lo, hi = min(ratio), max(ratio)
    fb_w = np.where(in_ratio < lo, width, np.where(in_ratio > hi, np.rint(height * hi), width))
    fb_h = np.where(in_ratio < lo, np.rint(width / lo), height)
    found = fits.any(axis=1)
    h = np.where(found, h, fb_h)
    w = np.where(found, w, fb_w)
    y0 = np.where(found, y0, (height - fb_h) // 2)
    x0 = np.where(found, x0, (width - fb_w) // 2)
    boxes = np.stack([y0, x0, h, w], axis=1)
    return torch.from_numpy(boxes) if isinstance(generator, torch.Generator) else boxes


@dataclass
class ViewParams:
    """The per-sample random parameters of one view of a batch (all tensors of length N on one device)."""

    flip: torch.Tensor  # bool
    jitter: torch.Tensor  # bool: colour jitter applied
    factors: torch.Tensor  # (N, 4) brightness, contrast, saturation factors and hue shift, as drawn
    order: torch.Tensor  # (N, 4) int64: order[i, k] is the jitter op applied k-th to sample i
    gray: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor  # blur sigma in output pixels
    solarize: torch.Tensor  # bool


@functools.lru_cache(maxsize=64)
def _cached_constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, device=device, dtype=dtype)


def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant on `device`, made once (callers never write to it). torch.tensor(list, device=cuda)
    copies from pageable memory, which first waits for all work queued on the stream: a host sync per call,
    ten per training step, that would stop the CPU from running ahead of the GPU. Inside a compiled graph a
    plain tensor, which becomes a constant of the graph (dynamo would trace through the cache and warn)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, device=device, dtype=dtype)
    return _cached_constant(values, device, dtype)


def sample_view_params(n: int, view: ViewSpec, generator: torch.Generator, device=None) -> ViewParams:
    """Draw every parameter of a view; the same draws happen whatever the probabilities, so changing one
    probability in a spec never changes the other operations' draws."""
    u = torch.rand((n, 14), generator=generator, device=generator.device)
    u = u.to(device) if device is not None else u
    lo = [max(0.0, 1.0 - s) for s in (view.brightness, view.contrast, view.saturation)] + [-view.hue]
    hi = [1.0 + s for s in (view.brightness, view.contrast, view.saturation)] + [view.hue]
    lo_t = _constant(tuple(lo), u.device, torch.float32)
    hi_t = _constant(tuple(hi), u.device, torch.float32)
    return ViewParams(
        flip=u[:, 0] < view.flip_p,
        jitter=u[:, 1] < view.jitter_p,
        factors=lo_t + (hi_t - lo_t) * u[:, 2:6],
        order=torch.argsort(u[:, 6:10], dim=1),  # argsort of iid uniforms: a uniform random permutation
        gray=u[:, 10] < view.gray_p,
        blur=u[:, 11] < view.blur_p,
        sigma=view.blur_sigma[0] + (view.blur_sigma[1] - view.blur_sigma[0]) * u[:, 12],
        solarize=u[:, 13] < view.solarize_p,
    )


def resample_weights(start: torch.Tensor, length: torch.Tensor, size: int, extent: int) -> torch.Tensor:
    """N x size x extent weights resizing the span [start, start + length) of an axis of `extent` pixels to
    `size` pixels, per sample, as torchvision's antialiased bilinear resize (PIL's triangle filter) of the crop.

    Output pixel i is centred at start + (i + 0.5) * scale in input pixels (scale = length / size); input pixel
    j, centred at j + 0.5, weighs max(0, 1 - |j + 0.5 - centre| / support) with support = max(scale, 1): plain
    bilinear when enlarging, a triangle as wide as two output pixels when shrinking. Only pixels of the crop
    count (torchvision crops first, so its filter window stops at the crop's edges), and each row is
    normalised to sum 1, as PIL does at those edges.
    """
    scale = length / size
    support = scale.clamp_min(1.0)
    i = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5
    centre = start[:, None] + scale[:, None] * i  # N x size
    j = torch.arange(extent, device=start.device, dtype=torch.float32) + 0.5
    w = (1.0 - (j - centre[:, :, None]).abs() / support[:, None, None]).clamp_min_(0.0)
    inside = (j >= start[:, None]) & (j < (start + length)[:, None])  # N x extent: the crop's pixels
    w.mul_(inside[:, None, :])
    return w.div_(w.sum(2, keepdim=True))


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Cut boxes (y0, x0, h, w) out of an N x 3 x H x W batch of 0-255 values (uint8, or already float32: the
    backends convert a batch once for all its views) and resize each to size x size, in [0, 1]: torchvision's
    resized_crop with antialias=True (what RandomResizedCrop does), for every sample's own box. (DALI's resize
    agrees but at a view's outer pixels: its filter reads past the crop box where torchvision's renormalises.)

    Separable, as torchvision's: per sample a size x H and a size x W matrix of filter weights
    (`resample_weights`), applied as two batched matmuls, so boxes of any size share two kernel launches and no
    host sync. Dense matrices spend FLOPs on zero weights (2 N C S H (W + S) for an S-pixel view of H x W
    regions, ~250 GFLOP per view at N=512, H=W=500, S=224: estimated a few ms on an H100 in fp32, not measured
    yet), where a banded form would read fewer pixels but launch a kernel per filter tap. On this CPU it is as
    fast as the roi_align box filter it replaced (CPU: 128 x 64 px views 11 vs 8 ms, 64 x 224 px 122 vs 165 ms).
    Boxes may be fractional (the torch backend's pre-shrunk regions): the same formula, with the crop's pixels
    those whose centres lie in the box.
    """
    y0, x0, h, w = boxes.to(images.device, torch.float32).unbind(1)
    rows = resample_weights(y0, h, size, images.shape[2])  # N x S x H
    cols = resample_weights(x0, w, size, images.shape[3])  # N x S x W
    out = torch.matmul(torch.matmul(rows[:, None], images.float()), cols[:, None].transpose(2, 3))
    return out.mul_(1.0 / 255.0).clamp_(0.0, 1.0)


def pad_batch(regions: list[np.ndarray]) -> np.ndarray:
    """Stack H x W x 3 uint8 arrays of different sizes into N x 3 x Hmax x Wmax, padding by edge replication
    (crop_resize reads only each box's own pixels: the padding's values never reach a view)."""
    hm = max(r.shape[0] for r in regions)
    wm = max(r.shape[1] for r in regions)
    out = np.empty((len(regions), 3, hm, wm), dtype=np.uint8)
    for i, r in enumerate(regions):
        h, w = r.shape[:2]
        out[i, :, :h, :w] = r.transpose(2, 0, 1)
        out[i, :, h:, :w] = out[i, :, h - 1:h, :w]
        out[i, :, :, w:] = out[i, :, :, w - 1:w]
    return out


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W luma of N x 3 x H x W RGB values in [0, 1]."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def where_sampled(mask: torch.Tensor, fn, x: torch.Tensor, *per_sample) -> torch.Tensor:
    """fn(x, *per_sample) for the samples in `mask`, x elsewhere (fn works sample by sample).

    On an accelerator every sample is computed and selected with torch.where: gathering the subset needs
    its size on the host, a synchronisation that would stall the CPU until the GPU has caught up with
    the training step. On the CPU there is nothing to overlap, so only the selected samples are computed
    (the hue rotation, 4 times per jittered view, and the blur are most of the CPU time): 2.2x faster
    make_view there, same values. Inside a compiled graph every sample is computed too (a subset's size is
    data-dependent, a graph break), and the compiler fuses the computation with the selection.
    """
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return where_sampled_dense(mask, fn, x, *per_sample)
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    return x.index_copy(0, idx, fn(x[idx], *(a[idx] for a in per_sample)))


def where_sampled_dense(mask: torch.Tensor, fn, x: torch.Tensor, *per_sample) -> torch.Tensor:
    return torch.where(_per_sample(mask), fn(x, *per_sample), x)


def _blend(x: torch.Tensor, target: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor)
    return (f * x + (1.0 - f) * target).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x[:, :1]), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(dim=(2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `shift` turns per sample, as torchvision (and PIL) do.

    The rotation keeps V = max and V * S = max - min, so the round trip needs neither S nor a division
    by V: channel n of the result is max - (max - min) * clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6.
    """
    r, g, b = x.unbind(1)
    maxc, argmax = x.max(dim=1)
    minc = x.amin(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))  # grey pixels: hue is irrelevant
    # Ties resolve as torchvision's: red first, then green (argmax returns the first maximum).
    h = torch.where(argmax == 0, (g - b) / safe, torch.where(argmax == 1, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h6 = torch.remainder(h + 6.0 * _per_sample(shift).squeeze(1), 6.0)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + h6, 6.0)
        channels.append(maxc - delta * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, 1)


def color_jitter(x: torch.Tensor, params: ViewParams, view: ViewSpec) -> torch.Tensor:
    """Brightness, contrast, saturation and hue in each sample's own order, where params.jitter says so.

    The first three are one blend x' = clamp(f x + (1 - f) t) with target t = 0, mean grey or grey, so
    each of the 4 positions costs one blend for the whole batch (factor 1, an exact identity, for samples
    whose op there is hue or that skip jitter) plus one masked hue rotation.
    """
    identity = _constant((1.0, 1.0, 1.0, 0.0), x.device, torch.float32)
    factors = torch.where(params.jitter[:, None], params.factors, identity)
    for k in range(4):
        op = params.order[:, k]
        gray = grayscale(x)
        target = torch.where(_per_sample(op == BRIGHTNESS), torch.zeros_like(gray),
                             torch.where(_per_sample(op == CONTRAST), gray.mean(dim=(2, 3), keepdim=True), gray))
        f = torch.where(op == HUE, torch.ones_like(factors[:, 0]), factors.gather(1, op.clamp(max=2)[:, None])[:, 0])
        x = _blend(x, target, f)
        if view.hue > 0:
            x = where_sampled(params.jitter & (op == HUE), adjust_hue, x, factors[:, HUE])
    return x


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(N, k) normalised 1-D Gaussian taps at integer offsets (torchvision's kernel)."""
    d = torch.arange(kernel_size, device=sigma.device, dtype=torch.float32) - kernel_size // 2
    k = torch.exp(-(d[None, :] ** 2) / (2.0 * sigma[:, None].float() ** 2))
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample Gaussian blur: a separable grouped convolution (one group per sample and channel)."""
    n, c, hgt, wid = x.shape
    taps = gaussian_kernels(sigma, kernel_size).repeat_interleave(c, dim=0)  # (N * C, k)
    pad = kernel_size // 2
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, hgt + 2 * pad, wid + 2 * pad)
    y = F.conv2d(y, taps[:, None, :, None], groups=n * c)
    y = F.conv2d(y, taps[:, None, None, :], groups=n * c)
    return y.reshape(n, c, hgt, wid)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = _constant(tuple(mean), x.device, x.dtype).reshape(1, -1, 1, 1)
    s = _constant(tuple(std), x.device, x.dtype).reshape(1, -1, 1, 1)
    return (x - m) / s


def augment_crops(x: torch.Tensor, params: ViewParams, view: ViewSpec, mean, std) -> torch.Tensor:
    """The spec's steps 2-7 on cropped float views; a step whose probability is 0 is skipped altogether."""
    size = x.shape[-1]
    if view.flip_p > 0:
        x = where_sampled(params.flip, lambda y: y.flip(3), x)
    def to_gray(y):
        return where_sampled(params.gray, lambda z: grayscale(z).expand_as(z), y) if view.gray_p > 0 else y

    if view.gray_first:
        x = to_gray(x)
    if view.jitters:
        x = color_jitter(x, params, view)
    if not view.gray_first:
        x = to_gray(x)
    if view.blur_p > 0:
        k = view.blur_kernel_size(size)
        x = where_sampled(params.blur, lambda y, s: gaussian_blur(y, s, k), x, params.sigma)
    if view.solarize_p > 0:
        x = where_sampled(params.solarize, lambda y: solarize(y, view.solarize_threshold), x)
    return normalize(x, mean, std)


@functools.cache
def compiled_augment_crops():
    """`augment_crops` through torch.compile, made on first use. Eager, each of the colour jitter's 4 positions
    is a blend plus a hue rotation of the whole batch on an accelerator: a SimCLR view at 224 px is ~400 torch
    operations, ~230 of them writing a new tensor the size of the batch or of one of its channels (counted
    with a TorchDispatchMode); compiled, they fuse into a few kernels. One graph per view spec and
    batch size (the shorter last batch of drop_last=false adds one); the same values as eager (to fp32
    rounding: the compiler may reorder arithmetic)."""
    return torch.compile(augment_crops, dynamic=False)


def apply_view(images: torch.Tensor, boxes: torch.Tensor, params: ViewParams, view: ViewSpec, size: int,
               mean, std, compiled: bool = False) -> torch.Tensor:
    """The spec's steps 1-7 with given parameters; `compiled` runs steps 2-7 through `compiled_augment_crops`."""
    augment = compiled_augment_crops() if compiled else augment_crops
    return augment(crop_resize(images, boxes, size), params, view, mean, std)


def make_view(images: torch.Tensor, boxes: torch.Tensor, view: ViewSpec, size: int, mean, std,
              generator: torch.Generator, compiled: bool = False) -> torch.Tensor:
    """One augmented view of a padded N x 3 x H x W batch (uint8 or float32 0-255, see `crop_resize`): float
    N x 3 x size x size, normalised.

    `boxes` (N, 4) are (y0, x0, h, w) in pixels of `images`; the other parameters are drawn per sample
    from `generator` (on any device; the draws are moved to the images' device). `compiled`: see
    `compiled_augment_crops` (the draws stay outside the graph, so the values do not depend on it).
    """
    if images.shape[0] == 0:  # a rank's empty share of a short last batch (drop_last=false)
        return torch.empty((0, 3, size, size), device=images.device)
    params = sample_view_params(images.shape[0], view, generator, images.device)
    return apply_view(images, boxes, params, view, size, mean, std, compiled)
