"""Convert an ImageFolder (ROOT/<class>/<image>) into an FFCV .beton for `data.backend=ffcv`.

Corrupt images are reported by name and skipped; the file is written beside OUT and renamed into place
only when complete. An existing OUT is replaced only with --overwrite. Needs the ffcv extra
(`bash .ci/install_ffcv.sh .venv`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout, uninstalled

import argparse  # noqa: E402

from fastssl.data.beton import WRITE_MODES, convert_image_folder, print_skipped  # noqa: E402
from fastssl.errors import ArgumentParser, cli_main, sigterm_as_interrupt  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("imagefolder", help="ImageFolder root: ROOT/<class>/<image>")
    p.add_argument("out", help="output file, ending in .beton")
    p.add_argument("--max-resolution", type=int, default=0,
                   help="cap the longest side at R pixels before storing (0: keep the original size)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of stored images, 1-100")
    p.add_argument("--write-mode", choices=WRITE_MODES, default="jpg",
                   help="jpg: all JPEG; raw: all pixels (~10x faster decode, ~10x larger); smart: raw below "
                        "--smart-threshold bytes; proportion: JPEG with --compress-probability")
    p.add_argument("--compress-probability", type=float, default=0.5, help="for --write-mode proportion")
    p.add_argument("--smart-threshold", type=int, default=None,
                   help="for --write-mode smart: raw images larger than this many bytes are stored as JPEG")
    p.add_argument("--workers", type=int, default=1, help="processes that check and encode images")
    p.add_argument("--chunk-size", type=int, default=100, help="images per work item of a writer process")
    p.add_argument("--page-mib", type=int, default=8, help="ffcv page size in MiB (a power of two >= 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (once the new file is complete)")
    return p.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    with sigterm_as_interrupt():  # a scheduler's time limit: remove the partial file as Ctrl-C does
        s = convert_image_folder(a.imagefolder, a.out, max_resolution=a.max_resolution, jpeg_quality=a.jpeg_quality,
                                 write_mode=a.write_mode, compress_probability=a.compress_probability,
                                 smart_threshold=a.smart_threshold, workers=a.workers, chunk_size=a.chunk_size,
                                 page_mib=a.page_mib, overwrite=a.overwrite, report=print_skipped)
    skipped = f", skipped {len(s.skipped)} corrupt image(s)" if s.skipped else ""
    print(f"wrote {s.path}: {s.images} images in {s.classes} classes, {s.bytes / 2**20:.1f} MiB{skipped}")


if __name__ == "__main__":
    sys.exit(main())
