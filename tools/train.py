#!/usr/bin/env python
"""Pre-train an encoder: `python tools/train.py RECIPE.yaml [section.key=value ...]` (also under
`accelerate launch`). Writes the run directory named by `output_dir`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastssl.errors import ArgumentParser, cli_main  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    # default=[]: without one, argparse counts a nargs="*" positional as required and names it, next to the
    # recipe, when the recipe is missing.
    p.add_argument("overrides", nargs="*", default=[],
                   help="section.key=value overrides, e.g. optim.lr=0.5 resume=RUN_DIR")
    p.add_argument("--print-config", action="store_true",
                   help="check the recipe (values, method, encoder; no data read), print it resolved and exit")
    args = p.parse_intermixed_args(argv)  # options may sit between the recipe and its overrides

    from fastssl.config import dump_config, load_config
    from fastssl.recipe_checks import check_recipe
    from fastssl.train import train

    cfg = load_config(args.recipe, args.overrides)
    if args.print_config:
        check_recipe(cfg)
        print(dump_config(cfg), end="")
        return 0
    summary = train(cfg)
    if summary.get("signal"):
        # Stopped by a cluster's signal: 128 + its number, as a process it had killed, so that `train && eval`
        # does not go on to evaluate a part-trained encoder. (train.stop_after_steps, asked for, exits 0.)
        import signal

        return 128 + getattr(signal, summary["signal"], signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
