"""The FFCV backend (pipelines/ffcv.py): decode-once regions, crop statistics, orders, sharding, resume.

Oracles: source pixels decoded by PIL (raw .beton: exact; JPEG .beton: JPEG tolerance), torchvision's
RandomResizedCrop.get_params for the crop distribution, base.shard_batches for the shared order, and
binomial tolerances for per-view application rates. One loader per file and order is compiled once per
module (numba's first compile takes ~10-20 s here) and reused through set_epoch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from test_convert_ffcv import make_image_folder, smooth_image, source_samples
from test_ops import box_features, ks_critical, ks_statistic

ffcv = pytest.importorskip("ffcv")
pytestmark = pytest.mark.ffcv

N_IMAGES = 24  # 4 classes x 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from fastssl.data.beton import convert_image_folder

    root = tmp_path_factory.mktemp("ffcv")
    folder = make_image_folder(root / "if", classes=4, per_class=6, corrupt=False)
    raw = convert_image_folder(folder, root / "raw.beton", write_mode="raw", page_mib=2).path
    jpg = convert_image_folder(folder, root / "jpg.beton", jpeg_quality=95, page_mib=2).path
    return {"folder": folder, "raw": raw, "jpg": jpg, "source": source_samples(folder)}


def make_loader(path, *, spec=None, process_index=0, num_processes=1, batch_size=8, order="shared",
                drop_last=True, workers=1, decode="once", os_cache=True, device="cpu"):
    from pipelines.augment import preset
    from pipelines.base import LoaderContext
    from pipelines.ffcv import FFCVViewLoader

    ctx = LoaderContext(device=torch.device(device), process_index=process_index, num_processes=num_processes,
                        seed=7)
    return FFCVViewLoader(str(path), spec or preset("simclr", 16), ctx, batch_size=batch_size, workers=workers,
                          order=order, drop_last=drop_last, decode=decode, os_cache=os_cache)


@pytest.fixture(scope="module")
def raw_loader(data):
    return make_loader(data["raw"])


def record_make_view(monkeypatch):
    """Wrap pipelines.ffcv.make_view to keep what each call received."""
    import pipelines.ffcv as backend

    calls, real = [], backend.make_view

    def spy(images, boxes, *args, **kwargs):
        calls.append((images, boxes.clone()))
        return real(images, boxes, *args, **kwargs)

    monkeypatch.setattr(backend, "make_view", spy)
    return calls


def check_regions(loader, batches, calls, source, max_abs_mean):
    """Both views cut from ONE decoded region per batch; region pixels equal the source's box; edge padding."""
    assert len(calls) == 2 * len(batches)
    for b, batch in enumerate(batches):
        (images, boxes0), (images1, boxes1) = calls[2 * b], calls[2 * b + 1]
        assert images1 is images  # decoded once, shared by both views
        idx = batch.indices.numpy()
        assert batch.labels.tolist() == [source[i][1] for i in idx]
        for row, i in enumerate(idx):
            y0, x0, h, w = loader.regions[i].tolist()
            src = source[i][0]
            for vb in (loader.view_boxes[i, 0], loader.view_boxes[i, 1]):  # views inside the region
                assert y0 <= vb[0] and x0 <= vb[1] and vb[0] + vb[2] <= y0 + h and vb[1] + vb[3] <= x0 + w
            for v, rel in enumerate((boxes0[row], boxes1[row])):  # relative boxes = absolute - region origin
                assert torch.equal(rel, torch.from_numpy(loader.view_boxes[i, v] - [y0, x0, 0, 0]))
            got = images[row].permute(1, 2, 0).numpy()
            err = np.abs(got[:h, :w].astype(float) - src[y0:y0 + h, x0:x0 + w]).mean()
            assert err <= max_abs_mean, (i, err)
            assert (got[h:, :w] == got[h - 1:h, :w]).all() and (got[:, w:] == got[:, w - 1:w]).all()


def test_raw_regions_are_exact_and_decoded_once(data, raw_loader, monkeypatch):
    calls = record_make_view(monkeypatch)
    raw_loader.set_epoch(0)
    batches = list(raw_loader)
    assert len(batches) == len(raw_loader) == N_IMAGES // 8
    assert sorted(np.concatenate([b.indices.numpy() for b in batches]).tolist()) == list(range(N_IMAGES))
    for b in batches:
        assert [v.shape for v in b.views] == [(8, 3, 16, 16)] * 2 and all(v.dtype == torch.float32 for v in b.views)
    check_regions(raw_loader, batches, calls, data["source"], max_abs_mean=0.0)


def test_jpeg_regions_within_jpeg_tolerance(data, monkeypatch):
    loader = make_loader(data["jpg"], workers=2)  # also the parallel (prange) decode path
    calls = record_make_view(monkeypatch)
    batches = list(loader)
    # Smooth images at JPEG quality 95: mean absolute error ~1 grey level (see test_convert_ffcv).
    check_regions(loader, batches, calls, data["source"], max_abs_mean=2.0)


