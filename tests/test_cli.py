"""What every tool under tools/ shares (fastssl/errors.py): argparse's errors as one `error:` line, the
`[rank N]` tag of a distributed launch, the up-front output-path check, the device choice. In-process: each
tool's main() is called as `python tools/<tool>.py` would call it, without a new interpreter per case."""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import ROOT
from fastssl.errors import ArgumentParser, UserError, cli_main, resolve_device

# One bad command line per tool: a bad value, a bad choice, a missing argument or an unknown option.
BAD_ARGS = {
    "analyze": (["cka", "--checkpoint", "c", "--out", "x.png", "--batch-size", "abc"], "'abc'"),
    "bench": (["loss", "--repeats", "abc"], "'abc'"),
    "convert_dali": (["in", "out", "--shard-size", "x"], "'x'"),
    "convert_ffcv": (["in", "out.beton", "--write-mode", "zip"], "'zip'"),
    "eval": (["svm", "--checkpoint", "c"], "'svm'"),
    "make_synthetic": (["out", "--size", "abc"], "'abc'"),
    "train": ([], "recipe"),
}


def test_every_tool_has_a_bad_command_line_case():
    assert set(BAD_ARGS) == {p.stem for p in (ROOT / "tools").glob("*.py")}


@pytest.mark.parametrize("tool", sorted(BAD_ARGS))
def test_argparse_errors_are_one_line_without_usage(tool, capsys):
    argv, value = BAD_ARGS[tool]
    main = importlib.import_module(f"tools.{tool}").main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("(see --help)"), lines
    assert value in lines[0] and "usage" not in captured.err + captured.out


def test_train_without_arguments_asks_for_the_recipe_only(capsys):
    from tools.train import main

    with pytest.raises(SystemExit):
        main([])
    err = capsys.readouterr().err
    assert "required: recipe" in err and "overrides" not in err, err


@pytest.mark.parametrize("argv, fragment", [
    (["step", "--bogus"], "unrecognized arguments: --bogus"),  # the sub-parser's own error
    (["foo"], "invalid choice: 'foo'"),
    ([], "required"),
])
def test_bench_subcommand_errors_are_one_line(argv, fragment, capsys):
    from tools.bench import main

    with pytest.raises(SystemExit):
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


def test_sub_parsers_are_the_one_line_parser():
    sub = ArgumentParser(prog="t").add_subparsers(dest="command")
    assert isinstance(sub.add_parser("x"), ArgumentParser)


def test_overrides_may_sit_between_options_of_a_subcommand():
    p = ArgumentParser(prog="t")
    s = p.add_subparsers(dest="command", required=True).add_parser("step")
    s.add_argument("overrides", nargs="*", default=[])
    s.add_argument("--batch", default="")
    args = p.parse_command_args(["step", "data.path=X", "--batch", "8", "data.image_size=32"])
    assert (args.command, args.overrides, args.batch) == ("step", ["data.path=X", "data.image_size=32"], "8")


# --- the rank tag ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, prefix", [
    ({}, "error: bad key"),
    ({"WORLD_SIZE": "1", "RANK": "0"}, "error: bad key"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "error: bad key"),  # the main process: as a single-process run
    ({"WORLD_SIZE": "2", "RANK": "1"}, "error: [rank 1] bad key"),
    ({"WORLD_SIZE": "8", "RANK": "5"}, "error: [rank 5] bad key"),
])
def test_every_rank_prints_and_non_main_ranks_say_which(env, prefix, monkeypatch, capsys):
    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    @cli_main
    def main():
        raise UserError("bad key")

    assert main() == 2
    assert capsys.readouterr().err.strip().splitlines() == [prefix]
    with pytest.raises(SystemExit):
        ArgumentParser(prog="t").parse_args(["--nope"])
    line = capsys.readouterr().err.strip()
    assert line.startswith(prefix.replace("bad key", "unrecognized arguments")), line


# --- outputs and devices ----------------------------------------------------------------------------------------

def test_device_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == resolve_device("cpu") == "cpu"
    with pytest.raises(UserError, match="--device 'banana'; expected auto, cpu or cuda"):
        resolve_device("banana")
    with pytest.raises(UserError, match="--device cuda but torch sees no CUDA GPU"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("cuda") == "cuda" and resolve_device("cpu") == "cpu"
