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
2. colour jitter: conditionals (`enable_conditionals=True`). Composing the four ops as one colour matrix
   would not be exact: each op clamps to [0, 1], contrast blends with the mean of the *current* image and
   hue is a piecewise rotation in HSV, so each of the 4 positions is an if/elif on that sample's op id.
   Brightness, contrast and saturation are `ops`' blend clamp(f x + (1 - f) t); hue is `ops.adjust_hue`'s
   closed form (max - (max - min) * clamp(min(k, 4 - k), 0, 1)) in DALI arithmetic.
3. grayscale and 5. solarise: arithmetic masks (x (1 - m) + y m with m in {0, 1} is exact and cheaper
   than splitting the batch); 4. blur: a conditional, so unblurred samples skip the convolution
   (`fn.gaussian_blur` samples torchvision's kernel and mirrors at borders as its reflect padding).
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

# One float32 row per sample and view.
ROI = slice(0, 4)  # y0, x0, y1, x1: the box as DALI's roi_start / roi_end (x exchanged when flipped)
JITTER, FACTORS, ORDER, GRAY, BLUR, SIGMA, SOLARIZE = 4, 5, 9, 13, 14, 15, 16
PARAM_COLUMNS = 17
LUMA = ops._LUMA  # one definition of grey for both backends (ITU-R 601-2)

# nvJPEG buffers sized for an ImageNet-scale JPEG up front (DALI's own ResNet-50 example uses these
# figures): allocated once per decoder thread instead of re-grown while the first epoch meets ever larger
# images. Mixed decoder only; the CPU decoder allocates per image.
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512


def pack_view_params(boxes: np.ndarray, p: ops.ViewParams) -> np.ndarray:
    """(N, PARAM_COLUMNS) float32 rows from crop boxes (N, 4) (y0, x0, h, w) and one view's parameters."""
    y0, x0, h, w = (np.asarray(boxes, dtype=np.float64)[:, i] for i in range(4))
    flip = p.flip.cpu().numpy()
    out = np.empty((len(y0), PARAM_COLUMNS), dtype=np.float32)
    out[:, ROI] = np.stack([y0, np.where(flip, x0 + w, x0), y0 + h, np.where(flip, x0, x0 + w)], axis=1)
    out[:, JITTER] = p.jitter.cpu().numpy()
    out[:, FACTORS:FACTORS + 4] = p.factors.cpu().numpy()
    out[:, ORDER:ORDER + 4] = p.order.cpu().numpy()
    out[:, GRAY] = p.gray.cpu().numpy()
    out[:, BLUR] = p.blur.cpu().numpy()
    out[:, SIGMA] = p.sigma.cpu().numpy()
    out[:, SOLARIZE] = p.solarize.cpu().numpy()
    return out


def _gray(x):
    """H x W x 1 luma of H x W x 3 RGB."""
    return x[:, :, 0:1] * LUMA[0] + x[:, :, 1:2] * LUMA[1] + x[:, :, 2:3] * LUMA[2]


def _blend(x, target, factor):
    return dmath.clamp(factor * x + (1.0 - factor) * target, 0.0, 1.0)


def _hue(x, shift):
    """torchvision's HSV hue rotation by `shift` turns, as `ops.adjust_hue` (same ties: red, then green)."""
    r, g, b = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]
    maxc = dmath.max(r, dmath.max(g, b))
    delta = maxc - dmath.min(r, dmath.min(g, b))
    safe = delta + fn.cast(delta <= 0.0, dtype=types.FLOAT)  # grey pixels: any hue gives back grey
    is_r = fn.cast(r == maxc, dtype=types.FLOAT)
    is_g = fn.cast(g == maxc, dtype=types.FLOAT) * (1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    h = (is_r * (g - b) + is_g * (2.0 * safe + b - r) + is_b * (4.0 * safe + r - g)) / safe + 6.0 * shift
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = n + h
        k = k - 6.0 * dmath.floor(k / 6.0)
        channels.append(maxc - delta * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0))
    return fn.cat(*channels, axis=2)


def _jitter_op(x, p, op_id, view: ViewSpec):
    if op_id == ops.BRIGHTNESS:
        return _blend(x, 0.0, p[FACTORS + ops.BRIGHTNESS])
    if op_id == ops.CONTRAST:
        return _blend(x, fn.reductions.mean(_gray(x)), p[FACTORS + ops.CONTRAST])
    if op_id == ops.SATURATION:
        return _blend(x, _gray(x), p[FACTORS + ops.SATURATION])
    return _hue(x, p[FACTORS + ops.HUE]) if view.hue > 0 else x


def _color_jitter(x, p, view: ViewSpec):
    for k in range(4):
        op = p[ORDER + k]
        if op == ops.BRIGHTNESS:
            x = _jitter_op(x, p, ops.BRIGHTNESS, view)
        elif op == ops.CONTRAST:
            x = _jitter_op(x, p, ops.CONTRAST, view)
        elif op == ops.SATURATION:
            x = _jitter_op(x, p, ops.SATURATION, view)
        else:
            x = _jitter_op(x, p, ops.HUE, view)
    return x


def _view(image, p, view: ViewSpec, size: int, mean, std):
    x = fn.resize(image, roi_start=p[0:2], roi_end=p[2:4], roi_relative=False, size=[size, size],
                  interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
    x = x * (1.0 / 255.0)
    if view.jitter_p > 0 and max(view.brightness, view.contrast, view.saturation, view.hue) > 0:
        if view.jitter_p >= 1:
            x = _color_jitter(x, p, view)
        elif p[JITTER] > 0.5:
            x = _color_jitter(x, p, view)
    if view.gray_p > 0:
        m = p[GRAY]
        x = x * (1.0 - m) + _gray(x) * m
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
