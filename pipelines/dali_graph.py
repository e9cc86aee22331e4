"""The augmentation spec compiled to a DALI graph: each image decoded once, every view made from that decode.

Randomness does not come from DALI's random operators: the host draws every per-sample parameter with
`ops.sample_crop_boxes` and `ops.sample_view_params` (the torch backend's own samplers, seeded by
`batch_seed`) and feeds them through `external_source`, one row of PARAM_COLUMNS per sample and view.
That keeps crops exactly torchvision's RandomResizedCrop (DALI's random_resized_crop draws its own
boxes, from a stream a resumed run could not replay), makes a resumed run draw the views of an
uninterrupted one, and lets both backends draw the same parameters for the same batch.

Per view, with x in [0, 1] float HWC:
1. crop + resize: `fn.resize` of the box's region of interest (bilinear, antialiased when shrinking as
   torchvision's antialias=True); a horizontal flip is the same ROI with x0 and x1 exchanged, which
   DALI resamples mirrored, so it costs nothing.
2. colour jitter: the host resolves each sample's random order into, per position, a blend factor and
   target (`ops.color_jitter`'s formulation): clamp(f x + (1 - f) t) with t = 0 (brightness), the mean
   grey (contrast) or the grey image (saturation), f = 1 (an exact identity) where the sample rotates hue
   or skips jitter. Hue, a piecewise rotation in HSV, runs under a conditional (`enable_conditionals=True`)
   at the positions where a sample has it, as `ops.adjust_hue`'s closed form
   (max - (max - min) * clamp(min(k, 4 - k), 0, 1)). Composing the four ops as one colour matrix would not
   be exact: each op clamps to [0, 1], contrast uses the mean of the *current* image, and hue is not linear.
3. grayscale (before 2. with `gray_first`) and 5. solarise: arithmetic masks (x (1 - m) + y m with m in
   {0, 1} is exact and cheaper than splitting the batch); 4. blur: a conditional, so unblurred samples skip
   the convolution (`fn.gaussian_blur` samples torchvision's kernel and mirrors at borders as its reflect
   padding).
6. normalise to NCHW with `fn.crop_mirror_normalize`.
A step whose probability is 0 is left out of the graph; one whose probability is 1 needs no branch.
"""

from __future__ import annotations

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

from pipelines import ops
from pipelines.augment import AugmentSpec, ViewSpec

# One float32 row per sample and view: the box as DALI's roi_start / roi_end (x exchanged when flipped),
# then per jitter position k (0..3) the blend factor f, 1 - f, whether the blend target is the mean grey
# (contrast) or the grey image (saturation) (neither: 0, brightness), whether hue rotates there; then the
# hue shift and the grey / blur / sigma / solarise draws.
ROI = slice(0, 4)
POSITION, F, ONE_MINUS_F, TO_MEAN, TO_GRAY, HUE_HERE = 4, 0, 1, 2, 3, 4  # column = POSITION + 5 k + field
SHIFT, GRAY, BLUR, SIGMA, SOLARIZE = 24, 25, 26, 27, 28
PARAM_COLUMNS = 29
LUMA = ops._LUMA  # one definition of grey for both backends (ITU-R 601-2)
# Channel n of a hue-rotated pixel reads k = (n + 6 H) mod 6 with n = 5, 3, 1 for R, G, B (ops.adjust_hue).
_HUE_SECTOR_OFFSETS = [5.0, 3.0, 1.0]
_NEXT_MINUS_PREVIOUS = [0, 1, -1, -1, 0, 1, 1, -1, 0]  # (g - b, b - r, r - g): hue within the max's sector
_EARLIER_CHANNELS = [0, 0, 0, 1, 0, 0, 1, 1, 0]  # how many channels before this one are maxima too

# nvJPEG buffers sized for an ImageNet-scale JPEG up front (DALI's own ResNet-50 example uses these
# figures): allocated once per decoder thread instead of re-grown while the first epoch meets ever larger
# images. Mixed decoder only; the CPU decoder allocates per image.
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512


def pack_view_params(boxes: np.ndarray, p: ops.ViewParams) -> np.ndarray:
    """(N, PARAM_COLUMNS) float32 rows from crop boxes (N, 4) (y0, x0, h, w) and one view's parameters.

    The jitter order is resolved here, on the host, into per-position blend factors and targets (as
    `ops.color_jitter` does with masks), so the graph needs a branch only for hue.
    """
    y0, x0, h, w = (np.asarray(boxes, dtype=np.float64)[:, i] for i in range(4))
    flip, jitter = p.flip.cpu().numpy(), p.jitter.cpu().numpy()
    factors, order = p.factors.cpu().numpy(), p.order.cpu().numpy()
    out = np.zeros((len(y0), PARAM_COLUMNS), dtype=np.float32)
    out[:, ROI] = np.stack([y0, np.where(flip, x0 + w, x0), y0 + h, np.where(flip, x0, x0 + w)], axis=1)
    for k in range(4):
        op = order[:, k]
        blend = jitter & (op != ops.HUE)
        f = np.where(blend, factors[np.arange(len(op)), np.minimum(op, ops.SATURATION)], 1.0).astype(np.float32)
        col = POSITION + 5 * k
        out[:, col + F] = f
        out[:, col + ONE_MINUS_F] = np.float32(1.0) - f  # float32 as `ops._blend` computes it
        out[:, col + TO_MEAN] = blend & (op == ops.CONTRAST)
        out[:, col + TO_GRAY] = blend & (op == ops.SATURATION)
        out[:, col + HUE_HERE] = jitter & (op == ops.HUE)
    out[:, SHIFT] = factors[:, ops.HUE]
    out[:, GRAY] = p.gray.cpu().numpy()
    out[:, BLUR] = p.blur.cpu().numpy()
    out[:, SIGMA] = p.sigma.cpu().numpy()
    out[:, SOLARIZE] = p.solarize.cpu().numpy()
    return out


