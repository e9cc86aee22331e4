"""The embedded dataset: procedurally drawn shapes, an ImageFolder that needs no download.

The class of an image is a shape family; everything else is a nuisance drawn independently of the class:
position, scale, rotation, reflection, a small anisotropic stretch, and the two colours and textures of
foreground and background. Foreground and background are drawn from the same distribution (the pair is
exchangeable) and every family is normalised to the same area, so the expected mean colour and colour
histogram are identical for all classes: a classifier on colour statistics sits at chance, and an encoder
must see the shape to do better. Shapes are drawn as a mask at 4x resolution and box-filtered down, the
exact pixel coverage, so edges are antialiased identically for every family.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fastssl.errors import UserError
from fastssl.fileio import build_in_place, clean_up_killed_builds

SUPERSAMPLE = 4
JPEG_QUALITY = 90
SPLITS = ("train", "val")  # the position is the split id in each image's seed
MIN_SIZE, MAX_SIZE = 16, 1024
MAKE_MARKER = ".complete"  # the Makefile touches OUT/.complete once this tool has succeeded
# sqrt(shape area) as a fraction of the image side. 0.3-0.46 makes the shapes span ~30% (small circle) to
# ~95% (large L at its widest rotation) of the side: large enough for 64 px images to carry the shape, and
# small enough that every family fits inside the image at every rotation and stretch.
AREA_SIDE_RANGE = (0.3, 0.46)
STRETCH_RANGE = (0.9, 1.1)  # area-preserving; too small to turn a circle into the ellipse family
MIN_COLOUR_DISTANCE = 90.0  # RGB units; below it the shape is barely visible after JPEG


def _ngon(n: int, r: float = 1.0, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return r * np.stack([np.cos(a), np.sin(a)], 1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], float)


def _star() -> np.ndarray:
    return _ngon(10) * np.where(np.arange(10) % 2 == 0, 1.0, 0.45)[:, None]


def _gear() -> np.ndarray:
    # 16 arcs alternating tooth/root radius; consecutive corners share an angle, which makes square teeth.
    k = np.arange(16)
    r = np.repeat(np.where(k % 2 == 0, 1.0, 0.72), 2)
    a = 2 * np.pi * np.stack([k, k + 1], 1).ravel() / 16
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, y], 1) / 16


# Each family is a list of (polygon, additive): additive polygons are painted, the others cut holes, in
# order. The first ten are the most distinct under rotation and scale, since `--classes 10` takes those.
FAMILIES: dict[str, list[tuple[np.ndarray, bool]]] = {
    "circle": [(_ngon(96), True)],
    "square": [(_ngon(4, phase=np.pi / 4), True)],
    "triangle": [(_ngon(3, phase=np.pi / 2), True)],
    "star": [(_star(), True)],
    "cross": [(np.array([(-.33, -1), (.33, -1), (.33, -.33), (1, -.33), (1, .33), (.33, .33), (.33, 1),
                         (-.33, 1), (-.33, .33), (-1, .33), (-1, -.33), (-.33, -.33)]), True)],
    "ring": [(_ngon(96), True), (_ngon(96, 0.55), False)],
    "crescent": [(_ngon(96), True), (_ngon(96, 0.8) + [0.5, 0.0], False)],
    "l_shape": [(np.array([(0, 0), (.6, 0), (.6, 1.4), (1.5, 1.4), (1.5, 2), (0, 2)]), True)],
    "arrow": [(np.array([(-1, -.25), (.15, -.25), (.15, -.65), (1, 0), (.15, .65), (.15, .25), (-1, .25)]),
               True)],
    "bars": [(_rect(-1, -1, -.55, 1), True), (_rect(-.22, -1, .22, 1), True), (_rect(.55, -1, 1, 1), True)],
    "hexagon": [(_ngon(6), True)],
    "ellipse": [(_ngon(96) * [1.0, 0.45], True)],
    "t_shape": [(np.array([(-1, .45), (-1, 1), (1, 1), (1, .45), (.28, .45), (.28, -1), (-.28, -1), (-.28, .45)]),
                 True)],
    "frame": [(_ngon(4, phase=np.pi / 4), True), (_ngon(4, 0.6, phase=np.pi / 4), False)],
    "semicircle": [(_ngon(96)[:49], True)],
    "dots": [(_ngon(48, 0.45) + [-.6, 0], True), (_ngon(48, 0.45) + [.6, 0], True)],
    "pacman": [(np.concatenate([[(0.0, 0.0)], _ngon(96)[10:87]]), True)],
    "u_shape": [(np.array([(-1, 1), (-.4, 1), (-.4, -.4), (.4, -.4), (.4, 1), (1, 1), (1, -1), (-1, -1)]), True)],
    "heart": [(_heart(), True)],
    "gear": [(_gear(), True)],
}
FAMILY_NAMES = tuple(FAMILIES)


def _draw_mask(parts: list[tuple[np.ndarray, bool]], side: int) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    for pts, additive in parts:
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255 if additive else 0)
    return mask


@lru_cache(maxsize=None)
def _unit_family(name: str) -> list[tuple[np.ndarray, bool]]:
    """The family centred on its bounding box and scaled to area 1."""
    parts = FAMILIES[name]
    outer = np.concatenate([p for p, add in parts if add])
    centre = (outer.min(0) + outer.max(0)) / 2
    parts = [(p - centre, add) for p, add in parts]
    # Area by rendering rather than shoelace: holes may overlap the outline (crescent) or each other.
    side, span = 1024, 2.2 * np.abs(np.concatenate([p for p, _ in parts])).max()
    px = [(p / span * side + side / 2, add) for p, add in parts]
    area = np.asarray(_draw_mask(px, side), np.float64).sum() / 255 * (span / side) ** 2
    return [(p / np.sqrt(area), add) for p, add in parts]


def render_alpha(family: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Antialiased coverage (size x size, float64 in [0, 1]) of one randomly placed shape."""
    parts = _unit_family(family)
    big = size * SUPERSAMPLE
    scale = rng.uniform(*AREA_SIDE_RANGE) * big
    stretch = rng.uniform(*STRETCH_RANGE)
    theta = rng.uniform(0, 2 * np.pi)
    flip = rng.choice([-1.0, 1.0])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    linear = rot @ np.diag([flip * stretch, 1 / stretch]) * scale
    shape = [(p @ linear.T, add) for p, add in parts]
    outline = np.concatenate([p for p, add in shape if add])
    # The whole shape stays inside the image, so its visible area is the drawn one for every class.
    # AREA_SIDE_RANGE makes every family fit at every rotation; were one too large, min/max would still
    # give a valid centre and the shape would be clipped (tests check the areas).
    low, high = -outline.min(0), big - outline.max(0)
    centre = rng.uniform(np.minimum(low, high), np.maximum(low, high))
    mask = _draw_mask([(p + centre, add) for p, add in shape], big)
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), np.float64) / 255


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, sigma: float) -> np.ndarray:
    grid = rng.normal(0, sigma, (cells, cells, 3))
    pos = np.linspace(0, cells - 1, size)
    lo = np.minimum(pos.astype(int), cells - 2)
    w = np.zeros((size, cells))
    w[np.arange(size), lo] = 1 - (pos - lo)
    w[np.arange(size), lo + 1] = pos - lo
    # Bilinear upsampling as two interpolation matrices, one axis at a time (a 3-operand einsum is 10x slower).
    return np.einsum("xj,yjc->yxc", w, np.einsum("yi,ijc->yjc", w, grid))


