"""`tools/bench.py loader|model|step`: the record schema, the throughput and ratio arithmetic, the OOM back-off
(with injected failures), FLOPs against closed forms, the PIL/torchvision baseline against the spec, and the
user errors. Timings themselves are not asserted (they belong in docs/BENCHMARKS.md, not in tests); what is
asserted is that the figures are the stated functions of what was measured or injected."""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, assert_user_error, run_tool
from fastssl.bench import flops, loader as bench_loader, model as bench_model, step as bench_step
from fastssl.bench.baseline import BaselineLoader, view_transform
from fastssl.bench.record import SCHEMA_FIELDS, VERSION_KEYS, BenchRecord
from fastssl.bench.sweep import Backoff, grid, is_oom, parse_list, with_oom_backoff
from fastssl.errors import UserError
from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, ViewSpec, preset
from pipelines.base import ViewBatch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_MODEL = ["data.image_size=16", "model.small_input=false", "method.proj_hidden=64", "method.proj_dim=32"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 random 32 px JPEGs in 2 classes: 3 batches of 8."""
    root = tmp_path_factory.mktemp("bench") / "ds"
    rng = np.random.default_rng(0)
    for i in range(24):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:02d}.jpg")
    return root


def parse(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def check_record(path, kind) -> BenchRecord:
    record = BenchRecord.from_json(path.read_text())  # from_json rejects any other set of top-level fields
    assert record.kind == kind and set(record.versions) == set(VERSION_KEYS)
    assert record.versions["torch"] == torch.__version__ and record.git_commit and record.tool_version
    return record


# --- loader -------------------------------------------------------------------------------------------------

def test_loader_bench_writes_record_table_and_plot(folder, tmp_path):
    out, png = tmp_path / "loader.json", tmp_path / "loader.png"
    proc = run_tool("tools/bench.py", "loader", "--data", str(folder), "--backend", "torch,pil", "--batch", "8",
                    "--workers", "0,1", "--batches", "2", "--warmup", "1", "--size", "16", "--json", str(out),
                    "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert "views/s" in proc.stdout and "pil" in proc.stdout
    record = check_record(out, "loader")
    assert record.config["augment_compiled"] is False  # data.compile=auto compiles on CUDA only
    assert set(SCHEMA_FIELDS) == set(record.__dataclass_fields__)
    rows = {(r["backend"], r["workers"]): r for r in record.figures}
    assert set(rows) == {("torch", 0), ("torch", 1), ("pil", 0), ("pil", 1)}
    for r in rows.values():
        assert r["skipped"] is None and r["batch"] == 8 and r["batches"] == 2 and r["image_size"] == 16
        # Each DataLoader worker prepares 2 batches ahead: the warm-up takes at least that queue, and the share
        # of the 2 timed batches that could have been made before the window is reported, not hidden.
        assert r["batches_ahead"] == 2 * r["workers"] and r["warmup"] == max(1, 2 * r["workers"])
        assert r["premade_share"] == min(1.0, 2 * r["workers"] / 2)
        # Two views per image; ms/batch = 1000 * wall / batches and views/s = batches * 8 * 2 / wall, so their
        # product is 1000 * 16 whatever the timing.
        assert r["views_per_s"] == pytest.approx(2 * r["images_per_s"], rel=1e-12)
        assert r["ms_per_batch"] * r["views_per_s"] == pytest.approx(1000 * 16, rel=1e-9)
        # Two tiny batches can use less CPU time than the clock resolves: then there is no per-core figure.
        if r["cores_busy"] > 0:
            assert r["views_per_core_s"] == pytest.approx(r["views_per_s"] / r["cores_busy"], rel=1e-12)
        else:
            assert r["views_per_core_s"] is None
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loader.json", "loader.png"]


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=pytest.mark.dali),
                                     pytest.param("ffcv", marks=[pytest.mark.ffcv, pytest.mark.slow])])
def test_loader_bench_runs_each_installed_backend(backend, folder, tmp_path):
    pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[backend])
    out = tmp_path / "loader.json"
    proc = run_tool("tools/bench.py", "loader", "--data", str(folder), "--backend", backend, "--batch", "8",
                    "--workers", "1", "--batches", "2", "--warmup", "1", "--size", "16", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    (row,) = check_record(out, "loader").figures
    assert row["backend"] == backend and row["skipped"] is None
    assert row["views_per_s"] == pytest.approx(2 * row["images_per_s"], rel=1e-12)


def test_missing_backend_is_skipped_in_a_sweep_and_fatal_alone(folder, monkeypatch):
    monkeypatch.setattr(bench_loader, "unavailable_reason", lambda b: "not installed here" if b == "dali" else None)
    with pytest.raises(UserError, match="--backend dali cannot run: not installed here"):
        bench_loader.select_backends(["dali"])
    record = bench_loader.run(parse(bench_loader, ["--data", str(folder), "--backend", "torch,dali", "--batch", "8",
                                                   "--workers", "0", "--batches", "1", "--warmup", "0",
                                                   "--size", "16"]))
    rows = {r["backend"]: r for r in record.figures}
    assert rows["dali"]["skipped"] == "not installed here" and rows["dali"]["views_per_s"] is None
    assert rows["torch"]["skipped"] is None and rows["torch"]["views_per_s"] > 0
    assert set(rows["dali"]) == set(rows["torch"])  # one row schema, measured or skipped
    assert record.config["skipped"] == {"dali": "not installed here"}


def test_baseline_views_follow_the_spec():
    # Oracle: with every random op off and a full-image crop, a constant image's view is (c / 255 - mean) / std
    # per channel, computed here in float64.
    still = ViewSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0,
                     blur_p=0.0, solarize_p=0.0)
    colour = np.array([200, 30, 90], dtype=np.uint8)
    view = view_transform(still, 16, IMAGENET_MEAN, IMAGENET_STD)(Image.fromarray(np.tile(colour, (32, 32, 1))))
    expected = (colour / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert view.shape == (3, 16, 16) and view.dtype == torch.float32
    np.testing.assert_allclose(view.numpy(), np.broadcast_to(expected[:, None, None], (3, 16, 16)), atol=1e-6)
    # The SimCLR preset compiles to torchvision transforms with the spec's own parameters.
    steps = view_transform(preset("simclr", 32).views[0], 32, IMAGENET_MEAN, IMAGENET_STD).transforms
    t = {type(s).__name__: s for s in steps}
    applied = {type(s.transforms[0]).__name__: s for s in steps if type(s).__name__ == "RandomApply"}
    assert t["RandomResizedCrop"].scale == (0.08, 1.0) and t["RandomResizedCrop"].size == (32, 32)
    jitter = applied["ColorJitter"].transforms[0]
    assert jitter.brightness == pytest.approx((0.2, 1.8)) and jitter.hue == pytest.approx((-0.2, 0.2))
    assert applied["ColorJitter"].p == 0.8
    blur = applied["GaussianBlur"].transforms[0]
    assert blur.kernel_size == (3, 3) and list(blur.sigma) == [0.1, 2.0] and applied["GaussianBlur"].p == 0.5
    assert t["RandomGrayscale"].p == 0.2 and "RandomSolarize" not in t  # SimCLR does not solarise


def test_baseline_loader_batches(folder):
    spec = AugmentSpec(16, (ViewSpec(), ViewSpec(solarize_p=0.2)))
    batches = list(BaselineLoader(str(folder), spec, 8, 0, torch.device("cpu")))
    assert len(batches) == 3
    idx = torch.cat([b.indices for b in batches])
    assert sorted(idx.tolist()) == list(range(24))  # one epoch sees every image once
    assert all(len(b.views) == 2 and b.views[1].shape == (8, 3, 16, 16) for b in batches)


# --- arithmetic ---------------------------------------------------------------------------------------------

def test_ratio_and_wait_arithmetic_hand_computed():
    assert bench_step.images_per_s(512, 2.0) == 256.0
    assert bench_step.input_bound_ratio(900.0, 1000.0) == pytest.approx(0.9)
    assert bench_step.input_bound_ratio(1010.0, 1000.0) == pytest.approx(1.01)  # noise is reported, not clipped
    assert bench_step.data_wait_fraction(0.25, 2.0) == 0.125
    assert bench_step.compute_share(1.5, 2.0) == 0.75
    for fn, args in ((bench_step.input_bound_ratio, (1.0, 0.0)), (bench_step.data_wait_fraction, (0.1, 0.0)),
                     (bench_step.compute_share, (0.1, 0.0)),
                     (bench_step.images_per_s, (8, 0.0))):
        with pytest.raises(ValueError):
            fn(*args)


def _fake_batch():
    return ViewBatch((torch.zeros(4, 3, 2, 2), torch.zeros(4, 3, 2, 2)), torch.zeros(4), torch.arange(4))


def test_time_steps_splits_injected_data_wait_from_compute(monkeypatch):
    # Oracle: a fake clock that only the injected fetch and step advance, so the split is exact arithmetic and
    # no sleep overshoot on a loaded machine can move it. The step and the timed window read
    # time.perf_counter through their modules' `time`; both get the fake one.
    from types import SimpleNamespace

    from fastssl.bench import timing

    now = [1000.0]
    fake_time = SimpleNamespace(perf_counter=lambda: now[0])
    monkeypatch.setattr(bench_step, "time", fake_time)
    monkeypatch.setattr(timing, "time", fake_time)
    fetch_s, compute_s, steps = 0.03, 0.01, 5  # unequal, so a swapped or merged split cannot pass
    fetched = []

    def batches():
        while True:
            now[0] += fetch_s
            fetched.append(1)
            yield _fake_batch()

    def step(batch):
        now[0] += compute_s

    times, window = bench_step.time_steps(batches(), step, steps, warmup=2, device=torch.device("cpu"))
    assert len(fetched) == 2 + steps and times.images == 4 * steps
    assert times.data_wait_s == pytest.approx(steps * fetch_s, abs=1e-9)
    assert times.compute_s == pytest.approx(steps * compute_s, abs=1e-9)
    assert times.wall_s == pytest.approx(steps * (fetch_s + compute_s), abs=1e-9)  # warm-up steps not timed
    assert times.wall_s == window.wall_s


def test_time_steps_reads_the_real_clock():
    # The same split with real sleeps, asserting only what a loaded machine cannot break: a sleep never returns
    # early, so each figure is at least its sleeps' total (and the window at least their sum).
    fetch_s, compute_s, steps = 0.02, 0.01, 3

    def batches():
        while True:
            time.sleep(fetch_s)
            yield _fake_batch()

    times, window = bench_step.time_steps(batches(), lambda b: time.sleep(compute_s), steps, warmup=1,
                                          device=torch.device("cpu"))
    assert times.data_wait_s >= steps * fetch_s and times.compute_s >= steps * compute_s
    assert times.wall_s >= times.data_wait_s + times.compute_s and times.wall_s == window.wall_s


def test_flop_count_matches_closed_forms():
    torch.manual_seed(0)
    n, i, o = 16, 8, 4
    lin = torch.nn.Linear(i, o)
    x = torch.randn(n, i, requires_grad=True)
    # forward x @ W^T: 2*n*i*o; backward: grad_x = g @ W and grad_W = g^T @ x, 2*n*i*o each (bias adds are not
    # matmuls and are not counted).
    assert flops.count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * n * i * o
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)
    img = torch.randn(2, 3, 8, 8)
    # 2 * N * Cout * Hout * Wout * Cin * k * k multiply-adds.
    assert flops.count_flops(lambda: conv(img)) == 2 * 2 * 5 * 8 * 8 * 3 * 3 * 3
    # torchvision's model card: ResNet-18 at 224 px is 1.81 GMACs (which it calls GFLOPS): 3.63 GFLOPs forward.
    import torchvision

    net = torchvision.models.resnet18().eval()
    with torch.no_grad():
        counted = flops.count_flops(lambda: net(torch.zeros(1, 3, 224, 224)))
    assert counted == pytest.approx(2 * 1.814e9, rel=0.01)


def test_cpu_attention_is_counted_like_the_cuda_kernels():
    # Closed form for the fused kernels (FlopCounterMode's CUDA flash/efficient formulas): forward QK^T and PV,
    # 2 x 2 B H L S D; backward recomputes QK^T, then dV, dP, dQ, dK: 5 x 2 B H L S D. Without the CPU formulas
    # the CPU kernel counted 0.
    import torch.nn.functional as F

    b, h, l, s, d = 2, 3, 17, 11, 8
    q = torch.randn(b, h, l, d, requires_grad=True)
    k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(2))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        counted = flops.count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert counted == (4 + 10) * b * h * l * s * d


def test_mfu_and_peak_table():
    assert flops.achieved_tflops(2 * 10**12, 50.0) == pytest.approx(100.0)
    assert flops.mfu(2 * 10**12, 50.0, 200.0) == pytest.approx(0.5)
    assert flops.mfu(2 * 10**12, 50.0, None) is None
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert flops.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0  # not the SXM figure
    assert flops.peak_tflops("NVIDIA H200", "tf32") == 494.7
    assert flops.peak_tflops("NVIDIA H200 NVL", "bf16") == 835.5  # data sheet: 1,671 with 2:4 sparsity
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert flops.peak_tflops("Tesla T4", "bf16") is None
    assert flops.math_dtype("bf16") == "bf16" and flops.math_dtype("no", allow_tf32=True) == "tf32"
    assert flops.device_peak(torch.device("cpu"), "fp32") == ("fp32", None)


# --- sweeps and OOM back-off ------------------------------------------------------------------------------

def test_parse_list_and_grid():
    assert parse_list("256, 1024,256", "--batch") == [256, 1024]
    assert grid(a=[1, 2], b=["x", "y"]) == [dict(a=1, b="x"), dict(a=1, b="y"), dict(a=2, b="x"), dict(a=2, b="y")]
    for text in ("256,abc", "8,,16", ""):
        with pytest.raises(UserError, match="--batch"):
            parse_list(text, "--batch")
    with pytest.raises(UserError, match="below the minimum 1"):
        parse_list("0", "--batch", minimum=1)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA error: out of memory"),
                                   RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory"),
                                   RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"),
                                   RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")])
def test_backoff_halves_until_the_batch_fits(error):
    calls, messages = [], []

    def run(batch):
        calls.append(batch)
        if batch > 64:
            raise error
        return f"ran {batch}"

    result = with_oom_backoff(run, 256, min_batch=8, on_retry=messages.append)
    assert result == Backoff("ran 64", 64, [256, 128, 64]) and result.reduced
    assert calls == [256, 128, 64] and len(messages) == 2 and "256 ran out of memory" in messages[0]
    assert is_oom(error)


def test_backoff_reraises_other_errors_and_reports_a_batch_that_never_fits():
    def shape_bug(batch):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        with_oom_backoff(shape_bug, 256)

    def never(batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    with pytest.raises(UserError) as e:
        with_oom_backoff(never, 64, min_batch=8)
    msg = str(e.value)
    assert "batch 64 does not fit" in msg and "64, 32, 16, 8" in msg and "smallest allowed 8" in msg
    assert "GiB" in msg  # the memory figures: total / available / this process


def test_model_bench_backs_off_on_injected_oom(monkeypatch):
    # The first forward+backward is where a real OOM strikes: the FLOP count, then the step.
    for name in ("count_flops", "__call__"):
        real = getattr(bench_model.TrainingStep, name)

        def tight_memory(self, batch, real=real):
            if batch.views[0].shape[0] > 8:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected above batch 8)")
            return real(self, batch)

        monkeypatch.setattr(bench_model.TrainingStep, name, tight_memory)
    record = bench_model.run(parse(bench_model, ["--batch", "32", "--min-batch", "4", "--steps", "2", "--warmup",
                                                 "0", "--device", "cpu", *TINY_MODEL]))
    (row,) = record.figures
    assert row["batch_requested"] == 32 and row["batch"] == 8
    assert row["method"] == "simclr" and row["compiled"] is False and row["mfu"] is None  # no peak for CPUs
    # images/s * step time = the batch; TFLOP/s = FLOPs per step / step time.
    assert row["images_per_s"] * row["step_ms"] / 1000 == pytest.approx(8, rel=1e-9)
    assert row["tflops"] == pytest.approx(row["gflops_per_image"] * 8 / row["step_ms"], rel=1e-9)
    assert row["gflops_per_image"] > 0


@pytest.mark.compile
@pytest.mark.slow
def test_model_bench_compares_eager_and_compiled(tmp_path):
    out = tmp_path / "model.json"
    proc = run_tool("tools/bench.py", "model", "--compile", "false,true", "--batch", "8", "--steps", "1",
                    "--warmup", "1", "--device", "cpu", *TINY_MODEL, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    eager, compiled = check_record(out, "model").figures
    assert (eager["compiled"], compiled["compiled"]) == (False, True)
    assert (eager["augment_compiled"], compiled["augment_compiled"]) == (False, True)  # as the trainer would
    # FLOPs are counted eagerly before compiling: the same model, the same count.
    assert compiled["gflops_per_image"] == eager["gflops_per_image"] > 0


# --- augment ------------------------------------------------------------------------------------------------

def test_augment_bench_end_to_end(tmp_path):
    out, png = tmp_path / "augment.json", tmp_path / "augment.png"
    proc = run_tool("tools/bench.py", "augment", "--augment", "mocov3", "--size", "16", "--batch", "4,8",
                    "--compile", "false", "--steps", "2", "--warmup", "1", "--device", "cpu", "--json", str(out),
                    "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    rows = check_record(out, "augment").figures
    assert [(r["batch"], r["batch_requested"], r["compiled"], r["source_size"]) for r in rows] == \
        [(4, 4, False, 32), (8, 8, False, 32)]
    for r in rows:
        assert r["pairs_per_s"] == pytest.approx(r["batch"] * 1000.0 / r["ms_per_batch"], rel=1e-12)
        assert r["cuda_kernels"] is None and r["peak_mem_gib"] is None and r["max_diff_vs_eager"] is None
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_augment_bench_backs_off_on_injected_oom(monkeypatch):
    from fastssl.bench import augment as bench_augment
    from pipelines import ops

    real = ops.make_view

    def tight_memory(images, *args, **kwargs):
        if images.shape[0] > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected above batch 8)")
        return real(images, *args, **kwargs)

    monkeypatch.setattr(ops, "make_view", tight_memory)
    record = bench_augment.run(parse(bench_augment, ["--batch", "32", "--size", "16", "--compile", "false",
                                                     "--steps", "1", "--warmup", "0", "--device", "cpu"]))
    (row,) = record.figures
    assert (row["batch_requested"], row["batch"]) == (32, 8)  # halved twice, down to the floor of 8
    assert row["pairs_per_s"] == pytest.approx(8 * 1000.0 / row["ms_per_batch"], rel=1e-12)


def test_augment_bench_counts_profiled_operators():
    # The CUDA kernel column's counter, run with the CPU activity: the operators the profiler saw, in order.
    from fastssl.bench.augment import count_profiled

    x, y = torch.ones(4), torch.full((4,), 2.0)
    assert count_profiled(lambda: x.add(y).mul(y).sub(y), "cpu") == 3
    assert count_profiled(lambda: None, "cpu") == 0


@pytest.mark.compile
def test_augment_bench_compiled_row_is_checked_against_eager():
    from fastssl.bench.augment import bench_augment
    from pipelines.augment import preset

    row = bench_augment(preset("mocov3", 24), "mocov3", 12, 40, True, torch.device("cpu"), 1, 0, 0)
    assert row.compiled and 0 <= row.max_diff_vs_eager < 5e-5  # a number computed from compiled views


@pytest.mark.compile
def test_model_bench_keeps_a_pinned_data_compile(tmp_path):
    # --compile switches data.compile with model.compile unless the command pins it (gpu_bench's largest-batch
    # parts compare compiled networks alone).
    out = tmp_path / "model.json"
    proc = run_tool("tools/bench.py", "model", "--compile", "false", "--batch", "8", "--steps", "1", "--warmup", "1",
                    "--device", "cpu", *TINY_MODEL, "data.compile=true", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    (row,) = check_record(out, "model").figures
    assert (row["compiled"], row["augment_compiled"]) == (False, True)


# --- step ---------------------------------------------------------------------------------------------------

def test_step_bench_end_to_end(folder, tmp_path):
    out, png = tmp_path / "step.json", tmp_path / "step.png"
    proc = run_tool("tools/bench.py", "step", "--batch", "8", "--steps", "2", "--warmup", "1", "--workers", "0",
                    "--device", "cpu", f"data.path={folder}", *TINY_MODEL, "--json", str(out), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert "ratio" in proc.stdout
    record = check_record(out, "step")
    assert (record.config["data_compile"], record.config["model_compile"]) == ("auto", "auto")
    (row,) = record.figures
    assert row["backend"] == "torch" and row["workers"] == 0 and row["batch"] == 8
    assert row["input_bound_ratio"] == pytest.approx(row["images_per_s"] / row["model_images_per_s"], rel=1e-12)
    assert row["data_wait_fraction"] == pytest.approx(row["data_wait_s"] / row["wall_s"], rel=1e-12)
    assert row["compute_share"] == pytest.approx(row["compute_s"] / row["wall_s"], rel=1e-12)
    assert row["images_per_s"] == pytest.approx(8 * 2 / row["wall_s"], rel=1e-12)
    assert row["batches_ahead"] == 0 and row["warmup"] == 1 and row["premade_share"] == 0.0  # no workers, no queue
    assert 0 <= row["data_wait_s"] and row["data_wait_s"] + row["compute_s"] <= row["wall_s"] * (1 + 1e-9)
    assert png.read_bytes()[:8] == PNG_MAGIC


# --- user errors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, fragments", [
    (["loader", "--backend", "torch,magic"], ["'magic'", "torch, dali, ffcv, pil"]),
    (["loader", "--batch", "8,x", "--backend", "torch"], ["--batch", "'x'"]),
    (["loader", "--data", "/nonexistent/images", "--backend", "torch"], ["/nonexistent/images"]),
    (["model", "--method", "simclr,byol", "--device", "cpu"], ["'byol'", "mocov2, mocov3, simclr"]),
    (["model", "--encoder", "resnet7", "--device", "cpu"], ["'resnet7'", "resnet18"]),
    (["step", "--backend", "pil", "--device", "cpu"], ["pil", "torch, dali, ffcv"]),
    (["augment", "--augment", "byol", "--device", "cpu"], ["'byol'", "simclr"]),
    (["augment", "--size", "4", "--device", "cpu"], ["--size 4; expected an integer >= 8"]),
    (["augment", "--compile", "yes", "--device", "cpu"], ["'yes'", "false, true"]),
    (["step", "--device", "cpu", "data.wokers=2"], ["wokers", "workers"]),
    (["loader", "--seed", "-1", "--backend", "torch"], ["--seed: -1; expected an integer in [0, 2**32 - 1]"]),
    (["augment", "--seed", str(2**64), "--device", "cpu"], [f"--seed: {2**64}; expected an integer in [0, 2**32"]),
    (["step", "--device", "cpu", "seed=-1"], ["seed=-1; expected an integer in [0, 2**32 - 1]"]),
    (["model", "--device", "cpu", "optim.lr=nan"], ["optim.lr=nan; expected a finite number > 0"]),
])
def test_bad_input_is_one_line(argv, fragments):
    assert_user_error(run_tool("tools/bench.py", *argv), *fragments)


@pytest.mark.parametrize("argv, fragment", [
    (["--steps", "0"], "--steps 0; expected an integer >= 1"),  # was read as "not given": the default 3 steps
    (["--warmup", "-1"], "--warmup -1; expected an integer >= 0"),
    (["--min-batch", "0"], "--min-batch 0"),
])
def test_model_bench_refuses_zero_steps_instead_of_using_the_default(argv, fragment):
    with pytest.raises(UserError, match=fragment):
        bench_model.resolve_training(parse(bench_model, [*argv, "--device", "cpu"]))


def _capture_run(monkeypatch, module_name: str) -> list:
    """Replaces the subcommand's run(): the parsed args are kept, and nothing is measured."""
    import importlib

    seen = []

    def run(args):
        seen.append(args)
        raise UserError("stopped before measuring")

    monkeypatch.setattr(importlib.import_module(module_name), "run", run)
    return seen


def test_step_overrides_may_sit_between_options(monkeypatch, capsys):
    from tools.bench import main

    seen = _capture_run(monkeypatch, "fastssl.bench.step")
    assert main(["step", "data.path=X", "--batch", "8", "data.image_size=32", "--steps", "2"]) == 2
    (args,) = seen
    assert args.overrides == ["data.path=X", "data.image_size=32"] and args.batch == "8" and args.steps == 2
    assert "stopped before measuring" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["loss", "loader", "model", "step"])
