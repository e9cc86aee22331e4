#!/usr/bin/env python
"""Evaluate a pre-trained encoder: `python tools/eval.py knn|linear --checkpoint CKPT --data IMAGEFOLDER`.

CKPT is a run directory, a checkpoint directory or an encoder.pt file. IMAGEFOLDER holds train/ and val/
(or pass --train and --val). `--random-init` evaluates the same architecture with fresh weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastssl.errors import ArgumentParser, UserError, cli_main, resolve_device  # noqa: E402
from fastssl.fileio import check_output_file, write_atomic  # noqa: E402


def _splits(args) -> tuple[str, str]:
    train = args.train or (str(Path(args.data) / "train") if args.data else "")
    val = args.val or (str(Path(args.data) / "val") if args.data else "")
    if not train or not val:
        raise UserError("pass --data IMAGEFOLDER (holding train/ and val/) or both --train and --val")
    return train, val


def _check_options(args) -> None:
    """Every option the run depends on, before the checkpoint is loaded and features are extracted."""
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}; expected >= 1")
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}; expected >= 0")
    if args.protocol == "knn":
        from fastssl.eval.knn import check_knn_settings

        check_knn_settings(args.k, args.temperature)
    else:  # None keeps the recipe's value; 0 is a value, and an invalid one
        if args.epochs is not None and args.epochs < 1:
            raise UserError(f"--epochs {args.epochs}; expected >= 1 (or leave it out for the recipe's)")
        if args.lr is not None and not args.lr > 0:
            raise UserError(f"--lr {args.lr}; expected > 0 (or leave it out for the recipe's)")
    if args.json:
        check_output_file(args.json, "--json")


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("protocol", choices=["knn", "linear"])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="folder with train/ and val/ ImageFolders")
    p.add_argument("--train", help="ImageFolder used as kNN memory bank / probe training set")
    p.add_argument("--val", help="ImageFolder evaluated")
    p.add_argument("--random-init", action="store_true", help="same architecture, untrained weights")
    p.add_argument("--k", type=int, default=20, help="kNN neighbours, >= 1 (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature, > 0 (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: cuda when available)")
    p.add_argument("--epochs", type=int, help="linear probe epochs over cached features (default: recipe's)")
    p.add_argument("--lr", type=float, help="linear probe learning rate (default: recipe's)")
    p.add_argument("--optimizer", choices=["sgd", "lars"], help="linear probe optimiser (default: recipe's)")
    p.add_argument("--json", help="write the result here as JSON")
    args = p.parse_args(argv)

    from fastssl.checkpoint import load_encoder

    train, val = _splits(args)
    _check_options(args)
    device = resolve_device(args.device)
    encoder, cfg = load_encoder(args.checkpoint, random_init=args.random_init)
    encoder = encoder.to(device)
    if args.protocol == "knn":
        from fastssl.eval.knn import knn_eval

        res = {"k": args.k, "temperature": args.temperature,
               **knn_eval(encoder, train, val, cfg.data.image_size, k=args.k, temperature=args.temperature,
                          batch_size=args.batch_size, device=device, workers=args.workers)}
    else:
        from fastssl.eval.linear import linear_eval

        ev = cfg.eval
        res = linear_eval(encoder, train, val, cfg.data.image_size, batch_size=args.batch_size, device=device,
                          workers=args.workers,
                          epochs=ev.linear_epochs if args.epochs is None else args.epochs,
                          lr=ev.linear_lr if args.lr is None else args.lr,
                          optimizer=args.optimizer or ev.linear_optimizer,
                          weight_decay=ev.linear_weight_decay, seed=cfg.seed)
    res = {"protocol": args.protocol, "checkpoint": args.checkpoint, "random_init": args.random_init,
           "encoder": cfg.model.encoder, "method": cfg.method.name, **res}
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    if args.json:
        write_atomic(args.json, json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
