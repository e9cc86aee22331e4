"""tools/analyze.py as a user runs it: each subcommand writes a valid PNG of the expected layout, and each bad
input is one `error:` line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_tool
from PIL import Image

from fastssl.config import config_from_dict, config_to_dict
from fastssl.encoders import create_encoder

SIZE = 32


def _folder(root, classes: int = 3, per_class: int = 3, size: int = 40):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.jpg")
    return root


def _checkpoint(path, encoder: str, **model):
    """Saved weights = the seeded init + N(0, 0.05) noise, so they differ from the config seed's random init:
    a tool that ignored the file and rebuilt the encoder would be caught."""
    cfg = config_from_dict({"model": {"encoder": encoder, **model}, "data": {"image_size": SIZE}})
    torch.manual_seed(cfg.seed)
    enc = create_encoder(cfg.model, SIZE)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path.mkdir(parents=True)
    torch.save({"encoder": enc.state_dict(), "config": config_to_dict(cfg), "step": 7}, path / "encoder.pt")
    return str(path)


def _png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()  # a full decode: a truncated file fails here
        assert im.format == "PNG" and im.mode in ("RGB", "RGBA")
        return im.size


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    return {"tmp": tmp, "data": str(_folder(tmp / "data")),
            "resnet": _checkpoint(tmp / "resnet", "resnet18", small_input=True),
            "vit": _checkpoint(tmp / "vit", "vit_pico")}


def _main(*argv) -> int:
    from tools.analyze import main

    return main(list(argv))


def test_cka_self_and_against_random_init(setup, tmp_path):
    out, js = tmp_path / "cka.png", tmp_path / "cka.json"
    assert _main("cka", "--checkpoint", setup["resnet"], "--data", setup["data"], "--num-images", "8",
                 "--out", str(out), "--json", str(js), "--device", "cpu") == 0
    w, h = _png(out)
    assert w > 200 and h > 200
    res = json.loads(js.read_text())
    m = np.array(res["cka"])
    assert res["num_images"] == 8 and m.shape == (10, 10) and res["layers_a"][-1] == "output"
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-5)  # every layer against itself
    assert _main("cka", "--checkpoint", setup["resnet"], "--random-init-b", "--data", setup["data"],
                 "--num-images", "6", "--out", str(out), "--json", str(js), "--device", "cpu") == 0
    # Columns: the same architecture re-initialised from the config seed, i.e. other weights. Every layer is
    # then below the self-CKA of 1 (to 1e-5) above; a tool that dropped the saved weights would give 1 here too.
    diag = np.diag(np.array(json.loads(js.read_text())["cka"]))
    assert np.all(diag < 0.999) and np.all(diag > 0.5), diag  # measured 0.95-0.997: same architecture and input


def test_cka_between_a_resnet_and_a_vit(setup, tmp_path):
    out, js = tmp_path / "cka.png", tmp_path / "cka.json"
    assert _main("cka", "--checkpoint", setup["resnet"], "--checkpoint-b", setup["vit"], "--data", setup["data"],
                 "--num-images", "5", "--out", str(out), "--json", str(js), "--device", "cpu") == 0
    res = json.loads(js.read_text())
    assert np.array(res["cka"]).shape == (10, 1 + 4 + 1)  # patch_embed, 4 blocks, output
    _png(out)


def test_attention_grid_png(setup, tmp_path):
    out = tmp_path / "att.png"
    assert _main("attention", "--checkpoint", setup["vit"], "--data", setup["data"], "--num-images", "3",
                 "--out", str(out), "--device", "cpu") == 0
    w, h = _png(out)
    assert w > h  # 3 rows of image + rollout + 3 heads: wider than tall


def test_curves_png(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": s, "epoch": s // 10, "loss": 5 - s / 10, "lr": 0.1, "images_per_s": 100.0})
             for s in range(5, 45, 5)]
    lines.insert(3, json.dumps({"step": 20, "epoch": 2, "knn_top1": 40.0, "knn_top5": 90.0}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 50, "lo')  # killed mid-write
    out = tmp_path / "curves.png"
    assert _main("curves", str(run), "--out", str(out)) == 0  # a run still going: no summary.json yet
    _png(out)
    (run / "summary.json").write_text(json.dumps({"steps": 40, "knn_top1": 55.0, "knn_top1_random_init": 12.0}))
    assert _main("curves", str(run), "--out", str(out)) == 0
    assert _png(out)[0] > 3 * _png(out)[1]  # four panels side by side


def test_views_from_the_torch_backend(setup, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  path: {setup['data']}\n  image_size: {SIZE}\n  workers: 0\n  device: cpu\n")
    out = tmp_path / "views.png"
    assert _main("views", str(recipe), "data.augment=mocov3", "--num-images", "5", "--out", str(out),
                 "--device", "cpu") == 0
    w, h = _png(out)
    assert w > 2 * h  # 2 rows (views) x 5 columns (images)


def test_bad_inputs_are_one_line_errors(setup, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    cases = [
        (("attention", "--checkpoint", setup["resnet"], "--data", setup["data"], "--out", out),
         ["resnet18", "simclr", "need a ViT"]),
        (("attention", "--checkpoint", setup["vit"], "--images", "--out", out), ["image list is empty"]),
        (("cka", "--checkpoint", setup["vit"], "--out", out), ["--data"]),
        (("cka", "--checkpoint", setup["vit"], "--data", setup["data"], "--num-images", "0", "--out", out),
         [">= 1, got 0"]),
        (("cka", "--checkpoint", setup["vit"], "--data", setup["data"], "--out", str(tmp_path / "x.jpg")),
         [".png"]),
        (("curves", str(tmp_path), "--out", out), ["metrics.jsonl"]),
        (("cka", "--checkpoint", str(tmp_path / "missing"), "--data", setup["data"], "--out", out),
         ["does not exist"]),
    ]
    for argv, fragments in cases:
        assert _main(*argv, "--device", "cpu") == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
        for frag in fragments:
            assert frag in err[0], (argv, err[0])
    assert not (tmp_path / "x.png").exists()


def test_tool_runs_as_a_script_and_fails_cleanly(setup, tmp_path):
    proc = run_tool("tools/analyze.py", "attention", "--checkpoint", setup["resnet"], "--data", setup["data"],
                    "--out", str(tmp_path / "a.png"), "--device", "cpu")
    assert_user_error(proc, "need a ViT")
    assert run_tool("tools/analyze.py", "--help").returncode == 0
