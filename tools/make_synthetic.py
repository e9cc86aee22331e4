"""Write the embedded dataset: a deterministic ImageFolder of procedurally drawn shapes (no download)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout, uninstalled

import argparse  # noqa: E402

from fastssl.data.synthetic import FAMILY_NAMES, make_synthetic_dataset  # noqa: E402
from fastssl.errors import ArgumentParser, cli_main, sigterm_as_interrupt  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("out", help="output folder; gets OUT/train/<class>/*.jpg and OUT/val/<class>/*.jpg")
    p.add_argument("--classes", type=int, default=10, help=f"number of shape families, 2-{len(FAMILY_NAMES)}")
    p.add_argument("--train-per-class", type=int, default=260)
    p.add_argument("--val-per-class", type=int, default=60)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true",
                   help="replace a previous dataset of this tool at OUT once the new one is complete")
    return p.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    with sigterm_as_interrupt():  # a scheduler's time limit: remove the partial folder as Ctrl-C does
        summary = make_synthetic_dataset(a.out, a.classes, a.train_per_class, a.val_per_class, a.size, a.seed,
                                         force=a.force)
    print(summary)


if __name__ == "__main__":
    sys.exit(main())
