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

from fastssl.errors import UserError, cli_main  # noqa: E402


def _splits(args) -> tuple[str, str]:
    train = args.train or (str(Path(args.data) / "train") if args.data else "")
    val = args.val or (str(Path(args.data) / "val") if args.data else "")
    if not train or not val:
        raise UserError("pass --data IMAGEFOLDER (holding train/ and val/) or both --train and --val")
    return train, val


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("protocol", choices=["knn", "linear"])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="folder with train/ and val/ ImageFolders")
    p.add_argument("--train", help="ImageFolder used as kNN memory bank / probe training set")
    p.add_argument("--val", help="ImageFolder evaluated")
    p.add_argument("--random-init", action="store_true", help="same architecture, untrained weights")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, help="linear probe epochs over cached features (default: recipe's)")
    p.add_argument("--lr", type=float, help="linear probe learning rate (default: recipe's)")
    p.add_argument("--optimizer", choices=["sgd", "lars"], help="linear probe optimiser (default: recipe's)")
    p.add_argument("--json", help="write the result here as JSON")
    args = p.parse_args(argv)

    from fastssl.checkpoint import load_encoder

    train, val = _splits(args)
    encoder, cfg = load_encoder(args.checkpoint, random_init=args.random_init)
    encoder = encoder.to(args.device)
    if args.protocol == "knn":
        from fastssl.eval.knn import knn_eval

        res = knn_eval(encoder, train, val, cfg.data.image_size, k=args.k, temperature=args.temperature,
                       batch_size=args.batch_size, device=args.device, workers=args.workers)
    else:
        from fastssl.eval.linear import linear_eval

        ev = cfg.eval
        res = linear_eval(encoder, train, val, cfg.data.image_size, batch_size=args.batch_size,
                          device=args.device, workers=args.workers, epochs=args.epochs or ev.linear_epochs,
                          lr=args.lr or ev.linear_lr, optimizer=args.optimizer or ev.linear_optimizer,
                          weight_decay=ev.linear_weight_decay, seed=cfg.seed)
    res = {"protocol": args.protocol, "checkpoint": args.checkpoint, "random_init": args.random_init,
           "encoder": cfg.model.encoder, "method": cfg.method.name, **res}
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