def test_process_cache_with_quasi_random_order_reads_exact_regions(data, monkeypatch):
    """ffcv's own page cache (os_cache=False), the setting quasi-random order is meant for."""
    loader = make_loader(data["raw"], order="quasi_random", os_cache=False)
    calls = record_make_view(monkeypatch)
    batches = list(loader)
    assert sorted(np.concatenate([b.indices.numpy() for b in batches]).tolist()) == list(range(N_IMAGES))
    check_regions(loader, batches, calls, data["source"], max_abs_mean=0.0)


def test_per_view_decode_cuts_each_view_box_exactly(data, monkeypatch):
    loader = make_loader(data["raw"], decode="per_view")
    calls = record_make_view(monkeypatch)
    batches = list(loader)
    assert len(calls) == 2 * len(batches)
    for b, batch in enumerate(batches):
        idx = batch.indices.numpy()
        assert calls[2 * b][0] is not calls[2 * b + 1][0]  # one decode per view
        for v in (0, 1):
            images, rel = calls[2 * b + v]
            assert (rel[:, :2] == 0).all()  # each view's region is its own box
            for row, i in enumerate(idx):
                y0, x0, h, w = (int(t) for t in loader.view_boxes[i, v])
                got = images[row].permute(1, 2, 0).numpy()[:h, :w]
                assert np.array_equal(got, data["source"][i][0][y0:y0 + h, x0:x0 + w])


def test_data_compile_reaches_the_augmentation(data, monkeypatch):
    # data.compile: auto is eager on a CPU, true compiles (tests/test_compile.py checks the compiled values).
    import pipelines.ffcv as backend
    from fastssl.config import DataConfig
    from pipelines.augment import preset
    from pipelines.base import LoaderContext, build_loader

    flags = []
    monkeypatch.setattr(backend, "make_view", lambda *args: flags.append(args[-1]) or torch.zeros(0))
    for choice in ("auto", "true", "false"):
        loader = build_loader(DataConfig(backend="ffcv", path=str(data["raw"]), batch_size=8, workers=1,
                                         compile=choice), preset("simclr", 16), LoaderContext(torch.device("cpu")))
        next(iter(loader))
    assert flags == [False, False, True, True, False, False]


def test_crop_boxes_follow_torchvision_per_view(raw_loader):
    """Each view's boxes have torchvision RandomResizedCrop's distribution for its own spec: two-sample KS on
    area, log-aspect and both centre coordinates (as test_ops does for ops.sample_crop_boxes itself)."""
    from torchvision.transforms import RandomResizedCrop

    from pipelines.augment import AugmentSpec, ViewSpec

    spec = AugmentSpec(16, (ViewSpec(crop_scale=(0.08, 1.0)), ViewSpec(crop_scale=(0.5, 1.0), crop_ratio=(0.5, 2.0))))
    loader = make_loader(raw_loader.path, spec=spec)  # no iteration: draw_boxes is plain numpy, seeded (7, epoch)
    epochs = 150
    ours, hws = {0: [], 1: []}, []
    for e in range(epochs):
        idx = np.concatenate(loader.epoch_batches(e))
        loader.draw_boxes(e, idx)
        hws.append(np.stack([loader.heights[idx], loader.widths[idx]], 1))
        for v in (0, 1):
            b = loader.view_boxes[idx, v]
            assert (b[:, :2] >= 0).all() and (b[:, 0] + b[:, 2] <= loader.heights[idx]).all()
            assert (b[:, 1] + b[:, 3] <= loader.widths[idx]).all()
            ours[v].append(b)
    hw = np.concatenate(hws).astype(np.float64)
    sizes = list(zip(loader.heights.tolist(), loader.widths.tolist()))
    ref_hw = np.array(sizes * epochs, dtype=np.float64)  # every epoch covers each image once, as ours
    assert sorted(map(tuple, hw.tolist())) == sorted(map(tuple, ref_hw.tolist()))
    torch.manual_seed(0)
    for v, view in enumerate(spec.views):
        ref = np.array([RandomResizedCrop.get_params(torch.empty(1, h, w), list(view.crop_scale), list(view.crop_ratio))
                        for h, w in sizes * epochs], dtype=np.float64)
        fo = box_features(np.concatenate(ours[v]).astype(np.float64), hw)
        fr = box_features(ref, ref_hw)
        n, m = len(hw), len(ref_hw)  # 3600 each
        for key in fo:  # area, log_aspect, centre_y, centre_x
            d = ks_statistic(fo[key], fr[key])
            assert d < ks_critical(n, m), (v, key, d, ks_critical(n, m))


