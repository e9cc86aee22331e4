"""The augmentation presets (pipelines/augment.py) against the papers and reference code they cite.

Oracles: the values printed in SimCLR's appendix A and the reference scripts' torchvision pipelines (moco
main_moco.py with and without --aug-plus, moco-v3 main_moco.py), SimCLR's data_util.py kernel arithmetic,
PIL's ImageOps.solarize threshold. Every field of every view is compared, so a value a preset inherits from
ViewSpec's defaults is checked as strictly as one it sets. A field that has no effect (blur settings when
blur_p is 0) is left out of the comparison; the solarisation threshold has its own test.
"""

from __future__ import annotations

import dataclasses

import pytest

from conftest import ROOT
from fastssl.config import DataConfig, load_config
from fastssl.errors import UserError
from pipelines.augment import PRESETS, AugmentSpec, ViewSpec, preset, spec_for

TORCHVISION_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default, used by every reference script

# SimCLR (Chen et al. 2020) appendix A: random resized crop scale (0.08, 1) and aspect (3/4, 4/3), flip 0.5;
# colour distortion at strength s = 1: brightness, contrast, saturation 0.8 s and hue 0.2 s applied with p 0.8,
# grayscale p 0.2; Gaussian blur p 0.5, sigma ~ U[0.1, 2.0], kernel 10% of the image side. No solarisation.
SIMCLR = dict(crop_scale=(0.08, 1.0), crop_ratio=TORCHVISION_RATIO, flip_p=0.5, jitter_p=0.8, brightness=0.8,
              contrast=0.8, saturation=0.8, hue=0.2, gray_p=0.2, gray_first=False, blur_p=0.5,
              blur_sigma=(0.1, 2.0), blur_kernel_frac=0.1, solarize_p=0.0)

# MoCo v1 (He et al. 2020 sec. 3.3; facebookresearch/moco main_moco.py without --aug-plus):
#   RandomResizedCrop(224, scale=(0.2, 1.)), RandomGrayscale(p=0.2), ColorJitter(0.4, 0.4, 0.4, 0.4),
#   RandomHorizontalFlip() -- grayscale *before* an always-applied jitter, hue 0.4, no blur.
MOCOV1 = dict(crop_scale=(0.2, 1.0), crop_ratio=TORCHVISION_RATIO, flip_p=0.5, jitter_p=1.0, brightness=0.4,
              contrast=0.4, saturation=0.4, hue=0.4, gray_p=0.2, gray_first=True, blur_p=0.0, solarize_p=0.0)

# MoCo v2 (Chen et al. 2020, "Improved Baselines", sec. 2; main_moco.py --aug-plus):
#   RandomResizedCrop(224, scale=(0.2, 1.)), RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
#   RandomGrayscale(p=0.2), RandomApply([GaussianBlur([.1, 2.])], p=0.5), RandomHorizontalFlip().
# The reference blurs with PIL (no kernel size); the 10% kernel is SimCLR's, see the truncation test below.
MOCOV2 = dict(crop_scale=(0.2, 1.0), crop_ratio=TORCHVISION_RATIO, flip_p=0.5, jitter_p=0.8, brightness=0.4,
              contrast=0.4, saturation=0.4, hue=0.1, gray_p=0.2, gray_first=False, blur_p=0.5,
              blur_sigma=(0.1, 2.0), blur_kernel_frac=0.1, solarize_p=0.0)

# MoCo v3 (Chen, Xie, He 2021, appendix; facebookresearch/moco-v3 main_moco.py), BYOL's asymmetric views:
#   RandomResizedCrop(224, scale=(args.crop_min, 1.)) with --crop-min default 0.08,
#   RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), RandomGrayscale(p=0.2),
#   RandomApply([GaussianBlur([.1, 2.])], p=1.0 | 0.1), RandomApply([Solarize()], p=0.0 | 0.2) (the first view
#   has no Solarize at all), RandomHorizontalFlip(). Solarize is ImageOps.solarize: threshold 128 of 255.
# The preset keeps the default 0.08 (the ViT setting); CONFIG.md's ResNet-50 runs pass --crop-min=.2, which
# the ResNet recipes set through data.crop_scale (checked in test_imagenet_recipes_use_the_reference_runs_crop_scale).
_MOCOV3 = dict(crop_scale=(0.08, 1.0), crop_ratio=TORCHVISION_RATIO, flip_p=0.5, jitter_p=0.8, brightness=0.4,
               contrast=0.4, saturation=0.2, hue=0.1, gray_p=0.2, gray_first=False, blur_sigma=(0.1, 2.0),
               blur_kernel_frac=0.1)
MOCOV3 = (dict(_MOCOV3, blur_p=1.0, solarize_p=0.0), dict(_MOCOV3, blur_p=0.1, solarize_p=0.2))

PAPER = {"simclr": (SIMCLR, SIMCLR), "mocov1": (MOCOV1, MOCOV1), "mocov2": (MOCOV2, MOCOV2), "mocov3": MOCOV3}


def _effective(view: ViewSpec) -> dict:
    d = dataclasses.asdict(view)
    if view.blur_p == 0:
        del d["blur_sigma"], d["blur_kernel_frac"]
    del d["solarize_threshold"]  # unused without solarisation; MoCo v3's is checked against PIL's below
    return d


def test_every_preset_has_a_paper_oracle():
    assert set(PRESETS) == set(PAPER)  # a new preset needs its paper's values here


