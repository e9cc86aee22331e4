"""Backend "torch", the default and the reference: DataLoader workers decode, the training device augments.

Per batch, a worker decodes each image once, draws every view's crop box on the *original* image (so
crops are torchvision's RandomResizedCrop whatever the backend), cuts the one region covering all of an
image's boxes, and ships the regions padded to the batch maximum plus the boxes relative to them. The
device then makes each view with `ops.make_view` (per-sample parameters, one batched pass per view).
All randomness of a batch derives from `batch_seed(seed, epoch, step, rank)`, so resuming at a step
reproduces the views of an uninterrupted run, and skipped batches are never decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fastssl.data.imagefolder import ImageFolderIndex, load_rgb, scan_image_folder
from fastssl.errors import UserError, resolve_compile
from fastssl.preempt import ignore_in_workers
from pipelines import ops
from pipelines.augment import AugmentSpec
from pipelines.base import (BACKENDS, LoaderContext, ViewBatch, batch_seed, check_dataset_batches, check_global_batch,
                            check_start_batch, data_device, host_to_device, shard_batches, steps_per_epoch)
from pipelines.eval_views import build_eval_loader  # noqa: F401  (public here: fastssl.eval imports it)

# A region is pre-shrunk by an integer factor f (block mean) only while every box
# of the image keeps at least PRESHRINK_MARGIN x the output side, so a 4000 px photo cropped to 224 px is not
# shipped and resampled at full resolution. The view's triangle filter then still spans >= 2 shrunk pixels
# per output pixel: Pillow's reducing_gap=2 (reduce by an integer factor, then resample), close to the exact
# filter. An image with a box side below 2 * PRESHRINK_MARGIN x the output side is not pre-shrunk (most of
# ImageNet's at 224 px): its views are torchvision's exactly.
PRESHRINK_MARGIN = 2
_BOX_STREAM = 1  # the host crop-box draws and the device parameter draws of one batch use distinct streams


@dataclass
class RegionBatch:
    """What a worker ships: per image, the region covering all its views' boxes."""

    pixels: torch.Tensor  # uint8 N x 3 x H x W, edge-padded to the batch maximum
    boxes: torch.Tensor  # float32 V x N x 4 (y0, x0, h, w) in pixels of `pixels`
    labels: torch.Tensor  # int64 N
    indices: torch.Tensor  # int64 N
    epoch: int
    step: int
    error: str = ""  # a worker's UserError: DataLoader would re-raise it as a multi-line traceback

    def pin_memory(self) -> RegionBatch:  # DataLoader's pin thread calls this on custom batch types
        return RegionBatch(self.pixels.pin_memory(), self.boxes.pin_memory(), self.labels.pin_memory(),
                           self.indices.pin_memory(), self.epoch, self.step, self.error)