def test_grayscale_rate_matches_the_spec(raw_loader):
    """SimCLR's gray_p = 0.2 per view: a gray view has equal channels once the normalisation is undone."""
    spec = raw_loader.spec
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    gray = n = 0
    for e in range(40):
        raw_loader.set_epoch(100 + e)
        for batch in raw_loader:
            for x in batch.views:
                x = x * std + mean
                gray += int(((x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 1e-4).sum())
                n += x.shape[0]
    # n = 1920 Bernoulli(0.2) draws: sd = sqrt(0.2 * 0.8 / n) ~ 0.009; 4.5 sd.
    assert abs(gray / n - spec.views[0].gray_p) < 4.5 * math.sqrt(0.16 / n), gray / n


def test_flip_gray_and_solarize_rates_on_the_views(tmp_path_factory):
    """Each view of the loader's output is exactly one of the 8 flip x gray x solarise outcomes of its source
    image (square images, whole-image crops at their own size: no resampling), computed here in float64 from
    the PNG's pixels with torchvision's luma weights; the rates of each outcome match the spec (binomial)."""
    import dataclasses

    from fastssl.data.beton import convert_image_folder
    from pipelines.augment import AugmentSpec, ViewSpec

    size = 20
    root = tmp_path_factory.mktemp("ffcv_rates")
    rng = np.random.default_rng(5)
    for i in range(16):
        (root / "if" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_image(rng, size, size)).save(root / "if" / f"c{i % 2}" / f"{i:02d}.png")
    beton = convert_image_folder(root / "if", root / "sq.beton", write_mode="raw", page_mib=2).path
    source = np.stack([img for img, _ in source_samples(root / "if")]).transpose(0, 3, 1, 2) / 255.0
    plain = ViewSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, blur_p=0.0)
    view = dataclasses.replace(plain, flip_p=0.5, gray_p=0.3, solarize_p=0.4)
    spec = AugmentSpec(size, (view, view))
    loader = make_loader(beton, spec=spec)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    luma = np.array([0.299, 0.587, 0.114]).reshape(3, 1, 1)
    outcomes = []
    for epoch in range(12):
        loader.set_epoch(epoch)
        for batch in loader:
            for v in batch.views:
                x = (v.double() * std + mean).numpy()
                for n, i in enumerate(batch.indices.tolist()):
                    errors = {}
                    for f in (False, True):
                        for g in (False, True):
                            b = source[i][:, :, ::-1] if f else source[i]
                            b = np.repeat((b * luma).sum(0, keepdims=True), 3, 0) if g else b
                            for s in (False, True):
                                errors[f, g, s] = np.abs(x[n] - (np.where(b >= 0.5, 1 - b, b) if s else b)).max()
                    ranked = sorted(errors, key=errors.get)
                    assert errors[ranked[0]] < 1e-4 < errors[ranked[1]], errors  # exactly one outcome fits
                    outcomes.append(ranked[0])
    got = np.array(outcomes, dtype=np.float64)
    n = len(got)  # 12 epochs x 16 images x 2 views = 384
    for k, p in enumerate((view.flip_p, view.gray_p, view.solarize_p)):
        assert abs(got[:, k].mean() - p) < 4.5 * math.sqrt(p * (1 - p) / n), (k, got[:, k].mean())


def test_resume_mid_epoch_gives_the_same_batches_and_views(raw_loader):
    raw_loader.set_epoch(5)
    full = list(raw_loader)
    raw_loader.set_epoch(5, start_batch=1)
    resumed = list(raw_loader)
    assert len(resumed) == len(full) - 1
    for a, b in zip(full[1:], resumed):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    raw_loader.set_epoch(6)
    assert not torch.equal(next(iter(raw_loader)).views[0], full[0].views[0])


@pytest.mark.parametrize("order", ["shared", "random", "quasi_random"])
def test_an_epochs_batches_depend_on_the_epoch_alone(data, order):
    # A resumed run builds a fresh loader and asks for epoch E first; the uninterrupted run asked for 0..E-1
    # before. Both must see the same batches, or set_epoch(E, start_batch=k) skips k batches of another
    # permutation (ffcv's QuasiRandom shuffles its page table in place on every draw).
    run = make_loader(data["raw"], order=order)
    history = [np.concatenate(run.epoch_batches(e)) for e in range(3)]
    resumed = make_loader(data["raw"], order=order)
    assert np.array_equal(np.concatenate(resumed.epoch_batches(2)), history[2])
    assert np.array_equal(np.concatenate(run.epoch_batches(1)), history[1])  # asked again, same answer
    assert not np.array_equal(history[1], history[2])


