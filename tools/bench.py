#!/usr/bin/env python
"""Benchmarks: `python tools/bench.py SUBCOMMAND [options] [--json OUT] [--plot OUT.png]`.

Each subcommand prints a table, and writes its fastssl.bench.record.BenchRecord as JSON (--json) and a plot
(--plot). `python tools/bench.py SUBCOMMAND --help` lists its options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastssl.errors import ArgumentParser, cli_main  # noqa: E402
from fastssl.fileio import check_output_file  # noqa: E402

# name -> (module, one-line help). A module provides HELP, add_arguments(parser), run(args) -> BenchRecord,
# show(record) (the table) and plot(record, path). Only the chosen module is imported: `loss` should not
# pay for the imports of `model`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "loss": ("fastssl.bench.loss", "peak memory and fwd+bwd time of the contrastive loss impls over N and D"),
    "loader": ("fastssl.bench.loader", "views/s and CPU per input backend (torch, dali, ffcv, PIL baseline)"),
    "augment": ("fastssl.bench.augment", "on-device augmentation alone: view-pairs/s, eager vs torch.compile"),
    "model": ("fastssl.bench.model", "training step minus I/O: images/s, TFLOP/s and MFU, eager vs compiled"),
    "step": ("fastssl.bench.step", "real step with the real loader: input-bound ratio and data-wait share"),
}


def build_parser(argv: list[str]) -> ArgumentParser:
    parser = ArgumentParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.add_argument("--json", metavar="OUT", help="write the BenchRecord here (JSON)")
            p.add_argument("--plot", metavar="OUT.png", help="write the plot here (PNG)")
            p.set_defaults(module=module)
    return parser


def check_outputs(args) -> None:
    """--json and --plot of every subcommand, before a benchmark that may run for minutes."""
    if args.json:
        check_output_file(args.json, "--json")
    if args.plot:
        check_output_file(args.plot, "--plot", suffix=".png")


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Intermixed: `step`/`model` take section.key=value overrides that may sit between options, as in train.py.
    args = build_parser(argv).parse_command_args(argv)
    check_outputs(args)
    record = args.module.run(args)
    args.module.show(record)
    if args.json:
        record.write(args.json)
        print(f"wrote {args.json}")
    if args.plot:
        args.module.plot(record, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
