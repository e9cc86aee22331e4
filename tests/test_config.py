"""Recipes: strict keys, typed overrides, round trip, and the CLI's one-line errors."""

from __future__ import annotations

import pytest
import yaml

from fastssl.config import Config, config_to_dict, dump_config, load_config
from fastssl.errors import UserError

from conftest import ROOT, assert_user_error, run_tool


def test_overrides_are_typed_from_the_dataclass():
    cfg = load_config(None, ["optim.lr=0.5", "data.batch_size=64", "optim.betas=[0.9, 0.95]", "seed=3",
                             "train.progress=false", "optim.warmup_epochs=2"])
    assert cfg.optim.lr == 0.5 and cfg.data.batch_size == 64 and cfg.seed == 3
    assert cfg.optim.betas == (0.9, 0.95) and cfg.train.progress is False
    assert isinstance(cfg.optim.warmup_epochs, float)  # an int literal becomes the field's float
    assert load_config(None, ["optim.weight_decay=1e-4"]).optim.weight_decay == 1e-4  # YAML 1.1 reads a str
    # YAML reads `false` as a bool; a string field with true/false among its values takes it as written.
    assert load_config(None, ["model.compile=false"]).model.compile == "false"
    assert load_config(None, ["model.compile=true"]).model.compile == "true"


@pytest.mark.parametrize("text", ["12:30", "0777", "on", "2024-01-01", "null", "1e3"])
def test_text_settings_take_an_override_as_typed(text):
    # YAML 1.1 would read these as 750 (base 60), 511 (octal), true, a date, None and 1000.0: a run writing to
    # a folder nobody named. A string setting keeps the characters given.
    cfg = load_config(None, [f"output_dir={text}", f"data.path={text}"])
    assert cfg.output_dir == text and cfg.data.path == text


@pytest.mark.parametrize("override, fragments", [
    ("optim.lr=abc", ["optim.lr", "'abc'"]),
    ("optim.lrr=1", ["optim.lrr", "lr, lr_scaling"]),
    ("nosuch.x=1", ["nosuch", "data, model"]),
    ("nosuch=1", ["nosuch", "output_dir"]),
    ("data.batch_size=1.5", ["data.batch_size", "integer"]),
    ("train.progress=1", ["train.progress", "true or false"]),
    ("optim.betas=[0.9]", ["optim.betas", "2 values"]),
    ("lr", ["section.key=value"]),
])
def test_bad_overrides_name_the_key_and_what_was_expected(override, fragments):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)
    for f in fragments:
        assert f in str(e.value)