def test_resume_point_outside_the_epoch_is_a_user_error(raw_loader):
    # Oracle: the torch and DALI backends' contract, start_batch in 0..len(loader) (len: the epoch has ended).
    from fastssl.errors import UserError

    steps = len(raw_loader)
    for bad in (-1, steps + 1):
        with pytest.raises(UserError, match=rf"start_batch={bad} is outside this epoch's {steps} batches"):
            raw_loader.set_epoch(2, start_batch=bad)
    raw_loader.set_epoch(2, start_batch=steps)
    assert list(raw_loader) == []


@pytest.mark.parametrize("order", ["shared", "random", "quasi_random", "sequential"])
def test_two_ranks_are_disjoint_and_complete(data, order):
    from pipelines.base import shard_batches

    # 24 images, global batch 10, no drop_last: two full batches and a last one of 4 split 2 / 2.
    ranks = [make_loader(data["raw"], process_index=r, num_processes=2, batch_size=10, order=order,
                         drop_last=False) for r in (0, 1)]
    for epoch in (0, 1):
        per_rank = [ld.epoch_batches(epoch) for ld in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == 3
        assert [len(b) for b in per_rank[0]] == [len(b) for b in per_rank[1]] == [5, 5, 2]
        seen = np.concatenate([np.concatenate(b) for b in per_rank])
        assert sorted(seen.tolist()) == list(range(N_IMAGES))
        if order == "shared":  # the same batches as every other backend
            for r in (0, 1):
                ref = shard_batches(N_IMAGES, 10, 7, epoch, r, 2, drop_last=False)
                assert all(np.array_equal(a, b) for a, b in zip(per_rank[r], ref))
    if order != "sequential":
        assert not np.array_equal(np.concatenate(ranks[0].epoch_batches(0)), np.concatenate(ranks[0].epoch_batches(1)))


def test_rank_one_reads_its_own_shard(data):
    loader = make_loader(data["raw"], process_index=1, num_processes=2, batch_size=10, drop_last=False)
    got = [b.indices.numpy() for b in loader]  # the loader also checks ffcv followed the plan
    assert [len(g) for g in got] == [5, 5, 2]
    assert all(np.array_equal(a, b) for a, b in zip(got, loader.epoch_batches(0)))


def test_bad_settings_are_user_errors(data, tmp_path):
    from fastssl.config import DataConfig
    from fastssl.errors import UserError
    from pipelines.augment import preset
    from pipelines.base import LoaderContext, build_loader

    spec, raw = preset("simclr", 16), str(data["raw"])

    def ctx(p=2):
        return LoaderContext(device=torch.device("cpu"), num_processes=p)

    cases = [
        (DataConfig(backend="ffcv", path=str(tmp_path / "no.beton"), batch_size=8), ctx(), "no.beton does not exist"),
        (DataConfig(backend="ffcv", path=raw, batch_size=7), ctx(), "expected a multiple of the 2 processes"),
        (DataConfig(backend="ffcv", path=raw, batch_size=32), ctx(), "fewer than one global batch"),
        (DataConfig(backend="ffcv", path=raw, batch_size=10, drop_last=False), ctx(5), "last global batch of 4 images"),
        (DataConfig(backend="ffcv", path=raw, batch_size=8, ffcv_order="shuffled"), ctx(), "ffcv_order"),
        (DataConfig(backend="ffcv", path=raw, batch_size=8, ffcv_decode="twice"), ctx(), "ffcv_decode"),
        (DataConfig(backend="ffcv", path=raw, batch_size=8, device="tpu"), ctx(), "data.device='tpu'"),
        (DataConfig(backend="ffcv", path=raw, batch_size=8, compile="yes"), ctx(), "unknown data.compile 'yes'"),
    ]
    for cfg, context, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            build_loader(cfg, spec, context)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device copy of ffcv's pinned slots needs a CUDA GPU")
def test_gpu_views_equal_cpu_views_over_reused_slots(data):
    # With every random op off, a view is a function of its host-drawn crop box: the GPU loader (regions copied
    # asynchronously from ffcv's pinned ring buffer, the slot released only once the copy ran) must give the
    # CPU loader's views. Batches of 2: 12 per epoch go round ffcv's batches_ahead + 2 = 4 slots three times.
    from dataclasses import replace

    from pipelines.augment import preset

    base = preset("simclr", 16)
    spec = replace(base, views=tuple(replace(v, flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
                                     for v in base.views))
    cpu = make_loader(data["raw"], spec=spec, batch_size=2)
    gpu = make_loader(data["raw"], spec=spec, batch_size=2, device="cuda")
    for epoch in range(2):
        cpu.set_epoch(epoch)
        gpu.set_epoch(epoch)
        for bc, bg in zip(cpu, gpu, strict=True):
            assert all(v.is_cuda for v in bg.views) and torch.equal(bg.indices.cpu(), bc.indices)
            for vc, vg in zip(bc.views, bg.views):
                assert (vg.cpu() - vc).abs().max() < 1e-3
