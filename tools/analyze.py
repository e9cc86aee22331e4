#!/usr/bin/env python
"""Look at what a pre-training run does and learned; every subcommand writes one PNG (--out FILE.png).

  views RECIPE.yaml|RUN_DIR [section.key=value ...]   the two augmented views of a few images, from the
                                                      recipe's own backend and augmentation preset
  curves RUN_DIR                                      loss, lr, kNN top-1 and images/s against the step
  cka --checkpoint A [--checkpoint-b B | --random-init-b] --data IMAGEFOLDER
                                                      linear CKA between every pair of layers of A and B
                                                      (B = A when neither is given)
  attention --checkpoint VIT --data IMAGEFOLDER       [CLS] attention: last block per head, and rollout

CKPT is a run directory, a checkpoint directory or an encoder.pt file. Images come from --data (spread
evenly over an ImageFolder) or --images FILE [FILE ...]; they are centre crops at the encoder's size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastssl.analysis.plots import check_png_path  # noqa: E402
from fastssl.errors import ArgumentParser, UserError, cli_main, resolve_device  # noqa: E402
from fastssl.fileio import check_output_file, write_atomic  # noqa: E402


# --num-images when not given: a row of views, enough images for CKA's Gram matrices, a few attention maps.
NUM_IMAGES = {"views": 8, "cka": 256, "attention": 4}


def _note_fewer_images(args, shown: int, where: str) -> None:
    """Only for a --num-images the user typed: the default asks for more than small folders hold, by design."""
    asked = args.num_images
    if args.num_images_given and shown < asked:
        print(f"note: {where} holds only {shown} images; using all {shown} (--num-images {asked})", file=sys.stderr)


def _images(args):
    from fastssl.analysis.images import pick_images

    index = pick_images(args.data, args.images, args.num_images)
    if args.images is None:
        _note_fewer_images(args, len(index), f"--data {args.data}")
    return index


def _load(path: str, random_init: bool, device: str):
    from fastssl.checkpoint import load_encoder

    encoder, cfg = load_encoder(path, random_init=random_init)
    where = Path(path).resolve()
    name = where.parent.name if where.is_file() else where.name
    label = f"{name} ({cfg.model.encoder} {cfg.method.name}{', random init' if random_init else ''})"
    return encoder.to(device), cfg, label


def _views(args) -> str:
    import dataclasses

    import torch

    from fastssl.analysis.images import unnormalise
    from fastssl.analysis.plots import views_figure
    from fastssl.config import load_config

    if args.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {args.num_images}")
    source = Path(args.config)
    cfg = load_config(source / "config.yaml" if source.is_dir() else source, args.overrides)
    from fastssl.recipe_checks import check_ranges
    from pipelines.augment import spec_for

    check_ranges(cfg, "seed")  # what the views depend on, as the trainer checks it
    check_ranges(cfg, "data.")
    from pipelines.base import LoaderContext, build_loader

    spec = spec_for(cfg.data)  # the spec the trainer would compile, recipe overrides included
    # One batch of exactly the images shown: the backend's own code path, without decoding a full batch.
    data = dataclasses.replace(cfg.data, batch_size=args.num_images, drop_last=False)
    loader = build_loader(data, spec, LoaderContext(torch.device(args.device), seed=cfg.seed))
    loader.set_epoch(0)
    batch = next(iter(loader), None)
    if batch is None:
        raise UserError(f"data.path {cfg.data.path!r} gave no batch of {args.num_images} images")
    views = [unnormalise(v[:args.num_images], spec.mean, spec.std) for v in batch.views]
    _note_fewer_images(args, views[0].shape[0], f"data.path {cfg.data.path}")
    out = views_figure(views, args.out, tuple(f"view {i + 1}" for i in range(len(views))))
    return f"{len(views)} views of {views[0].shape[0]} images ({cfg.data.backend} backend, {cfg.data.augment} " \
           f"preset, {cfg.data.image_size} px) -> {out}"


def _curves(args) -> str:
    from fastssl.analysis.plots import curves_figure, read_metrics, read_summary

    records = read_metrics(args.run_dir)
    out = curves_figure(records, args.out, title=Path(args.run_dir).resolve().name,
                        summary=read_summary(args.run_dir))
    return f"{len(records)} records -> {out}"


def _cka(args) -> str:
    from fastssl.analysis.cka import cka_matrix
    from fastssl.analysis.cka_layers import layer_features
    from fastssl.analysis.images import load_images
    from fastssl.analysis.plots import cka_figure

    index = _images(args)
    if len(index) < 3:
        raise UserError(f"CKA needs at least 3 images to centre and compare features, got {len(index)}")
    enc_a, cfg_a, label_a = _load(args.checkpoint, args.random_init, args.device)
    names_a, feats_a = layer_features(enc_a, load_images(index, cfg_a.data.image_size, args.device),
                                      args.batch_size, name=cfg_a.model.encoder)
    if args.checkpoint_b or args.random_init_b:
        enc_b, cfg_b, label_b = _load(args.checkpoint_b or args.checkpoint, args.random_init_b, args.device)
        names_b, feats_b = layer_features(enc_b, load_images(index, cfg_b.data.image_size, args.device),
                                          args.batch_size, name=cfg_b.model.encoder)
    else:
        label_b, names_b, feats_b = label_a, names_a, None
    matrix = cka_matrix(feats_a, feats_b).numpy()
    out = cka_figure(matrix, names_a, names_b, args.out, row_title=label_a, col_title=label_b)
    if args.json:
        _write_json(args.json, {"a": label_a, "b": label_b, "layers_a": names_a, "layers_b": names_b,
                                "num_images": len(index), "cka": matrix.round(6).tolist()})
    return f"{len(names_a)} x {len(names_b)} layers on {len(index)} images -> {out}"


def _attention(args) -> str:
    from fastssl.analysis.attention import cls_attention, vit_of
    from fastssl.analysis.images import load_images, unnormalise
    from fastssl.analysis.plots import attention_figure

    encoder, cfg, label = _load(args.checkpoint, args.random_init, args.device)
    try:
        vit_of(encoder)
    except UserError:
        raise UserError(f"checkpoint {args.checkpoint!r} holds a {cfg.model.encoder} encoder (method "
                        f"{cfg.method.name}); attention maps need a ViT encoder") from None
    index = _images(args)
    images = load_images(index, cfg.data.image_size, args.device)
    maps = cls_attention(encoder, images)
    out = attention_figure(unnormalise(images), maps["heads"].cpu().numpy(), maps["rollout"].cpu().numpy(),
                           args.out, title=f"{label}: [CLS] attention, block {maps['num_blocks']} heads and rollout")
    return f"{maps['heads'].shape[1]} heads x {len(index)} images -> {out}"


def _write_json(path: str, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def _check_options(args) -> None:
    """Everything a subcommand's options can get wrong, before minutes of feature extraction, not after."""
    check_png_path(args.out)
    if args.command == "cka":
        if args.checkpoint_b and args.random_init_b:
            raise UserError("pass either --checkpoint-b or --random-init-b, not both")
        if args.num_images > 4096:
            raise UserError(f"--num-images {args.num_images} is too many for full-batch CKA (n x n Gram matrices "
                            f"per layer); expected at most 4096")
        if args.batch_size < 1:
            raise UserError(f"--batch-size {args.batch_size}; expected >= 1")
        if args.json:
            check_output_file(args.json, "--json")