def shrink_factor(boxes: np.ndarray, size: int) -> int:
    """Largest integer f keeping every box side >= PRESHRINK_MARGIN * size after shrinking (>= 1)."""
    return max(1, int(boxes[:, 2:].min() // (PRESHRINK_MARGIN * size)))


def cut_region(img: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The part of `img` (H x W x 3) covering all `boxes` (V x 4, y0 x0 h w), pre-shrunk, and the boxes in it."""
    y_lo, x_lo = int(boxes[:, 0].min()), int(boxes[:, 1].min())
    y_hi, x_hi = int((boxes[:, 0] + boxes[:, 2]).max()), int((boxes[:, 1] + boxes[:, 3]).max())
    region = img[y_lo:y_hi, x_lo:x_hi]
    rel = boxes - np.array([y_lo, x_lo, 0, 0], dtype=boxes.dtype)
    f = shrink_factor(boxes, size)
    if f > 1:
        h, w = region.shape[:2]
        ph, pw = -h % f, -w % f  # edge padding to a multiple of f, as the batch padding
        region = np.pad(region, ((0, ph), (0, pw), (0, 0)), mode="edge")
        blocks = region.reshape(region.shape[0] // f, f, region.shape[1] // f, f, 3).mean(axis=(1, 3))
        region = np.rint(blocks).astype(np.uint8)
        rel = rel / f
    return np.ascontiguousarray(region), rel


class _ViewRegions(Dataset):
    """Indexed by a whole batch request (epoch, step, dataset indices): a worker makes one RegionBatch."""

    def __init__(self, index: ImageFolderIndex, spec: AugmentSpec, seed: int, process_index: int):
        self.paths = [p for p, _ in index.samples]
        self.labels = index.labels
        self.spec, self.seed, self.process_index = spec, seed, process_index

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, request: tuple[int, int, np.ndarray]) -> RegionBatch:
        epoch, step, idx = request
        labels, indices = torch.from_numpy(self.labels[idx]), torch.from_numpy(np.asarray(idx, np.int64))
        try:
            images = [load_rgb(self.paths[i]) for i in idx]
        except UserError as e:
            empty = torch.empty(0)
            return RegionBatch(empty.to(torch.uint8), empty, labels, indices, epoch, step, error=str(e))
        rng = np.random.default_rng([batch_seed(self.seed, epoch, step, self.process_index), _BOX_STREAM])
        heights = np.array([im.shape[0] for im in images])
        widths = np.array([im.shape[1] for im in images])
        boxes = np.stack([ops.sample_crop_boxes(heights, widths, v.crop_scale, v.crop_ratio, rng)
                          for v in self.spec.views], axis=1)  # N x V x 4
        regions, rel = zip(*(cut_region(im, b, self.spec.size) for im, b in zip(images, boxes)))
        rel_boxes = torch.from_numpy(np.stack(rel, axis=1).astype(np.float32))  # V x N x 4
        return RegionBatch(torch.from_numpy(ops.pad_batch(list(regions))), rel_boxes, labels, indices, epoch, step)


class _BatchRequests(Sampler):
    """This process's batches of the current epoch, from `start` on, as (epoch, step, indices) requests."""

    def __init__(self, num_samples: int, global_batch: int, ctx: LoaderContext, drop_last: bool):
        self.num_samples, self.global_batch, self.ctx, self.drop_last = num_samples, global_batch, ctx, drop_last
        self.epoch, self.start = 0, 0

    def __iter__(self):
        batches = shard_batches(self.num_samples, self.global_batch, self.ctx.seed, self.epoch,
                                self.ctx.process_index, self.ctx.num_processes, self.drop_last)
        for step in range(self.start, len(batches)):
            yield self.epoch, step, batches[step]

    def __len__(self) -> int:
        return steps_per_epoch(self.num_samples, self.global_batch, self.drop_last) - self.start


PREFETCH_FACTOR = 2  # batches each worker prepares ahead (DataLoader's default, named: benchmarks read it)


def _as_is(batch):
    return batch


class TorchViewLoader:
    def __init__(self, index: ImageFolderIndex, spec: AugmentSpec, ctx: LoaderContext, global_batch: int,
                 drop_last: bool, workers: int, aug_device: torch.device, compiled: bool = False):
        self.spec, self.ctx, self.aug_device, self.compiled = spec, ctx, aug_device, compiled
        self._requests = _BatchRequests(len(index), global_batch, ctx, drop_last)
        self._steps = steps_per_epoch(len(index), global_batch, drop_last)
        # Persistent workers keep their decoders warm between epochs; the sampler lives in this process,
        # so set_epoch takes effect without restarting them. A generator of its own: without one, every
        # iterator the loader starts draws its workers' base seed from torch's global generator, and a resumed
        # run (which starts one at another step) would put the model's draws -- MoCo v2's shuffle-BN order,
        # drop-path -- out of step with the uninterrupted run. (Views are seeded per batch, not from it.)
        self._loader = DataLoader(_ViewRegions(index, spec, ctx.seed, ctx.process_index), sampler=self._requests,
                                  batch_size=None, collate_fn=_as_is, num_workers=workers,
                                  pin_memory=aug_device.type == "cuda", persistent_workers=workers > 0,
                                  worker_init_fn=ignore_in_workers, generator=torch.Generator().manual_seed(ctx.seed),
                                  prefetch_factor=PREFETCH_FACTOR if workers else None)
        self.batches_ahead = workers * PREFETCH_FACTOR

    def __len__(self) -> int:
        return self._steps

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        check_start_batch(start_batch, self._steps)
        self._requests.epoch, self._requests.start = epoch, start_batch

    def __iter__(self):
        for raw in self._loader:
            if raw.error:
                raise UserError(raw.error)
            yield self._make_views(raw)

    def _make_views(self, raw: RegionBatch) -> ViewBatch:
        dev, target = self.aug_device, self.ctx.device
        pixels = raw.pixels.to(dev, non_blocking=True).float()  # once for both views (crop_resize needs floats)
        boxes = raw.boxes.to(dev, non_blocking=True)
        gen = torch.Generator(device=dev)
        gen.manual_seed(batch_seed(self.ctx.seed, raw.epoch, raw.step, self.ctx.process_index))
        views = tuple(ops.make_view(pixels, boxes[v], view, self.spec.size, self.spec.mean, self.spec.std, gen,
                                    self.compiled) for v, view in enumerate(self.spec.views))
        if dev != target:  # data.device=cpu with a GPU trainer
            views = tuple(host_to_device(v, target) for v in views)
        return ViewBatch(views, raw.labels.to(target, non_blocking=True), raw.indices.to(target, non_blocking=True))


@BACKENDS.register("torch")
def build(data_cfg, spec: AugmentSpec, ctx: LoaderContext) -> TorchViewLoader:
    if not data_cfg.path:
        raise UserError("data.path is empty; expected an ImageFolder root (ROOT/<class>/<image>)")
    if data_cfg.workers < 0:
        raise UserError(f"data.workers={data_cfg.workers}; expected 0 (decode in-process) or more")
    check_global_batch(data_cfg.batch_size, ctx.num_processes)
    aug_device = data_device(data_cfg.device, ctx)
    compiled = resolve_compile(data_cfg.compile, aug_device, "data.compile")
    index = scan_image_folder(data_cfg.path)
    check_dataset_batches(data_cfg.path, len(index), data_cfg.batch_size, data_cfg.drop_last, ctx.num_processes)
    return TorchViewLoader(index, spec, ctx, data_cfg.batch_size, data_cfg.drop_last, data_cfg.workers, aug_device,
                           compiled)