def test_unknown_key_in_a_recipe_lists_the_valid_keys(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  encodr: resnet18\n")
    with pytest.raises(UserError, match=r"unknown key model.encodr; valid keys in model: encoder"):
        load_config(p)


def test_dump_then_load_gives_the_same_config(tmp_path):
    cfg = load_config(ROOT / "recipes/simclr_resnet50_in1k.yaml", ["optim.betas=[0.8, 0.9]"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg
    assert set(yaml.safe_load(p.read_text())) == set(config_to_dict(Config()))


def test_every_shipped_recipe_loads():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    for r in recipes:
        load_config(r)


def test_cli_print_config_and_errors(tmp_path):
    ok = run_tool("tools/train.py", "recipes/simclr_resnet18_synthetic.yaml", "optim.lr=0.7", "--print-config")
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["optim"]["lr"] == 0.7
    # --print-config is a preflight: values, compile/precision choices and the method are checked, no data read
    for override, fragment in [("model.compile=banana", "model.compile 'banana'"), ("optim.lr=-1", "optim.lr=-1.0"),
                               ("model.encoder=resnet9000", "resnet9000")]:
        assert_user_error(run_tool("tools/train.py", "recipes/simclr_resnet18_synthetic.yaml", override,
                                   "--print-config", "data.path=/no/such/data"), fragment)
    assert_user_error(run_tool("tools/train.py", "recipes/simclr_resnet18_synthetic.yaml", "optim.lr=abc"),
                      "optim.lr", "'abc'")
    assert_user_error(run_tool("tools/train.py", "recipes/simclr_resnet18_synthetic.yaml", "optim.lrr=1"),
                      "optim.lrr", "valid keys")
    assert_user_error(run_tool("tools/train.py", str(tmp_path / "missing.yaml")), "missing.yaml", "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    assert_user_error(run_tool("tools/train.py", str(bad)), "bad.yaml", "YAML")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("# d\u00e9faut\nseed: 1\n".encode("latin-1"))
    assert_user_error(run_tool("tools/train.py", str(latin1), "--print-config"), "latin1.yaml",
                      "not UTF-8 text (byte 0xe9 at position 3)")


@pytest.mark.parametrize("override, fragment", [
    ("optim.lr=-1", "optim.lr=-1.0; expected a finite number > 0"),
    ("optim.lr=nan", "optim.lr=nan"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1.0; expected a finite number >= 0"),
    ("optim.momentum=5", "optim.momentum=5.0; expected in [0, 1)"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs=-1.0"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5]"),
    ("train.log_every=0", "train.log_every=0; expected >= 1"),
    ("train.grad_accum=0", "train.grad_accum=0; expected >= 1"),
    ("train.max_steps=-3", "train.max_steps=-3"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0"),
    ("train.checkpoint_every=-1", "train.checkpoint_every=-1"),
    ("method.proj_dim=0", "method.proj_dim=0"),
    ("eval.knn_k=0", "eval.knn_k=0"),
    ("eval.knn_t=0", "eval.knn_t=0.0"),
    ("output_dir=", "output_dir is empty"),
    ("seed=-1", "seed=-1; expected an integer in [0, 2**32 - 1]"),
    ("seed=4294967296", "seed=4294967296; expected an integer in [0, 2**32 - 1]"),  # accelerate's set_seed raised
    ("data.workers=-1", "data.workers=-1; expected >= 0"),
])
def test_out_of_range_values_are_one_line_errors(override, fragment):
    from fastssl.recipe_checks import check_values

    check_values(load_config(ROOT / "recipes/simclr_resnet18_synthetic.yaml"))  # the recipe itself passes
    with pytest.raises(UserError) as e:
        check_values(load_config(ROOT / "recipes/simclr_resnet18_synthetic.yaml", [override]))
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("recipe, overrides, fragment", [
    # The data and optimiser settings a backend or the optimiser would refuse only once data is read.
    ("simclr_resnet18_synthetic", ["data.batch_size=0"], "data.batch_size=0; expected the global batch"),
    ("simclr_resnet18_synthetic", ["data.backend=dalli"], "unknown data.backend 'dalli'"),
    ("simclr_resnet18_synthetic", ["data.image_size=0"], "data.image_size must be at least 8 pixels, got 0"),
    ("simclr_resnet18_synthetic", ["data.crop_scale=[0.9,0.1]"], "data.crop_scale must satisfy 0 < min <= max"),
    ("simclr_resnet18_synthetic", ["data.device=tpu"], "data.device='tpu'; expected auto, cpu or cuda"),
    ("simclr_resnet18_synthetic", ["data.augment=simclrr"], "unknown augmentation preset 'simclrr'"),
    ("simclr_resnet18_synthetic", ["optim.name=adamw2"], "unknown optimiser optim.name='adamw2'"),
    ("simclr_resnet18_synthetic", ["optim.lr_scaling=sqrtt"], "unknown optim.lr_scaling 'sqrtt'"),
    ("simclr_resnet18_synthetic", ["train.grad_accum=3"], "set train.allow_grad_accum=true"),
    ("simclr_resnet18_synthetic", ["train.grad_accum=2", "train.allow_grad_accum=true", "data.drop_last=false"],
     "train.grad_accum=2 with data.drop_last=false"),
    ("simclr_resnet18_synthetic", ["method.temperature=0"], "method.temperature must be > 0, got 0.0"),
    ("simclr_resnet18_synthetic", ["method.proj_layers=0"], "method.proj_layers must be >= 1, got 0"),
    ("mocov2_resnet18_synthetic", ["method.temperature=-0.1"], "method.temperature must be > 0, got -0.1"),
    ("mocov2_resnet18_synthetic", ["method.proj_layers=0"], "method.proj_layers must be >= 1 (1: MoCo v1's linear"),
    ("mocov3_vit_small_synthetic", ["method.drloc_weight=-1"], "method.drloc_weight must be >= 0 (0 = off), got -1"),
    ("mocov3_vit_small_synthetic", ["method.drloc_weight=0.1", "method.drloc_pairs=0"],
     "method.drloc_pairs must be >= 1, got 0"),
    ("mocov3_vit_small_synthetic", ["model.patch_size=-4"], "model.patch_size must be >= 0 (0: the encoder's own)"),
    ("mocov3_vit_small_synthetic", ["model.drop_path=1.0"], "model.drop_path must be in [0, 1), got 1.0"),
    ("mocov3_vit_small_synthetic", ["model.spt_lsa=true", "model.patch_size=1", "model.frozen_patch_embed=false"],
     "model.spt_lsa=true shifts by half a patch; it needs a patch size >= 2, got 1"),
])
def test_method_and_encoder_settings_are_checked_before_any_data(recipe, overrides, fragment):
    # tools/train.py --print-config runs check_recipe: the method and encoder refuse their own settings there.
    from fastssl.recipe_checks import check_recipe

    path = ROOT / f"recipes/{recipe}.yaml"
    check_recipe(load_config(path))  # the recipe itself passes
    with pytest.raises(UserError) as e:
        check_recipe(load_config(path, overrides))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_no_steps_at_all_is_an_error():
    from fastssl.recipe_checks import check_values

    with pytest.raises(UserError, match="nothing to train"):
        check_values(load_config(None, ["train.epochs=0", "train.max_steps=0"]))


def test_a_directory_is_not_a_recipe(tmp_path):
    with pytest.raises(UserError, match="is a directory; expected a YAML file"):
        load_config(tmp_path)
