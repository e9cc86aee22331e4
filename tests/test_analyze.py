"""tools/analyze.py as a user runs it: each subcommand writes a valid PNG of the expected layout, and each bad
input is one `error:` line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, assert_user_error, forbid, run_tool, save_perturbed_encoder
from PIL import Image

from fastssl.config import config_from_dict

SIZE = 32


def _folder(root, classes: int = 3, per_class: int = 3, size: int = 40):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.jpg")
    return root


def _checkpoint(path, encoder: str, **model):
    """Saved weights = the seeded init + noise, so they differ from the config seed's random init: a tool that
    ignored the file and rebuilt the encoder would be caught."""
    cfg = config_from_dict({"model": {"encoder": encoder, **model}, "data": {"image_size": SIZE}})
    save_perturbed_encoder(path / "encoder.pt", cfg, SIZE)
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
    # Killed mid-write, the last line cut short (here with bytes that are not even text): skipped, as the
    # trainer's own reader skips it.
    (run / "metrics.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"step": 50, "lo\xff\xfe')
    from fastssl.metrics import read_records

    assert read_records(run / "metrics.jsonl") == [json.loads(x) for x in lines]
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


def _damaged_run(tmp_path):
    run = tmp_path / "damaged"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 1.0}\n\xff\xfe\n{"step": 2, "loss": 0.9}\n')
    return run


def test_bad_inputs_are_one_line_errors(setup, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    cases = [
        (("attention", "--checkpoint", setup["resnet"], "--data", setup["data"], "--out", out),
         ["resnet18", "simclr", "need a ViT"]),
        (("attention", "--checkpoint", setup["vit"], "--images", "--out", out), ["image list is empty"]),
        (("attention", "--checkpoint", setup["vit"], "--images", setup["data"], "--out", out),
         [f"--images {setup['data']} is a folder; expected image files"]),
        (("cka", "--checkpoint", setup["vit"], "--out", out), ["--data"]),
        (("cka", "--checkpoint", setup["vit"], "--data", setup["data"], "--num-images", "0", "--out", out),
         [">= 1, got 0"]),
        (("cka", "--checkpoint", setup["vit"], "--data", setup["data"], "--out", str(tmp_path / "x.jpg")),
         [".png"]),
        (("curves", str(tmp_path), "--out", out), ["metrics.jsonl"]),
        (("curves", str(_damaged_run(tmp_path)), "--out", out), ["metrics.jsonl: line 2 is not JSON"]),
        (("views", str(ROOT / "recipes/simclr_resnet18_synthetic.yaml"), f"data.path={setup['data']}", "seed=-1",
          "--out", out), ["seed=-1; expected an integer in [0, 2**32 - 1]"]),
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


@pytest.mark.parametrize("argv, fragment", [
    (("cka", "--batch-size", "0"), "--batch-size 0; expected >= 1"),
    (("cka", "--json", "/proc/k.json"), "--json '/proc/k.json': cannot create files in folder '/proc'"),
    (("cka", "--json", "FOLDER"), "is a folder"),
    (("cka", "--out", "/proc/k.png"), "--out '/proc/k.png': cannot create files"),
    (("cka", "--device", "banana"), "--device 'banana'; expected auto, cpu or cuda"),
    (("cka", "--device", "cuda"), "--device cuda but torch sees no CUDA GPU"),
    (("attention", "--device", "cuda"), "--device cuda but torch sees no CUDA GPU"),
])
def test_options_are_checked_before_any_encoder_is_loaded(argv, fragment, setup, tmp_path, monkeypatch, capsys):
    import fastssl.checkpoint

    forbid(monkeypatch, fastssl.checkpoint, "load_encoder", "encoder loaded before the options were checked")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [str(tmp_path) if a == "FOLDER" else a for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "x.png")]
    assert _main(*argv, "--checkpoint", setup["vit"], "--data", setup["data"], *out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_curves_to_an_unwritable_folder_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert _main("curves", str(run), "--out", "/proc/v.png") == 2
    assert "cannot create files in folder '/proc'" in capsys.readouterr().err


def test_a_failed_png_write_is_a_user_error_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    from fastssl.analysis import plots
    from fastssl.errors import UserError

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plots.os, "replace", disk_full)  # the folder passed the check; the write itself fails
    with pytest.raises(UserError, match="cannot write .*v.png.*No space left on device"):
        plots.curves_figure([{"step": 1, "loss": 1.0}], tmp_path / "v.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, fragment", [
    ('{"step": 1, "loss": 2}\nnot json\n{"step": 2, "loss": 1}\n', "line 2 is not JSON"),
    ("garbage\n", "line 1 is not JSON"),  # was "holds no records yet"
    ('{"step": 1, "loss": 2}\n[1, 2]\n', "line 2 is a JSON list"),
])
def test_curves_on_a_malformed_metrics_file_names_the_line(text, fragment, tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(text)
    assert _main("curves", str(tmp_path), "--out", str(tmp_path / "c.png")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_views_says_when_the_folder_holds_fewer_images_than_asked(setup, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  path: {setup['data']}\n  image_size: {SIZE}\n  workers: 0\n")
    out = tmp_path / "views.png"
    # Overrides between options, as tools/train.py takes them.
    assert _main("views", str(recipe), "--num-images", "50", "data.device=cpu", "--out", str(out), "--device", "cpu",
                 "data.augment=mocov3") == 0
    captured = capsys.readouterr()
    assert "holds only 9 images; using all 9 (--num-images 50)" in captured.err
    assert "mocov3 preset" in captured.out and "of 9 images" in captured.out
    _png(out)