def render_texture(rng: np.random.Generator, base: np.ndarray, size: int) -> np.ndarray:
    """A size x size x 3 float texture around `base`: every kind adds zero-mean variation, so the expected
    colour is `base` whichever kind is drawn."""
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    kind = rng.integers(4)
    if kind == 0:  # flat
        tex = np.zeros((size, size, 3))
    elif kind == 1:  # linear gradient in a random direction
        phi = rng.uniform(0, 2 * np.pi)
        t = (xx * np.cos(phi) + yy * np.sin(phi))[..., None]
        tex = t * rng.uniform(-80, 80, 3)
    elif kind == 2:  # stripes of random period and angle
        phi, period = rng.uniform(0, np.pi), rng.uniform(0.06, 0.25)
        t = np.sign(np.sin(2 * np.pi * (xx * np.cos(phi) + yy * np.sin(phi)) / period + rng.uniform(0, 2 * np.pi)))
        tex = t[..., None] * rng.uniform(-35, 35, 3)
    else:  # blotches
        tex = _smooth_noise(rng, size, int(rng.integers(3, 7)), 30.0)
    return base + tex + rng.normal(0, rng.uniform(1, 8), (size, size, 3))


def render_image(family: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(H x W x 3 uint8 image, H x W float alpha of the shape) for one sample of `family`."""
    while True:  # the symmetric rejection keeps (foreground, background) exchangeable
        fg, bg = rng.uniform(0, 255, (2, 3))
        if np.linalg.norm(fg - bg) >= MIN_COLOUR_DISTANCE:
            break
    alpha = render_alpha(family, rng, size)
    fg_tex, bg_tex = render_texture(rng, fg, size), render_texture(rng, bg, size)
    rgb = bg_tex * (1 - alpha[..., None]) + fg_tex * alpha[..., None]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), alpha


def sample_rng(seed: int, split: str, family: str, i: int) -> np.random.Generator:
    # Keyed by family position, not class index, so `--classes 10` and `--classes 20` share their images.
    return np.random.default_rng([seed, SPLITS.index(split), FAMILY_NAMES.index(family), i])


def encode_jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


@dataclass(frozen=True)
class SyntheticSummary:
    out: Path
    classes: tuple[str, ...]
    train_images: int
    val_images: int
    size: int
    seed: int
    seconds: float

    def __str__(self) -> str:
        return (f"wrote {self.train_images} train + {self.val_images} val images of {len(self.classes)} classes "
                f"({self.size} px, seed {self.seed}) to {self.out} in {self.seconds:.1f} s")


def _check_args(classes: int, train_per_class: int, val_per_class: int, size: int, seed: int) -> None:
    if not 2 <= classes <= len(FAMILY_NAMES):
        raise UserError(f"classes={classes}; expected an integer in [2, {len(FAMILY_NAMES)}] (shape families)")
    for name, n in (("train_per_class", train_per_class), ("val_per_class", val_per_class)):
        if n < 1:
            raise UserError(f"{name}={n}; expected an integer >= 1")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"size={size}; expected an image side in [{MIN_SIZE}, {MAX_SIZE}] pixels")
    if seed < 0:
        raise UserError(f"seed={seed}; expected an integer >= 0")


def _write_split(root: Path, split: str, families: tuple[str, ...], count: int, size: int, seed: int) -> None:
    for family in families:
        folder = root / split / family
        folder.mkdir(parents=True)
        for i in range(count):
            rgb, _ = render_image(family, sample_rng(seed, split, family, i), size)
            (folder / f"{i:05d}.jpg").write_bytes(encode_jpeg(rgb))


def _not_a_previous_dataset(out: Path) -> str | None:
    """None when `out` holds only what make_synthetic_dataset writes (plus the Makefile's marker), else the first
    entry that it would not have written, described for the error."""
    for top in sorted(out.iterdir()):
        if top.name == MAKE_MARKER and top.is_file():
            continue
        if top.name not in SPLITS or top.is_symlink() or not top.is_dir():
            return f"{top.name!r}"
        for cls in sorted(top.iterdir()):
            if cls.is_symlink() or not cls.is_dir():
                return f"{top.name}/{cls.name!r} (not a class folder)"
            for f in sorted(cls.iterdir()):
                if f.suffix != ".jpg" or f.is_symlink() or not f.is_file():
                    return f"{top.name}/{cls.name}/{f.name!r} (not a .jpg file)"
    return None


def make_synthetic_dataset(out: str | os.PathLike, classes: int = 10, train_per_class: int = 260,
                           val_per_class: int = 60, size: int = 64, seed: int = 0, *,
                           force: bool = False) -> SyntheticSummary:
    """Write OUT/{train,val}/<family>/<i>.jpg; the same arguments always give byte-identical files.

    The dataset is built in a temporary folder beside OUT and renamed into place, so OUT is either absent,
    the previous dataset, or complete: never half written.
    """
    _check_args(classes, train_per_class, val_per_class, size, seed)
    out = Path(out).expanduser().absolute()
    clean_up_killed_builds(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a directory; expected a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"output {out} exists and is not empty; expected a new or empty folder (or --force)")
        foreign = _not_a_previous_dataset(out)
        if foreign is not None:  # --force deletes: only ever a dataset this tool (and `make demo`) wrote
            raise UserError(f"--force: output {out} holds {foreign}, so it is not a previous synthetic dataset; "
                            f"expected only train/ and val/ class folders of .jpg files (and make's "
                            f"{MAKE_MARKER}); refusing to replace it")
    families = FAMILY_NAMES[:classes]
    start = time.perf_counter()
    with build_in_place(out, "the dataset") as tmp:  # --force: the old dataset goes only once the new is whole
        for split, count in zip(SPLITS, (train_per_class, val_per_class)):
            _write_split(tmp, split, families, count, size, seed)
    return SyntheticSummary(out=out, classes=families, train_images=classes * train_per_class,
                            val_images=classes * val_per_class, size=size, seed=seed,
                            seconds=time.perf_counter() - start)
