"""Convert an ImageFolder to tar shards (webdataset layout) with the index files DALI's reader needs."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout, uninstalled

import argparse  # noqa: E402

from fastssl.data.shards import convert_image_folder  # noqa: E402
from fastssl.errors import ArgumentParser, cli_main, sigterm_as_interrupt  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("imagefolder", help="source dataset, IMAGEFOLDER/<class>/<image>")
    p.add_argument("out_dir", help="output folder (written elsewhere and renamed into place when complete)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per tar shard")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    p.add_argument("--overwrite", action="store_true", help="replace a previous conversion at OUT_DIR")
    return p.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    with sigterm_as_interrupt():  # a scheduler's time limit: remove the partial folder as Ctrl-C does
        s = convert_image_folder(a.imagefolder, a.out_dir, shard_size=a.shard_size, workers=a.workers,
                                 overwrite=a.overwrite)
    for path, reason in s.skipped:
        print(f"skipped corrupt image {path}: {reason}", file=sys.stderr)
    print(f"wrote {s.num_samples} images of {len(s.classes)} classes in {s.num_shards} shards to {s.out_dir}"
          f" (skipped {len(s.skipped)} corrupt, re-encoded {s.reencoded} non-JPEG as JPEG)")


if __name__ == "__main__":
    sys.exit(main())