@pytest.mark.parametrize("name", sorted(PAPER))
@pytest.mark.parametrize("size", [32, 224])
def test_preset_views_are_the_papers(name, size):
    spec = preset(name, size)
    assert isinstance(spec, AugmentSpec) and spec.size == size
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)  # torchvision's ImageNet
    assert len(spec.views) == 2
    for v, expect in enumerate(PAPER[name]):
        got = _effective(spec.views[v])
        assert got.keys() == expect.keys(), (name, v, sorted(got.keys() ^ expect.keys()))
        for key in expect:
            assert got[key] == pytest.approx(expect[key], abs=1e-12), (name, v, key, got[key], expect[key])


def test_mocov3_solarize_threshold_is_pils_128():
    # ImageOps.solarize(img, threshold=128) inverts pixels >= 128; on k / 255 values the spec's threshold must
    # pick exactly the same pixels.
    t = preset("mocov3", 224).views[1].solarize_threshold
    assert [k / 255 >= t for k in range(256)] == [k >= 128 for k in range(256)]


def test_blur_kernel_is_simclr_data_util_arithmetic():
    # SimCLR data_util.py: kernel_size = height // 10; radius = kernel_size // 2; side = 2 * radius + 1. The spec
    # documents a floor of 3 taps (SimCLR's own would be a 1-tap no-op below 20 px).
    assert preset("simclr", 224).views[0].blur_kernel_size(224) == 23
    for size in range(8, 1025):
        expect = max(3, 2 * ((size // 10) // 2) + 1)
        for name in ("simclr", "mocov2", "mocov3"):
            for view in preset(name, size).views:
                assert view.blur_kernel_size(size) == expect, (name, size)


@pytest.mark.parametrize("name", ["mocov2", "mocov3"])
def test_moco_blur_kernel_does_not_truncate_pils_blur_at_224(name):
    # The moco scripts blur with PIL's untruncated Gaussian; the 10% kernel approximates it only if its radius
    # covers 3 sigma at the largest sigma (Gaussian mass beyond 3 sigma: 0.27%).
    for view in preset(name, 224).views:
        if view.blur_p:
            assert view.blur_kernel_size(224) // 2 >= 3 * view.blur_sigma[1]


@pytest.mark.parametrize("recipe, crop", [
    ("simclr_resnet50_in1k", (0.08, 1.0)),  # SimCLR appendix A
    ("mocov1_resnet50_in1k", (0.2, 1.0)),  # moco main_moco.py
    ("mocov2_resnet50_in1k", (0.2, 1.0)),  # moco main_moco.py --aug-plus
    ("mocov3_resnet50_in1k", (0.2, 1.0)),  # moco-v3 CONFIG.md, every ResNet-50 run: --crop-min=.2
    ("mocov3_vit_small_in1k", (0.08, 1.0)),  # moco-v3 CONFIG.md ViT runs: the default --crop-min=.08
    ("mocov3_vit_base_in1k", (0.08, 1.0)),
])
def test_imagenet_recipes_use_the_reference_runs_crop_scale(recipe, crop):
    """The ImageNet recipes' views: their preset with only the crop scale the reference run used."""
    cfg = load_config(ROOT / "recipes" / f"{recipe}.yaml")
    spec = spec_for(cfg.data)
    base = preset(cfg.data.augment, cfg.data.image_size)
    assert spec.size == 224
    for got, ref in zip(spec.views, base.views, strict=True):
        assert got.crop_scale == pytest.approx(crop)
        assert got == dataclasses.replace(ref, crop_scale=got.crop_scale)


def test_spec_for_crop_scale_overrides_every_view_and_nothing_else():
    base = preset("mocov3", 64)
    assert spec_for(DataConfig(augment="mocov3", image_size=64)) == base  # no override: the preset itself
    for scale in [(0.3, 0.9), (1.0, 1.0), (0.01, 0.01)]:  # bounds inclusive: 0 < min <= max <= 1
        spec = spec_for(DataConfig(augment="mocov3", image_size=64, crop_scale=scale))
        assert spec.size == base.size and spec.mean == base.mean and spec.std == base.std
        assert spec.views == tuple(dataclasses.replace(v, crop_scale=scale) for v in base.views)


@pytest.mark.parametrize("scale", [(0.0, 1.0), (-0.1, 0.5), (0.6, 0.5), (0.2, 1.01)])
def test_spec_for_rejects_a_bad_crop_scale_naming_the_value(scale):
    with pytest.raises(UserError, match=r"data\.crop_scale must satisfy 0 < min <= max <= 1, got \[") as e:
        spec_for(DataConfig(augment="simclr", image_size=64, crop_scale=scale))
    assert str(list(scale)) in str(e.value)


def test_preset_size_floor_and_unknown_name_are_user_errors():
    # augment.preset: images under 8 px are rejected (the message names the value), 8 px itself is accepted.
    for size in (0, 1, 7):
        with pytest.raises(UserError, match=rf"data\.image_size must be at least 8 pixels, got {size}$"):
            preset("simclr", size)
    assert preset("simclr", 8).size == 8
    with pytest.raises(UserError, match=r"unknown augmentation preset 'byol'; valid presets: simclr, mocov1"):
        preset("byol", 224)
    with pytest.raises(UserError, match="unknown augmentation preset"):
        spec_for(DataConfig(augment="simclr_v2", image_size=224))
