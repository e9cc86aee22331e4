"""Checkpoints on disk: load_encoder gives back exactly the weights that were saved (random_init, the seeded
build of the saved config); a run directory resolves through `latest`, else the newest step_*; unreadable
files and empty folders are one-line errors naming the path; a failed save leaves the previous checkpoint."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fastssl import checkpoint as ckpt_mod
from fastssl.checkpoint import (latest_checkpoint, list_checkpoints, load_encoder, load_encoder_checkpoint,
                                save_checkpoint)
from fastssl.config import config_from_dict
from fastssl.encoders import create_encoder
from fastssl.errors import UserError

from conftest import ROOT, save_perturbed_encoder

SEED = 3  # not 0: a loader that seeded with a constant instead of the config's seed would show


def _perturbed_checkpoint(path):
    """An encoder.pt whose weights are the seeded init plus N(0, 0.05) noise: they differ from anything
    load_encoder could build on its own, so only reading the file can reproduce them."""
    cfg = config_from_dict({"model": {"encoder": "vit_pico"}, "data": {"image_size": 16}, "seed": SEED})
    return save_perturbed_encoder(path, cfg, 16).state_dict(), cfg


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_encoder_returns_the_saved_weights_and_random_init_the_seeded_build(tmp_path):
    saved, cfg = _perturbed_checkpoint(tmp_path / "encoder.pt")
    enc, got_cfg = load_encoder(tmp_path / "encoder.pt")
    assert got_cfg == cfg and not enc.training
    assert _same(enc.state_dict(), saved)  # the oracle: the tensors torch.save wrote, bit for bit

    rand, _ = load_encoder(tmp_path / "encoder.pt", random_init=True)
    torch.manual_seed(SEED)  # the oracle: a fresh build of the saved config under its own seed
    fresh = create_encoder(cfg.model, cfg.data.image_size).state_dict()
    assert _same(rand.state_dict(), fresh)
    assert not _same(rand.state_dict(), saved)  # so the first check above could fail


def _tiny(path, step: int) -> None:
    """An encoder.pt that load_encoder_checkpoint accepts; the step number tells which file was read."""
    path.mkdir(parents=True, exist_ok=True)
    torch.save({"encoder": {}, "config": {}, "step": step}, path / ckpt_mod.ENCODER_FILE)


@pytest.mark.parametrize("pointer,want", [("step_00000002\n", 2), (None, 5), ("step_00000009\n", 5), ("", 5),
                                          ("..\n", 5)])
def test_a_run_directory_resolves_through_latest_else_the_newest_step(tmp_path, pointer, want):
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (2, 5):
        _tiny(ckpts / f"step_{step:08d}", step)
    _tiny(ckpts / ".tmp-step_00000008", 8)  # an unfinished save is never a candidate
    if pointer is not None:  # None: no pointer; step_9 dangles; "" and ".." are not step folders
        (ckpts / "latest").write_text(pointer)
    assert load_encoder_checkpoint(tmp_path / "run")["step"] == want
    assert latest_checkpoint(tmp_path / "run") == ckpts / f"step_{want:08d}"
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002", "step_00000005"]
    # A checkpoint folder or the file itself is taken as given.
    assert load_encoder_checkpoint(ckpts / "step_00000002")["step"] == 2
    assert load_encoder_checkpoint(ckpts / "step_00000005" / ckpt_mod.ENCODER_FILE)["step"] == 5


# Each kind of bad file with the exception torch 2.x's load raises for it (a non-zip file is parsed as a
# legacy pickle, so its first bytes decide): every one must become the same one-line UserError.
UNREADABLE = {
    "truncated": lambda good: good[: len(good) // 2],  # OSError: the zip's central directory is gone
    "head only": lambda good: good[:10],  # RuntimeError: not a ZIP archive
    "damaged zip header": lambda good: b"XXXX" + good[4:],  # UnicodeDecodeError (a ValueError)
    "random bytes": lambda good: np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "empty": lambda good: b"",  # EOFError
    "recipe text": lambda good: b"model: resnet18\nthis is a recipe, not a checkpoint\n",  # UnpicklingError
    "hello text": lambda good: b"hello world\n",  # KeyError: 'h' is a memo lookup of 'e'
    "one byte": lambda good: b"K",  # IndexError
    "cut integer": lambda good: b"J\x00",  # struct.error
    "foreign pickle": lambda good: pickle.dumps({"encoder": object()}),  # UnpicklingError
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the foreign pickle's, from torch.load
@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_an_unreadable_encoder_file_is_a_one_line_error_naming_it(tmp_path, kind):
    good = tmp_path / "good.pt"
    torch.save({"encoder": {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}, "config": {},
                "step": 1}, good)
    bad = tmp_path / "step_00000001" / ckpt_mod.ENCODER_FILE
    bad.parent.mkdir()
    bad.write_bytes(UNREADABLE[kind](good.read_bytes()))
    with pytest.raises(UserError) as e:
        load_encoder(bad.parent)
    msg = str(e.value)
    assert "\n" not in msg and f"cannot read checkpoint {str(bad)!r}" in msg and "truncated or corrupt" in msg


@pytest.mark.parametrize("content, hint", [({"weights": 1}, False), ({"encoder.conv1.weight": torch.zeros(1)}, True)])
def test_a_readable_file_that_is_not_an_encoder_checkpoint_says_so(tmp_path, content, hint):
    # accelerate's pytorch_model.bin (keys "encoder.*") is the likely mix-up: the message points at the step folder.
    f = tmp_path / "model.pt"
    torch.save(content, f)
    with pytest.raises(UserError) as e:
        load_encoder_checkpoint(f)
    msg = str(e.value)
    assert f"{str(f)!r} is not a fastssl encoder checkpoint (expected keys encoder, config)" in msg
    assert ("it looks like accelerate's training state: pass its step_* folder" in msg) == hint and "\n" not in msg


def test_a_foreign_pickle_is_one_line_without_torchs_protocol_notice(tmp_path):
    import pickle
    import warnings

    f = tmp_path / "other.pkl"
    f.write_bytes(pickle.dumps({"weights": [1, 2]}, protocol=4))  # torch's loader warns on protocols > 2
    with warnings.catch_warnings(record=True) as seen, pytest.raises(UserError, match="cannot read checkpoint"):
        warnings.simplefilter("always")
        load_encoder_checkpoint(f)
    assert [str(w.message) for w in seen] == []


def test_a_hand_edited_config_is_named_not_a_traceback(tmp_path):
    f = tmp_path / "model.pt"
    torch.save({"encoder": {"w": torch.zeros(1)}, "config": "resnet18", "step": 1}, f)
    with pytest.raises(UserError) as e:
        load_encoder(f)
    assert "holds a str config and a dict encoder; expected a config mapping and a state dict" in str(e.value)


def test_a_bug_inside_torch_load_is_not_reported_as_a_bad_file(tmp_path, monkeypatch):
    _tiny(tmp_path, 1)

    def broken(*a, **kw):
        raise TypeError("load() got an unexpected keyword argument")

    monkeypatch.setattr(ckpt_mod.torch, "load", broken)
    with pytest.raises(TypeError, match="unexpected keyword"):
        load_encoder_checkpoint(tmp_path)


def test_no_checkpoint_found_names_the_directory(tmp_path):
    run = tmp_path / "run"
    _tiny(run / "checkpoints" / ".tmp-step_00000004", 4)  # only an unfinished save
    for where in (run, tmp_path / "empty"):
        where.mkdir(exist_ok=True)
        with pytest.raises(UserError, match=f"no checkpoint found in {str(where)!r}"):
            load_encoder(where)
    with pytest.raises(UserError, match="does not exist"):
        load_encoder(tmp_path / "missing")


class _FakeAccelerator:
    """The three members save_checkpoint uses, on one process; save_state writes a file and can fail half-way."""

    is_main_process = True
    num_processes = 1

    def __init__(self):
        self.fail = False

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, path: str, safe_serialization: bool = True) -> None:
        Path(path).mkdir()
        (Path(path) / "model.bin").write_text("partial" if self.fail else "state")
        if self.fail:
            raise OSError("disk full (simulated)")


def test_save_checkpoint_prunes_to_keep_and_a_failed_save_leaves_the_previous_one(tmp_path):
    acc, enc = _FakeAccelerator(), torch.nn.Linear(2, 2)
    for step in (1, 2, 3, 4):
        save_checkpoint(acc, tmp_path, step, enc, {"step": step}, keep=2)
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert (ckpts / "latest").read_text() == "step_00000004\n"
    before = {p.name: p.read_bytes() for p in (ckpts / "step_00000004").iterdir()}
    assert set(before) == {"model.bin", ckpt_mod.ENCODER_FILE}

    acc.fail = True
    with pytest.raises(UserError, match=f"cannot write checkpoint step_00000005 to {ckpts}: disk full \\(simulated\\); "
                                        f"the last complete checkpoint is step_00000004"):
        save_checkpoint(acc, tmp_path, 5, enc, {"step": 5}, keep=2)
    assert latest_checkpoint(tmp_path) == ckpts / "step_00000004"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert {p.name: p.read_bytes() for p in (ckpts / "step_00000004").iterdir()} == before
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000003", "step_00000004"]

    acc.fail = False
    save_checkpoint(acc, tmp_path, 6, enc, {"step": 6}, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006"]
    assert load_encoder_checkpoint(tmp_path)["step"] == 6


# What a full disk makes torch.save raise (its zip writer checks each write; no errno survives), and the OS's own.
DISK_FULL = [OSError(28, "No space left on device"),
             RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 25801600 vs 25801488"),
             RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                          "data/3: file write failed")]


@pytest.mark.parametrize("error", DISK_FULL, ids=["ENOSPC", "unexpected-pos", "file-write-failed"])
def test_a_write_the_disk_refuses_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, error):
    # Oracle: the project rule (one line naming what failed and what is kept; nothing half-written replaces a
    # good checkpoint), with torch's own messages for a full disk.
    acc, enc, ckpts = _FakeAccelerator(), torch.nn.Linear(2, 2), tmp_path / "checkpoints"
    save_checkpoint(acc, tmp_path, 2, enc, {"step": 2})
    before = {p.name: p.read_bytes() for p in (ckpts / "step_00000002").iterdir()}
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if ".tmp-step_00000004" in str(f):
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", full)
    with pytest.raises(UserError) as e:
        save_checkpoint(acc, tmp_path, 4, enc, {"step": 4})
    why = "No space left on device" if isinstance(error, OSError) else "torch's file write stopped short with "
    assert str(e.value).startswith(f"cannot write checkpoint step_00000004 to {ckpts}: {why}"), e.value
    assert str(e.value).endswith(f"the last complete checkpoint is step_00000002; make room (or fix the folder), "
                                 f"then continue with `python tools/train.py {tmp_path / 'config.yaml'} "
                                 f"resume={tmp_path}`")
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000002"]  # no .tmp-step_00000004
    assert {p.name: p.read_bytes() for p in (ckpts / "step_00000002").iterdir()} == before

    with pytest.raises(UserError, match="no checkpoint yet: make room"):  # nothing to fall back on
        save_checkpoint(acc, tmp_path / "new", 4, enc, {"step": 4})
    assert sorted(p.name for p in (tmp_path / "new" / "checkpoints").iterdir()) == []


def test_a_bug_while_saving_keeps_its_traceback(tmp_path, monkeypatch):
    # Only failed writes are the user's: any other RuntimeError from torch.save is a bug and stays one.
    def bug(obj, f, *args, **kwargs):
        raise RuntimeError("Tried to serialize object of unknown type")

    monkeypatch.setattr(ckpt_mod.torch, "save", bug)
    with pytest.raises(RuntimeError, match="unknown type"):
        save_checkpoint(_FakeAccelerator(), tmp_path, 4, torch.nn.Linear(2, 2), {})
    assert list((tmp_path / "checkpoints").iterdir()) == []


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from fastssl.data.synthetic import make_synthetic_dataset

    out = tmp_path_factory.mktemp("synthetic") / "ds"
    make_synthetic_dataset(out, classes=4, train_per_class=10, val_per_class=1, size=32, seed=0)
    return out


def test_a_full_disk_at_the_second_checkpoint_stops_training_with_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    # Through the trainer and its command line, as the reviewer's full disk did: the first checkpoint is written,
    # the second one's files are refused (torch's RuntimeError from its zip writer), whichever file comes first.
    from tools.train import main

    out, real_save = tmp_path / "run", torch.save

    def full(obj, f, *args, **kwargs):
        if ".tmp-step_00000004" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 25801600 vs 25801488")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", full)
    rc = main([str(ROOT / "recipes/simclr_resnet18_synthetic.yaml"), f"data.path={tiny_data}/train",
               "eval.knn_val_path=", f"output_dir={out}", "data.image_size=32", "data.batch_size=8",
               "data.workers=0", "train.max_steps=4", "train.checkpoint_every=2", "train.progress=false",
               "method.proj_hidden=64", "method.proj_dim=32", "model.compile=false", "data.compile=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot write checkpoint step_00000004 to "
                                                    f"{out / 'checkpoints'}: torch's file write stopped short"), err
    assert "the last complete checkpoint is step_00000002; " in err
    assert latest_checkpoint(out).name == "step_00000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert load_encoder_checkpoint(out)["step"] == 2


def test_save_checkpoint_clears_temporary_folders_left_by_a_killed_save(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for name in (".tmp-step_00000003", ".tmp-step_00000007"):  # killed saves: their `finally` never ran
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "model.bin").write_text("partial")
    (ckpts / ".tmp-notes").write_text("not ours")
    save_checkpoint(_FakeAccelerator(), tmp_path, 4, torch.nn.Linear(2, 2), {}, keep=2)
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-notes", "latest", "step_00000004"]
