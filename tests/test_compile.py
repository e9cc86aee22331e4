"""torch.compile'd encoders (model.compile=true): the same outputs as eager, and a training run that never
recompiles. Inductor on this CPU needs g++ and ~1 minute per graph, so the graphs here are small: a 4-block
ViT at 32 px and ResNet-18 at 16 px."""

from __future__ import annotations

import shutil

import pytest
import torch

from fastssl.config import load_config
from fastssl.methods import build_method

from conftest import ROOT

pytestmark = [pytest.mark.compile, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                 reason="torch.compile's CPU backend needs a C++ compiler")]


def test_compiled_encoder_gives_the_eager_outputs():
    cfg = load_config(None, ["model.encoder=vit_pico", "data.image_size=32", "method.name=simclr"])
    torch.manual_seed(0)
    encoder = build_method(cfg).encoder.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        eager = encoder(x)
        compiled = torch.compile(encoder, dynamic=False)(x)
    assert compiled.shape == eager.shape == (4, encoder.num_features)
    # Inductor fuses and reorders float reductions: equal to fp32 rounding, not bitwise.
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset_name", ["mocov1", "mocov3"])  # grey before jitter; blur and solarise per view
def test_compiled_augmentation_gives_the_eager_views(preset_name):
    """data.compile=true: steps 2-7 of every view through torch.compile. The eager CPU path (itself tested
    against torchvision in tests/test_ops.py) is the oracle; one graph per view spec, no graph break."""
    import numpy as np
    import torch._dynamo
    from torch._dynamo.utils import counters

    from pipelines import ops
    from pipelines.augment import preset

    spec = preset(preset_name, 24)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 30, 40), dtype=torch.uint8, generator=g)
    torch._dynamo.reset()
    counters.clear()
    for v, view in enumerate(spec.views):
        boxes = torch.from_numpy(ops.sample_crop_boxes([30] * 12, [40] * 12, view.crop_scale, view.crop_ratio,
                                                       np.random.default_rng(v))).float()
        eager, compiled = (ops.make_view(images, boxes, view, spec.size, spec.mean, spec.std,
                                         torch.Generator().manual_seed(v), compiled=flag) for flag in (False, True))
        # Inductor fuses and reorders float arithmetic: equal to fp32 rounding (normalised units), not bitwise.
        torch.testing.assert_close(compiled, eager, rtol=0, atol=5e-5)
    assert counters["stats"]["unique_graphs"] == len(set(spec.views))  # MoCo v1 makes both views alike
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("recipe, extra", [
    ("simclr_resnet18_synthetic", ["data.compile=true"]),  # the augmentation's graphs too
    ("mocov2_resnet18_synthetic", ["method.queue_size=16"]),  # the queue write and shuffle BN
    ("mocov3_resnet18_synthetic", ["method.pred_hidden=32"]),  # the momentum schedule and symmetric loss
])
def test_five_training_steps_compile_once(tmp_path, monkeypatch, recipe, extra):
    """The trainer's own compile path (model.compile=true on the trainable networks) over 5 steps: every graph
    is built in the first step and none after it, with no graph break: the momentum update, the queue write and
    the loss stay outside the graphs, and the loop's shapes, dtypes and module flags stay fixed. (Counted per
    step rather than with dynamo's error_on_recompile: nn.Module.compile gives every compiled module the same
    wrapper code object, so a method's second network compiling on its first call counts as a "recompile".)"""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import fastssl.train as train_mod
    from fastssl.data.synthetic import make_synthetic_dataset

    data = tmp_path / "ds"
    make_synthetic_dataset(data, classes=2, train_per_class=8, val_per_class=1, size=16, seed=0)
    torch._dynamo.reset()
    cfg = load_config(ROOT / f"recipes/{recipe}.yaml", [
        f"data.path={data}/train", "eval.knn_val_path=", f"output_dir={tmp_path / 'run'}", "data.image_size=16",
        "data.batch_size=4", "data.workers=0", "train.max_steps=5", "train.log_every=1", "train.progress=false",
        "model.compile=true", "method.proj_hidden=32", "method.proj_dim=16", *extra])
    graphs, real_step = [], train_mod.optimizer_step

    def counting_step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        graphs.append(counters["stats"]["unique_graphs"])
        return out

    monkeypatch.setattr(train_mod, "optimizer_step", counting_step)
    counters.clear()
    train_mod.train(cfg)
    assert len(graphs) == 5 and graphs[0] >= 1  # the flag reached the networks
    assert graphs == [graphs[0]] * 5, graphs  # nothing compiled after the first step
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_a_drloc_methods_token_path_is_compiled_too():
    # With DRLoc the query ViT runs through encoder.forward_features (for the token grid), not encoder(x): the
    # compiled __call__ alone left it eager. Structure only (compilation is lazy): no graph is built here.
    from fastssl.step import compile_networks

    cfg = load_config(ROOT / "recipes/vit_small_data_mocov3_synthetic.yaml", ["data.image_size=32"])
    method = build_method(cfg)
    assert method.drloc is not None
    compile_networks(method)
    assert hasattr(method.encoder.forward_features, "_torchdynamo_orig_callable")


def test_no_working_compiler_is_a_one_line_error(tmp_path):
    """model.compile=true on a machine whose C++ compiler is missing (here: CXX names none): one line naming
    inductor's reason and the switches that train eager, exit 2, no traceback, no checkpoint."""
    from fastssl.data.synthetic import make_synthetic_dataset

    from conftest import assert_user_error, run_tool

    data = tmp_path / "ds"
    make_synthetic_dataset(data, classes=2, train_per_class=4, val_per_class=1, size=16, seed=0)
    proc = run_tool("tools/train.py", str(ROOT / "recipes/simclr_resnet18_synthetic.yaml"), f"data.path={data}/train",
                    "eval.knn_val_path=", f"output_dir={tmp_path / 'run'}", "data.image_size=16", "data.batch_size=4",
                    "data.workers=0", "train.max_steps=2", "train.progress=false", "model.compile=true",
                    env={"CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"})
    assert_user_error(proc, "torch.compile could not build its kernels", "No working C++ compiler",
                      "model.compile=false data.compile=false")
    assert proc.returncode == 2
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
