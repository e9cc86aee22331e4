"""The augmentations, described once. Every backend (torch on-device, DALI, FFCV) compiles this spec.

Semantics (what every backend must reproduce; they are torchvision's, applied per sample, per view):
1. Random resized crop, sampled on the *original* image as torchvision's RandomResizedCrop: up to 10
   tries of area ~ U(scale) * H * W and log-aspect ~ U(log ratio); the first box that fits wins; else a
   centre crop with the aspect clamped to `ratio`. The box is resized (bilinear) to `size` x `size`.
2. Horizontal flip with probability `flip_p`.
3. With probability `jitter_p`: brightness, contrast, saturation and hue jitter applied in a random
   order drawn per sample; factors ~ U[max(0, 1 - s), 1 + s] for the first three, hue shift
   ~ U[-hue, hue] (fraction of a turn). Contrast blends with the mean of the grayscale image.
4. Grayscale (ITU-R 601-2 luma, 3 equal channels) with probability `gray_p`; with `gray_first`, this step
   comes before step 3 (MoCo v1's main_moco.py: RandomGrayscale, then ColorJitter).
5. Gaussian blur with probability `blur_p`, sigma ~ U(blur_sigma) in output pixels, reflect padding, kernel
   side 2 * (floor(blur_kernel_frac * size) // 2) + 1, at least 3: SimCLR's 10% of the image side as its
   data_util.py rounds it (height // 10, then radius = k // 2, side 2 * radius + 1; 23 at 224 px).
6. Solarisation (x -> 1 - x where x >= threshold, on [0, 1] values) with probability `solarize_p`.
7. Normalise with `mean` / `std` (on [0, 1] values), channels RGB, output float NCHW.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fastssl.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    gray_first: bool = False  # grayscale before colour jitter (MoCo v1's order)
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5

    @property
    def jitters(self) -> bool:
        """Step 3 can change a pixel: a jitter probability and at least one non-zero strength."""
        return self.jitter_p > 0 and max(self.brightness, self.contrast, self.saturation, self.hue) > 0

    def blur_kernel_size(self, size: int) -> int:
        return max(3, 2 * (int(self.blur_kernel_frac * size) // 2) + 1)


@dataclass(frozen=True)
class AugmentSpec:
    size: int
    views: tuple[ViewSpec, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _simclr(size: int) -> AugmentSpec:
    # SimCLR (Chen et al. 2020) appendix A: colour distortion strength s=1 -> (0.8s, 0.8s, 0.8s, 0.2s)
    # applied with p 0.8, grayscale p 0.2, blur p 0.5 with sigma in [0.1, 2.0] and a 10% kernel. The ops are
    # torchvision's (contrast against the grey mean, saturation as a blend with grey), not SimCLR's TF ones.
    # SimCLR blurred on ImageNet only (not on CIFAR); this preset blurs at every size, where at 32 px the
    # 3-tap kernel truncates any sigma above ~0.8.
    v = ViewSpec(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
    return AugmentSpec(size, (v, v))


def _mocov1(size: int) -> AugmentSpec:
    # MoCo v1 (He et al. 2020) main_moco.py: crop (0.2, 1), grayscale 0.2 *then* jitter 0.4 always, no blur.
    v = ViewSpec(crop_scale=(0.2, 1.0), jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.4,
                 hue=0.4, gray_first=True, blur_p=0.0)
    return AugmentSpec(size, (v, v))


def _mocov2(size: int) -> AugmentSpec:
    # MoCo v2 (Chen et al. 2020, "Improved Baselines"): SimCLR-style aug with jitter (0.4, 0.4, 0.4, 0.1)
    # at p 0.8, grayscale 0.2, blur p 0.5, crop scale (0.2, 1).
    v = ViewSpec(crop_scale=(0.2, 1.0))
    return AugmentSpec(size, (v, v))


def _mocov3(size: int) -> AugmentSpec:
    # MoCo v3 (Chen, Xie, He 2021) appendix / main_moco.py: BYOL's asymmetric augmentation, jitter
    # (0.4, 0.4, 0.2, 0.1) at p 0.8, blur 1.0 / 0.1, solarise 0 / 0.2.
    v1 = ViewSpec(saturation=0.2, blur_p=1.0, solarize_p=0.0)
    v2 = replace(v1, blur_p=0.1, solarize_p=0.2)
    return AugmentSpec(size, (v1, v2))


PRESETS = {"simclr": _simclr, "mocov1": _mocov1, "mocov2": _mocov2, "mocov3": _mocov3}


def preset(name: str, size: int) -> AugmentSpec:
    if name not in PRESETS:
        raise UserError(f"unknown augmentation preset {name!r}; valid presets: {', '.join(PRESETS)}")
    if size < 8:
        raise UserError(f"data.image_size must be at least 8 pixels, got {size}")
    return PRESETS[name](size)


def spec_for(data_cfg) -> AugmentSpec:
    """The spec a recipe asks for: its preset at `data.image_size`, with `data.crop_scale` if set."""
    spec = preset(data_cfg.augment, data_cfg.image_size)
    if data_cfg.crop_scale is not None:
        lo, hi = data_cfg.crop_scale
        if not 0 < lo <= hi <= 1:
            raise UserError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {list(data_cfg.crop_scale)}")
        spec = replace(spec, views=tuple(replace(v, crop_scale=(lo, hi)) for v in spec.views))
    return spec