def _image_args(p: argparse.ArgumentParser, default_n: int) -> None:
    p.add_argument("--data", help="ImageFolder to take images from (spread evenly over its classes)")
    p.add_argument("--images", nargs="*", help="image files to use instead of --data")
    p.add_argument("--num-images", type=int, help=f"images taken from --data ({default_n})")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or encoder.pt")
    p.add_argument("--random-init", action="store_true", help="the checkpoint's architecture, untrained")


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("views", help="PNG grid of the augmented views of a few images")
    v.add_argument("config", help="recipe YAML or run directory (its config.yaml)")
    v.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides, e.g. data.backend=dali")
    v.add_argument("--num-images", type=int, help=f"images shown ({NUM_IMAGES['views']})")
    c = sub.add_parser("curves", help="PNG of loss, lr, kNN and images/s over the steps of a run")
    c.add_argument("run_dir")
    k = sub.add_parser("cka", help="PNG heatmap of linear CKA between the layers of one or two encoders")
    _image_args(k, NUM_IMAGES["cka"])
    k.add_argument("--checkpoint-b", help="second encoder (columns); default: the first one")
    k.add_argument("--random-init-b", action="store_true", help="columns: the first encoder's architecture, untrained")
    k.add_argument("--batch-size", type=int, default=64)
    k.add_argument("--json", help="also write the matrix and layer names here")
    a = sub.add_parser("attention", help="PNG grid of [CLS] attention maps of a ViT")
    _image_args(a, NUM_IMAGES["attention"])
    for s in (v, c, k, a):
        s.add_argument("--out", required=True, help="PNG file to write")
        s.add_argument("--device", default="auto", help="auto | cpu | cuda (default: cuda when available)")
    args = p.parse_command_args(argv)  # overrides of `views` may sit between options, as in tools/train.py
    args.device = resolve_device(args.device)
    args.num_images_given = getattr(args, "num_images", None) is not None
    if args.command in NUM_IMAGES and not args.num_images_given:
        args.num_images = NUM_IMAGES[args.command]
    _check_options(args)
    run = {"views": _views, "curves": _curves, "cka": _cka, "attention": _attention}[args.command]
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