def _gray(x):
    """H x W x 1 luma of H x W x 3 RGB (a 1 x 3 matrix applied to each pixel)."""
    return fn.coord_transform(x, M=list(LUMA))


def _hue(x, shift):
    """torchvision's HSV hue rotation by `shift` turns, as `ops.adjust_hue` (same ties: red, then green).

    Written channel-wise with 3 x 3 pixel matrices (fn.coord_transform) rather than per-channel slices:
    each DALI arithmetic call is one pass over the batch, so fewer calls is less memory traffic.
    """
    maxc = fn.reductions.max(x, axes=[2], keep_dims=True)
    delta = maxc - fn.reductions.min(x, axes=[2], keep_dims=True)
    safe = delta + fn.cast(delta <= 0.0, dtype=types.FLOAT)  # grey pixels: any hue gives back grey
    is_max = fn.cast(x == maxc, dtype=types.FLOAT)
    first_max = is_max * fn.cast(fn.coord_transform(is_max, M=_EARLIER_CHANNELS) == 0.0, dtype=types.FLOAT)
    within = fn.coord_transform(first_max * fn.coord_transform(x, M=_NEXT_MINUS_PREVIOUS), M=[1.0, 1.0, 1.0])
    h6 = fn.coord_transform(first_max, M=[0.0, 2.0, 4.0]) + within / safe + 6.0 * shift
    k = fn.coord_transform(h6, M=[1.0, 1.0, 1.0], T=_HUE_SECTOR_OFFSETS)
    k = k - 6.0 * dmath.floor(k * (1.0 / 6.0))
    return maxc - delta * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)


def _color_jitter(x, p, view: ViewSpec):
    for k in range(4):
        col = POSITION + 5 * k
        g = _gray(x)
        target = p[col + TO_MEAN] * fn.reductions.mean(g) + p[col + TO_GRAY] * g
        x = dmath.clamp(p[col + F] * x + p[col + ONE_MINUS_F] * target, 0.0, 1.0)
        if view.hue > 0:
            if p[col + HUE_HERE] > 0.5:
                x = _hue(x, p[SHIFT])
    return x


def _view(image, p, view: ViewSpec, size: int, mean, std):
    x = fn.resize(image, roi_start=p[0:2], roi_end=p[2:4], roi_relative=False, size=[size, size],
                  interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
    x = x * (1.0 / 255.0)
    def to_gray(y):
        return y * (1.0 - p[GRAY]) + _gray(y) * p[GRAY] if view.gray_p > 0 else y

    if view.gray_first:
        x = to_gray(x)
    if view.jitters:
        x = _color_jitter(x, p, view)
    if not view.gray_first:
        x = to_gray(x)
    if view.blur_p > 0:
        k = view.blur_kernel_size(size)
        if view.blur_p >= 1:
            x = fn.gaussian_blur(x, sigma=p[SIGMA], window_size=k)
        elif p[BLUR] > 0.5:
            x = fn.gaussian_blur(x, sigma=p[SIGMA], window_size=k)
    if view.solarize_p > 0:
        m = fn.cast(x >= view.solarize_threshold, dtype=types.FLOAT) * p[SOLARIZE]
        x = x + m * (1.0 - 2.0 * x)
    return fn.crop_mirror_normalize(x, mean=list(mean), std=list(std), output_layout="CHW", dtype=types.FLOAT)


def build_pipeline(spec: AugmentSpec, source, batch_size: int, device: str, device_id: int | None,
                   num_threads: int, prefetch_queue_depth: int, hw_decoder_load: float, seed: int):
    """A built DALI pipeline over `source` (a callable giving encoded, meta, *params; StopIteration ends an
    epoch). Outputs: one CHW float view per spec view, then meta (label, index) per sample.

    device "cpu": every operator on the CPU (device_id None); "gpu": nvJPEG `mixed` decode and GPU ops.
    """
    on_gpu = device == "gpu"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch_queue_depth, enable_conditionals=True)
    def graph():
        encoded, meta, *params = fn.external_source(source=source, num_outputs=2 + len(spec.views), batch=True,
                                                    dtype=[types.UINT8, types.INT64] + [types.FLOAT] * len(spec.views))
        if on_gpu:
            # hw_decoder_load: share of JPEGs sent to the A100/H100 hardware decoder engine; the rest use
            # CUDA nvJPEG, so the SMs and the engine both stay busy. The paddings preallocate nvJPEG buffers.
            image = fn.decoders.image(encoded, device="mixed", output_type=types.RGB, adjust_orientation=False,
                                      hw_decoder_load=hw_decoder_load, device_memory_padding=DEVICE_MEMORY_PADDING,
                                      host_memory_padding=HOST_MEMORY_PADDING)
        else:
            # EXIF orientation is ignored, as PIL's load in the torch backend does, so the image sizes read
            # from headers (used to draw the crop boxes) are the decoded sizes.
            image = fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)
        views = [_view(image, p, v, spec.size, spec.mean, spec.std) for p, v in zip(params, spec.views)]
        return (*views, meta)

    pipe = graph()
    pipe.build()
    return pipe