@pytest.mark.parametrize("option, path, fragment", [
    ("--json", "/proc/x.json", "--json '/proc/x.json': cannot create files in folder '/proc'"),
    ("--json", "FOLDER", "is a folder; expected a file path"),
    ("--plot", "FILE/x.png", "is a file, not a folder"),
    ("--plot", "FOLDER/x.jpg", "expected a .png file"),
])
def test_output_paths_are_checked_before_any_benchmark_runs(command, option, path, fragment, tmp_path, monkeypatch,
                                                            capsys):
    from tools.bench import SUBCOMMANDS, main

    seen = _capture_run(monkeypatch, SUBCOMMANDS[command][0])
    (tmp_path / "afile").write_text("x")
    path = path.replace("FOLDER", str(tmp_path)).replace("FILE", str(tmp_path / "afile"))
    assert main([command, option, path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not seen and len(err) == 1 and fragment in err[0], err
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]



def test_flops_probe_leaves_nothing_for_mocov2_queue():
    # count_flops runs a forward+backward that no optimiser step follows: its keys must not join the queue at
    # the first real step (oracle: the FIFO then holds exactly that step's batch of keys, newest last).
    from fastssl.bench.augment import SyntheticViews
    from fastssl.bench.trainstep import TrainingStep
    from fastssl.config import load_config
    from fastssl.step import make_accelerator
    from pipelines.augment import spec_for

    cfg = load_config(ROOT / "recipes/mocov2_resnet18_synthetic.yaml",
                      [*TINY_MODEL, "data.batch_size=8", "method.queue_size=32", "model.compile=false"])
    step = TrainingStep(cfg, make_accelerator("no", "cpu"))
    spec = spec_for(cfg.data)
    step.count_flops(SyntheticViews(spec, 4, 16, torch.device("cpu"), seed=1)())
    queue = step.unwrapped.queue
    before = queue.ordered().clone()
    step(SyntheticViews(spec, 8, 16, torch.device("cpu"), seed=2)())
    assert int(queue.ptr) == 8
    torch.testing.assert_close(queue.ordered()[:24], before[8:], rtol=0, atol=0)  # the 8 oldest rows left


@pytest.mark.parametrize("overrides, resets", [(["model.compile=false", "data.compile=false"], 0),
                                               (["model.compile=true", "data.compile=false"], 1),
                                               (["model.compile=false", "data.compile=true"], 1)])
def test_a_compiled_row_starts_from_empty_dynamo_caches(monkeypatch, overrides, resets):
    # Each row's new networks add entries to the same forward's cache: past dynamo's recompile limit a sweep
    # would run eager and report it as compiled. So a compiled row drops the earlier graphs first (nothing is
    # compiled here: that happens at the first step).
    from fastssl.bench.trainstep import TrainingStep
    from fastssl.config import load_config
    from fastssl.step import make_accelerator

    calls = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append(1))
    cfg = load_config(ROOT / "recipes/simclr_resnet18_synthetic.yaml", [*TINY_MODEL, *overrides])
    TrainingStep(cfg, make_accelerator("no", "cpu")).close()
    assert len(calls) == resets


def test_a_log_panel_without_positive_values_plots_without_a_warning(tmp_path):
    # A CPU run's panel of GPU memory holds only zeros: matplotlib warned (two stray lines) on a log axis.
    import warnings

    from fastssl.bench.record import Panel, save_plot

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_plot(tmp_path / "p.png", [Panel("peak", "N", "MiB", {"cpu": ([1, 2], [0.0, 0.0])}, logy=True)])
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
