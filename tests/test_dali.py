"""The DALI backend in CPU mode. Oracles: the torch backend (the reference; same batches and parameters, so
full-image views must agree to float precision), torchvision's RandomResizedCrop.get_params for the crop
distribution, PIL's decode of the source files, the spec's probabilities (binomial tolerances), the protocol's
`shard_batches`, and the process's resident memory across epochs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from fastssl.config import DataConfig
from fastssl.data.imagefolder import load_rgb, scan_image_folder
from fastssl.errors import UserError
from pipelines.augment import AugmentSpec, ViewSpec, preset
from pipelines.base import LoaderContext, shard_batches

S = 32
FULL = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))  # on a square S x S image: the whole image, unresized
PLAIN = ViewSpec(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0, **FULL)


def _loader(root, spec, batch=16, rank=0, nproc=1, seed=0, drop_last=True, train_device="cpu", **cfg):
    pytest.importorskip("nvidia.dali")
    from pipelines.dali import build

    data = DataConfig(**{"backend": "dali", "path": str(root), "device": "cpu", "image_size": spec.size,
                         "batch_size": batch, "workers": 1, "drop_last": drop_last, **cfg})
    return build(data, spec, LoaderContext(torch.device(train_device), rank, nproc, seed))


def _pixels(view: torch.Tensor, spec: AugmentSpec) -> np.ndarray:
    """Normalised N x 3 x S x S views back to [0, 1] float64."""
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    return (view.double() * std + mean).numpy()


@pytest.fixture(scope="module")
def colour_root(tmp_path_factory):
    """40 colourful S x S JPEGs in 2 classes: smooth random colour fields plus a little noise."""
    root = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(0)
    for i in range(40):
        coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((S, S), Image.BILINEAR)
        arr = np.clip(np.asarray(coarse, np.int16) + rng.integers(-12, 13, (S, S, 3)), 0, 255).astype(np.uint8)
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(arr).save(root / f"c{i % 2}" / f"{i:03d}.jpg", quality=95)
    return root


RAMP_SIZES = [(40, 64), (64, 40), (48, 48), (56, 36), (36, 60), (64, 64)]  # (H, W): both aspects, fallbacks


@pytest.fixture(scope="module")
def ramp_root(tmp_path_factory):
    """Images whose red channel is the x coordinate and green the y coordinate: a view reveals its box."""
    root = tmp_path_factory.mktemp("ramp")
    for i in range(48):
        h, w = RAMP_SIZES[i % len(RAMP_SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([255 * (xx + 0.5) / w, 255 * (yy + 0.5) / h, np.full((h, w), 128.0)], -1)
        (root / f"c{i % 3}").mkdir(exist_ok=True)
        Image.fromarray(np.rint(arr).astype(np.uint8)).save(root / f"c{i % 3}" / f"{i:03d}.jpg", quality=95)
    return root


def test_import_is_safe_without_dali_and_build_gives_the_install_hint():
    code = ("import sys; sys.modules['nvidia'] = None\n"  # as if DALI were not installed
            "from fastssl.config import DataConfig; from fastssl.errors import UserError\n"
            "from pipelines.base import BACKENDS, LoaderContext; import pipelines.dali\n"
            "from pipelines.augment import preset; import torch\n"
            "try:\n"
            "    BACKENDS.get('dali')(DataConfig(backend='dali', path='x'), preset('simclr', 32),"
            " LoaderContext(torch.device('cpu')))\n"
            "except UserError as e:\n"
            "    print('hint:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "hint: data.backend=dali needs NVIDIA DALI" in proc.stdout and "pip install" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_decoder_without_gpu_suggests_cpu_mode(colour_root):
    with pytest.raises(UserError, match="data.device=cpu"):
        _loader(colour_root, preset("simclr", S), device="cuda")


@pytest.mark.dali
@pytest.mark.parametrize("bad, match", [({"dali_prefetch_queue_depth": 0}, "dali_prefetch_queue_depth=0"),
                                        ({"dali_hw_decoder_load": 1.5}, "dali_hw_decoder_load=1.5"),
                                        ({"batch": 15, "nproc": 2}, "batch_size=15"),
                                        ({"batch": 64}, "fewer than one global batch"),
                                        ({"compile": "true"}, "data.compile=true .* use auto or false"),
                                        ({"compile": "1"}, "unknown data.compile '1'")])
def test_bad_settings_are_one_line_errors(colour_root, bad, match):
    with pytest.raises(UserError, match=match) as e:
        _loader(colour_root, preset("simclr", S), **bad)
    assert "\n" not in str(e.value)


@pytest.mark.dali
def test_both_views_come_from_one_decode(colour_root):
    loader = _loader(colour_root, AugmentSpec(S, (PLAIN, PLAIN)))
    assert loader.pipeline.serialize().count(b"decoders__Image") == 1  # one decoder operator in the graph
    batch = next(iter(loader))
    assert torch.equal(batch.views[0], batch.views[1])  # un-augmented views of that decode are identical
    index = scan_image_folder(colour_root)
    pil = np.stack([load_rgb(index.samples[i][0]) for i in batch.indices]).transpose(0, 3, 1, 2) / 255.0
    assert np.abs(_pixels(batch.views[0], loader.spec) - pil).max() < 1e-5  # and equal PIL's decode


@pytest.mark.dali
def test_full_image_views_equal_the_torch_backend(colour_root):
    # Same batches, same parameter draws; with the whole S x S image as the box there is no resampling, so
    # every colour op (random jitter order, hue, grey, blur, solarise) and flip must agree to float precision.
    from pipelines.torch import build as build_torch

    v1 = ViewSpec(jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2, gray_p=0.3, blur_p=0.5,
                  solarize_p=0.3, **FULL)
    # The second view greys before jittering (MoCo v1's order), so both orders are compared.
    spec = AugmentSpec(S, (v1, dataclasses.replace(v1, blur_p=0.2, solarize_p=0.5, gray_first=True)))
    dali = _loader(colour_root, spec, seed=5)
    ref = build_torch(DataConfig(path=str(colour_root), device="cpu", image_size=S, batch_size=16, workers=0),
                      spec, LoaderContext(torch.device("cpu"), seed=5))
    for epoch in (0, 1):
        dali.set_epoch(epoch)
        ref.set_epoch(epoch)
        pairs = list(zip(dali, ref))
        assert len(pairs) == len(ref) == 2
        for d, t in pairs:
            assert torch.equal(d.indices, t.indices) and torch.equal(d.labels, t.labels)
            for vd, vt in zip(d.views, t.views):
                assert vd.shape == vt.shape == (16, 3, S, S) and vd.dtype == torch.float32
                assert (vd - vt).abs().max() < 1e-4
            assert (d.views[0] - d.views[1]).flatten(1).abs().amax(1).min() > 0.05  # independent per view


@pytest.mark.dali
def test_random_crops_match_the_torch_backend_up_to_resampling(colour_root):
    # Same boxes and filter (antialiased bilinear); the torch backend's is torchvision's exactly, DALI's agrees
    # in a view's interior, but at its outer pixels DALI's filter reads past the crop box where torchvision
    # renormalises within it (mean |diff| measured 0.002-0.003 in these units, max 0.36 at an edge).
    from pipelines.torch import build as build_torch

    spec = preset("mocov3", S)
    d = next(iter(_loader(colour_root, spec, seed=1)))
    t = next(iter(build_torch(DataConfig(path=str(colour_root), device="cpu", image_size=S, batch_size=16,
                                         workers=0), spec, LoaderContext(torch.device("cpu"), seed=1))))
    for vd, vt in zip(d.views, t.views):
        assert (vd - vt).abs().mean() < 0.01


@pytest.mark.dali
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mixed (nvJPEG) decoder needs a CUDA GPU")
def test_gpu_mixed_decode_agrees_with_cpu_mode(colour_root):
    # Same host-drawn parameters in both modes; nvJPEG's chroma upsampling differs slightly from
    # libjpeg-turbo's, so views agree closely rather than exactly.
    spec = preset("mocov3", S)
    cpu = next(iter(_loader(colour_root, spec, seed=2)))
    gpu = next(iter(_loader(colour_root, spec, seed=2, device="auto", train_device="cuda")))
    assert all(v.is_cuda and v.shape == (16, 3, S, S) for v in gpu.views)
    assert torch.equal(gpu.indices.cpu(), cpu.indices)
    for vg, vc in zip(gpu.views, cpu.views):
        assert (vg.cpu() - vc).abs().mean() < 0.02


@pytest.mark.dali
@pytest.mark.parametrize("name", ["simclr", "mocov3"])
def test_gpu_graph_is_well_formed_without_a_gpu(name, monkeypatch):
    # The GPU pipeline cannot run here, but DALI checks device placement while the Python graph is defined
    # (a CPU operator fed by a GPU output, a bad argument name): define it without starting a backend and
    # check what runs where -- one `mixed` decode, every view made and returned on the GPU, meta on the CPU.
    pytest.importorskip("nvidia.dali")
    from nvidia.dali.pipeline import Pipeline

    from pipelines import dali_graph

    monkeypatch.setattr(Pipeline, "build", lambda self: None)  # the backend needs CUDA

    def source():
        raise StopIteration

    spec = preset(name, S)
    pipe = dali_graph.build_pipeline(spec, source, 4, "gpu", 0, 2, 2, 0.65, seed=1)
    pipe._build_graph()  # DALI's own graph definition step (private API; DALI pinned in setup.cfg)
    assert sorted({op._op.device for op in pipe._ops}) == ["cpu", "gpu", "mixed"]
    assert [type(op._op).__name__ for op in pipe._ops if op._op.device == "mixed"] == ["Image"]  # decoders.image
    assert [node.device for node in pipe._graph_outputs] == ["gpu"] * len(spec.views) + ["cpu"]


@pytest.mark.dali
def test_a_gpu_pipeline_that_cannot_start_is_one_line_naming_the_cpu_mode():
    # Past the trainer's own GPU check (a machine whose torch sees a GPU but whose DALI cannot use it): DALI's
    # backend refuses to build; here, with no CUDA at all, it refuses for real.
    pytest.importorskip("nvidia.dali")
    from pipelines.dali import DaliViewLoader

    ctx = LoaderContext(torch.device("cuda", 0), 0, 1, 0)
    with pytest.raises(UserError) as e:
        DaliViewLoader(list(range(8)), preset("simclr", S), ctx, 4, True, "gpu", 1, 2, 0.65)
    message = str(e.value)
    assert message.startswith("DALI could not start its GPU pipeline on cuda:0 (") and "\n" not in message
    assert message.endswith("; set data.device=cpu to run it on the CPU"), message


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                        - np.searchsorted(np.sort(b), grid, "right") / len(b)).max())


@pytest.mark.dali
def test_crop_and_flip_statistics_match_torchvision(ramp_root):
    from torchvision.transforms import RandomResizedCrop

    view = ViewSpec(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)  # crop and flip only, spec defaults
    loader = _loader(ramp_root, AugmentSpec(S, (view, view)))
    sizes = {i: load_rgb(p).shape[:2] for i, (p, _) in enumerate(scan_image_folder(ramp_root).samples)}
    mid = slice(S // 4, 3 * S // 4)  # fit the ramps away from the box edges (antialias filter support)
    j = np.arange(S) + 0.5
    area, log_aspect, flipped, pairs_differ = [], [], [], []
    for epoch in range(8):
        loader.set_epoch(epoch)
        for batch in loader:
            boxes = []
            for v in batch.views:
                x = _pixels(v, loader.spec) * 255
                slope_x = np.polyfit(j[mid], x[:, 0].mean(1)[:, mid].T, 1)[0]  # red along a row
                slope_y = np.polyfit(j[mid], x[:, 1].mean(2)[:, mid].T, 1)[0]  # green down a column
                hw = np.array([sizes[i] for i in batch.indices.tolist()], dtype=np.float64)
                w, h = np.abs(slope_x) * hw[:, 1] * S / 255, slope_y * hw[:, 0] * S / 255
                area += list(h * w / hw.prod(1))
                log_aspect += list(np.log(w / h))
                flipped += list(slope_x < 0)
                boxes.append(np.stack([h, w], 1))
            pairs_differ += list(np.abs(boxes[0] - boxes[1]).max(1) > 1)
    n = len(area)
    torch.manual_seed(0)
    ref = [RandomResizedCrop.get_params(torch.empty(1, *RAMP_SIZES[k % 6]), view.crop_scale, view.crop_ratio)
           for k in range(20000)]
    ref_area = np.array([h * w / np.prod(RAMP_SIZES[k % 6]) for k, (_, _, h, w) in enumerate(ref)])
    ref_aspect = np.array([np.log(w / h) for _, _, h, w in ref])
    # Two-sample KS at alpha = 1e-4: c = sqrt(-ln(alpha / 2) / 2) = 2.22.
    crit = 2.22 * np.sqrt(1 / n + 1 / len(ref))
    assert _ks(np.array(area), ref_area) < crit
    assert _ks(np.array(log_aspect), ref_aspect) < crit
    assert abs(np.mean(flipped) - view.flip_p) < 4.5 * np.sqrt(0.25 / n)  # binomial, 4.5 sigma
    assert np.mean(pairs_differ) > 0.9  # the two views of an image draw their own boxes


@pytest.mark.dali
def test_gray_and_solarize_rates_match_the_spec(colour_root):
    view = dataclasses.replace(PLAIN, gray_p=0.3, solarize_p=0.4)
    loader = _loader(colour_root, AugmentSpec(S, (view, view)))
    index = scan_image_folder(colour_root)
    luma = np.array([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
    gray, solar = [], []
    for epoch in range(6):
        loader.set_epoch(epoch)
        for batch in loader:
            base = np.stack([load_rgb(index.samples[i][0]) for i in batch.indices]).transpose(0, 3, 1, 2) / 255.0
            for v in batch.views:
                x = _pixels(v, loader.spec)
                for n in range(len(x)):
                    cands = {}
                    for g in (False, True):
                        b = np.repeat((base[n:n + 1] * luma).sum(1, keepdims=True), 3, 1)[0] if g else base[n]
                        for s in (False, True):
                            cands[g, s] = np.abs(x[n] - (np.where(b >= 0.5, 1 - b, b) if s else b)).max()
                    best = min(cands, key=cands.get)
                    assert cands[best] < 1e-4  # every view is exactly one of the four outcomes
                    gray.append(best[0])
                    solar.append(best[1])
    n = len(gray)
    assert abs(np.mean(gray) - 0.3) < 4.5 * np.sqrt(0.3 * 0.7 / n)
    assert abs(np.mean(solar) - 0.4) < 4.5 * np.sqrt(0.4 * 0.6 / n)


@pytest.mark.dali
@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_get_disjoint_shards_covering_the_epoch(colour_root, drop_last):
    labels = scan_image_folder(colour_root).labels
    seen = []
    for rank in (0, 1):
        loader = _loader(colour_root, preset("simclr", S), rank=rank, nproc=2, seed=3, drop_last=drop_last)
        loader.set_epoch(2)
        batches = list(loader)
        expected = shard_batches(40, 16, 3, 2, rank, 2, drop_last)
        assert len(batches) == len(loader) == len(expected) == (2 if drop_last else 3)
        for b, idx in zip(batches, expected):
            assert b.indices.tolist() == idx.tolist() and b.labels.tolist() == labels[idx].tolist()
            assert all(v.shape[0] == len(idx) for v in b.views)
        seen += [i for b in batches for i in b.indices.tolist()]
    assert len(seen) == len(set(seen)) == (32 if drop_last else 40)


@pytest.mark.dali
def test_resume_mid_epoch_and_an_abandoned_epoch(colour_root):
    spec = preset("simclr", S)
    loader = _loader(colour_root, spec, batch=8, seed=7)
    loader.set_epoch(3)
    full = list(loader)
    loader.set_epoch(0)
    stale = iter(loader)
    next(stale)  # abandoned after one batch: the queued batches must not leak into the next epoch
    loader.set_epoch(3, start_batch=2)
    it = iter(loader)
    resumed = [next(it)]
    stale.close()  # closing the abandoned iterator late must not disturb the running one
    resumed += list(it)
    assert len(full) == 5 and len(resumed) == 3
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a.indices, b.indices) and all(torch.equal(x, y) for x, y in zip(a.views, b.views))
    loader.set_epoch(4)
    assert not torch.equal(next(iter(loader)).views[0], full[0].views[0])
    with pytest.raises(UserError, match="start_batch=6 is outside this epoch's 5 batches"):
        loader.set_epoch(4, start_batch=6)


@pytest.mark.dali
def test_shard_directory_reads_the_right_image_for_each_label(tmp_path):
    from fastssl.data.shards import convert_image_folder

    for c in range(2):  # the green level encodes the class: a misaligned reader gives the wrong label
        for k in range(12):
            (tmp_path / "src" / f"k{c}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (S, S), (40 + 8 * k, 60 + 120 * c, 100)).save(tmp_path / "src" / f"k{c}" / f"{k}.jpg")
    convert_image_folder(tmp_path / "src", tmp_path / "shards", shard_size=5)
    loader = _loader(tmp_path / "shards", AugmentSpec(S, (PLAIN, PLAIN)), batch=8)
    got = 0
    for batch in loader:
        green = _pixels(batch.views[0], loader.spec)[:, 1].mean((1, 2)) * 255
        assert np.allclose(green, 60 + 120 * batch.labels.numpy(), atol=3)
        got += len(batch.labels)
    assert got == 24
    (tmp_path / "shards" / "shard-000001.idx").unlink()
    with pytest.raises(UserError, match="shard-000001.idx"):
        _loader(tmp_path / "shards", AugmentSpec(S, (PLAIN, PLAIN)), batch=8)


@pytest.mark.dali
def test_a_corrupt_jpeg_is_named(tmp_path, colour_root):
    for p in sorted(Path(colour_root).rglob("*.jpg"))[:16]:
        (tmp_path / p.parent.name).mkdir(exist_ok=True)
        (tmp_path / p.parent.name / p.name).write_bytes(p.read_bytes())
    bad = sorted(tmp_path.rglob("*.jpg"))[5]
    bad.write_bytes(bad.read_bytes()[:-300])  # header intact, scan data cut: only a full decode notices
    with pytest.raises(UserError, match=f"corrupt or truncated image {bad}"):
        list(_loader(tmp_path, preset("simclr", S), batch=16))


def _shards_with_a_damaged_sample(tmp_path, colour_root) -> tuple[Path, str]:
    """Converted shards whose 6th sample had its bytes overwritten after conversion; returns (tar, key)."""
    from fastssl.data.shards import convert_image_folder

    convert_image_folder(colour_root, tmp_path / "shards", shard_size=20)
    tar = tmp_path / "shards" / "shard-000000.tar"
    jpg = (tmp_path / "shards" / "shard-000000.idx").read_text().splitlines()[6].split()
    offset, size = int(jpg[1]), int(jpg[2])
    data = bytearray(tar.read_bytes())
    data[offset + 2:offset + size] = bytes(size - 2)  # the JPEG start marker, then zeros: no decoder reads it
    tar.write_bytes(bytes(data))
    return tar, jpg[3].rsplit(".", 1)[0]


@pytest.mark.dali
def test_a_corrupt_jpeg_in_a_shard_is_named_by_shard_and_key(tmp_path, colour_root):
    tar, key = _shards_with_a_damaged_sample(tmp_path, colour_root)
    with pytest.raises(UserError, match=f"corrupt JPEG: sample {key} of shard {tar} does not decode") as e:
        list(_loader(tmp_path / "shards", preset("simclr", S), batch=16))
    assert "\n" not in str(e.value)


@pytest.mark.dali
def test_an_image_only_dali_rejects_gets_dalis_reason_and_the_shards(tmp_path, colour_root, monkeypatch):
    from pipelines.dali_sources import ShardSource

    tar, _ = _shards_with_a_damaged_sample(tmp_path, colour_root)
    monkeypatch.setattr(ShardSource, "check_decodes", lambda self, idx: None)  # as if PIL read every image
    with pytest.raises(UserError, match=rf"DALI failed to decode an image that PIL reads \((?!Critical)[^)]+\); "
                                        rf"the batches in flight came from .*{tar}") as e:
        list(_loader(tmp_path / "shards", preset("simclr", S), batch=16))
    assert "\n" not in str(e.value)


@pytest.mark.dali
def test_memory_does_not_grow_epoch_over_epoch(colour_root):
    def rss_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20

    loader = _loader(colour_root, preset("simclr", S), batch=16)
    usage = []
    for epoch in range(12):
        loader.set_epoch(epoch)
        for k, _ in enumerate(loader):
            if epoch % 3 == 0 and k == 1:
                break  # abandoned epochs too
        usage.append(rss_mib())
    # Buffers reach their high-water mark in the first epochs; measured growth afterwards is < 1 MiB.
    assert usage[-1] - usage[3] < 8, usage
