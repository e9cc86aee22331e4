"""The FFCV backend: a memory-mapped `.beton`, JIT-compiled CPU decode, both views made on the device.

For two-view SSL the costly part is decoding, so each image is decoded once. Before an epoch the loader
draws both views' crop boxes for every sample it will read (`ops.sample_crop_boxes`, torchvision's
RandomResizedCrop semantics on the stored image), the FFCV decoder (`ffcv_decode.RegionDecoder`) decodes
each image and copies out only the box covering both crops, and on the device `ops.make_view` cuts each
view from that region and applies the rest of the spec. Decoding a fixed centre crop instead would
silently change the crop distribution; decoding once per view (a second ffcv PipelineSpec on the same
field) doubles the decode cost.

Order: "shared" is fastssl's order (`base.epoch_order`, the same batches as the torch and DALI backends);
"random", "quasi_random" (page-local, for datasets larger than the page cache) and "sequential" are
ffcv's. Every order is drawn over the whole dataset with the same seed on every process and cut into
global batches, process r taking its chunk as in `base.shard_batches`: accelerate's process index is used
directly, not ffcv's `distributed=True`, which needs an initialised process group, pads the dataset, and
has no quasi-random order.
"""

from __future__ import annotations

import queue

import numpy as np
import torch

from fastssl.data.beton import IMAGE_FIELD, LABEL_FIELD, import_ffcv, open_beton, require_fields
from fastssl.errors import UserError, resolve_compile
from pipelines.augment import AugmentSpec
from pipelines.base import (BACKENDS, LoaderContext, ViewBatch, batch_seed, check_dataset_batches, check_global_batch,
                            check_start_batch, data_device, epoch_order, host_to_device, shard_order,
                            steps_per_epoch)
from pipelines.ops import make_view, sample_crop_boxes

ORDERS = ("shared", "random", "quasi_random", "sequential")
DECODES = ("once", "per_view")
_BOX_CHUNK = 1 << 16  # samples per sample_crop_boxes call: it draws 40 doubles per sample and view


class FFCVViewLoader:
    """ViewLoader over a fastssl `.beton` (see the module docstring)."""

    def __init__(self, path: str, spec: AugmentSpec, ctx: LoaderContext, *, batch_size: int, workers: int = 1,
                 order: str = "shared", os_cache: bool = True, drop_last: bool = True, device: str = "auto",
                 decode: str = "once", batches_ahead: int = 2, compile_augment: str = "auto"):
        import_ffcv()
        import numba
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.traversal_order import QuasiRandom, Random, Sequential

        from pipelines.ffcv_decode import IndexLabelDecoder, RegionDecoder

        if order not in ORDERS:
            raise UserError(f"data.ffcv_order={order!r}; expected one of {', '.join(ORDERS)}")
        if decode not in DECODES:
            raise UserError(f"data.ffcv_decode={decode!r}; expected one of {', '.join(DECODES)}")
        reader = open_beton(path)
        require_fields(reader, path)
        self.num_samples = int(reader.num_samples)
        check_global_batch(batch_size, ctx.num_processes)
        check_dataset_batches(str(path), self.num_samples, batch_size, drop_last, ctx.num_processes)
        self.path, self.spec, self.ctx = str(path), spec, ctx
        self.global_batch, self.drop_last, self.order = batch_size, drop_last, order
        self.device = data_device(device, ctx)
        self.compiled = resolve_compile(compile_augment, self.device, "data.compile")
        meta = reader.metadata[f"f{list(reader.handlers).index(IMAGE_FIELD)}"]
        self.heights = meta["height"].astype(np.int64)
        self.widths = meta["width"].astype(np.int64)
        # Decoder-visible table of covering regions (y0, x0, h, w); the full image until an epoch draws.
        self.regions = np.zeros((self.num_samples, 4), dtype=np.int32)
        self.regions[:, 2], self.regions[:, 3] = self.heights, self.widths
        self.view_boxes = np.zeros((self.num_samples, len(spec.views), 4), dtype=np.float64)
        # decode="per_view": one table per view, each read by its own decoder (a second PipelineSpec on the
        # same field, since ffcv 1.0.2 cannot fan one decode out to several outputs).
        self.decode = decode
        self.view_regions = [self.regions.copy() for _ in spec.views] if decode == "per_view" else []
        if decode == "once":
            pipelines = {IMAGE_FIELD: PipelineSpec(IMAGE_FIELD, decoder=RegionDecoder(self.regions))}
        else:
            pipelines = {IMAGE_FIELD: None, **{f"view{v}": PipelineSpec(IMAGE_FIELD, decoder=RegionDecoder(t))
                                               for v, t in enumerate(self.view_regions)}}
        pipelines[LABEL_FIELD] = PipelineSpec(LABEL_FIELD, decoder=IndexLabelDecoder())
        # numba refuses more threads than its pool (one per core) holds.
        self.workers = max(1, min(int(workers), numba.config.NUMBA_NUM_THREADS))
        torch_threads = torch.get_num_threads()
        self.loader = Loader(self.path, batch_size=batch_size // ctx.num_processes, num_workers=self.workers,
                             os_cache=os_cache, order=OrderOption.SEQUENTIAL, seed=ctx.seed, drop_last=False,
                             batches_ahead=batches_ahead, pipelines=pipelines)
        self.batches_ahead = batches_ahead
        self._outputs = list(self.loader.pipeline_specs)  # ffcv returns one array per spec, in this order
        torch.set_num_threads(torch_threads)  # ffcv sets torch's thread count to its worker count
        self._ffcv_order = {"random": Random, "quasi_random": QuasiRandom, "sequential": Sequential,
                            "shared": None}[order]
        self._ffcv_order = self._ffcv_order(self.loader) if self._ffcv_order else None
        # ffcv's QuasiRandom shuffles its page table in place, so an epoch's order would depend on the epochs
        # drawn before it in this process: a resumed run would skip the first batches of another permutation.
        # Each draw starts from the table as built instead.
        self._pages = getattr(self._ffcv_order, "page_to_samples_array", None)
        self._pages = None if self._pages is None else self._pages.copy()
        self.loader.traversal_order = _PlannedOrder(self)
        self._planned = np.zeros(0, dtype=np.int64)
        self.epoch, self.start_batch = 0, 0
        self._copied: torch.cuda.Event | None = None  # the last batch's device copies (GPU only)

    def __len__(self) -> int:
        return steps_per_epoch(self.num_samples, self.global_batch, self.drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        check_start_batch(start_batch, len(self))
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """Dataset indices of this process's batches in `epoch` (the same for any start_batch)."""
        if self._ffcv_order is None:
            order = epoch_order(self.num_samples, self.ctx.seed, epoch)
        else:
            if self._pages is not None:
                self._ffcv_order.page_to_samples_array[...] = self._pages
            order = self._ffcv_order.sample_order(epoch)
        return shard_order(order, self.global_batch, self.ctx.process_index, self.ctx.num_processes,
                           self.drop_last)

    def draw_boxes(self, epoch: int, indices: np.ndarray) -> None:
        """Both views' crop boxes for `indices` and the region covering them, from (seed, epoch, process)."""
        rng = np.random.default_rng([self.ctx.seed, epoch, self.ctx.process_index, 0xFFC5])
        for lo in range(0, len(indices), _BOX_CHUNK):
            idx = indices[lo:lo + _BOX_CHUNK]
            boxes = np.stack([sample_crop_boxes(self.heights[idx], self.widths[idx], v.crop_scale, v.crop_ratio,
                                                rng) for v in self.spec.views], axis=1)
            top_left = boxes[..., :2].min(axis=1)
            bottom_right = (boxes[..., :2] + boxes[..., 2:]).max(axis=1)
            self.view_boxes[idx] = boxes
            self.regions[idx] = np.concatenate([top_left, bottom_right - top_left], axis=1).astype(np.int32)
            for v, table in enumerate(self.view_regions):
                table[idx] = boxes[:, v]

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch
        batches = self.epoch_batches(epoch)
        # Boxes for the whole epoch, skipped batches included, so a resumed epoch sees the same crops.
        self.draw_boxes(epoch, np.concatenate(batches))
        todo = batches[start:]
        if not todo:
            return
        self._planned = np.concatenate(todo)
        torch_threads = torch.get_num_threads()
        self._wait_for_copies()  # a new epoch's buffers may reuse the previous epoch's pinned memory
        epoch_iterator = iter(self.loader)
        try:
            for k in range(len(todo)):
                # Taking the next batch lets ffcv's decode thread refill the previous batch's slot, with host
                # writes that no CUDA stream orders: its device copy must have run by then.
                self._wait_for_copies()
                out = dict(zip(self._outputs, _next_batch(epoch_iterator)))
                index_label = out[LABEL_FIELD]
                if k == 0:
                    torch.set_num_threads(torch_threads)  # ffcv's epoch thread set it to its worker count
                idx = index_label[:, 0].copy()
                if not np.array_equal(idx, todo[k]):
                    raise RuntimeError(f"ffcv returned batch {k} out of plan")  # a bug, not a user error
                yield self._views(out, idx, index_label[:, 1].copy(), epoch, start + k)
        finally:
            self._wait_for_copies()  # before ffcv's buffers can be freed
            epoch_iterator.close()
        self.start_batch = 0

    def _wait_for_copies(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def _views(self, out: dict, idx: np.ndarray, labels: np.ndarray, epoch: int, step: int) -> ViewBatch:
        # The regions are slots of ffcv's ring buffer (pinned memory): on the CPU make_view consumes them before
        # this batch is yielded; to a GPU they are copied asynchronously, and the event recorded after the
        # copies is waited for before ffcv may refill the slot (see __iter__).
        def to_device(region):
            region = torch.from_numpy(region).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            if self.device.type == "cuda":
                self._copied = torch.cuda.Event()
                self._copied.record()
            return region

        g = torch.Generator(device=self.device)
        g.manual_seed(batch_seed(self.ctx.seed, epoch, step, self.ctx.process_index))
        s, views = self.spec, []
        # decode="once": converted to floats once for both views (crop_resize needs floats)
        shared = to_device(out[IMAGE_FIELD]).float() if self.decode == "once" else None
        for v, view in enumerate(s.views):
            images, table = (shared, self.regions) if shared is not None else (to_device(out[f"view{v}"]),
                                                                                 self.view_regions[v])
            rel = self.view_boxes[idx, v].copy()
            rel[:, :2] -= table[idx, :2]
            views.append(make_view(images, host_to_device(rel, self.device, torch.float32), view, s.size, s.mean,
                                   s.std, g, self.compiled))
        views = tuple(views)
        return ViewBatch(views=views, labels=host_to_device(labels, self.device),
                         indices=host_to_device(idx, self.device))


def _next_batch(epoch_iterator):
    """ffcv's EpochIterator.__next__, except that a dead decode thread raises instead of blocking forever."""
    while True:
        try:
            got = epoch_iterator.output_queue.get(timeout=1.0)
            break
        except queue.Empty:
            if not epoch_iterator.is_alive():
                raise RuntimeError("ffcv's decode thread stopped before the end of the epoch (its traceback "
                                   "is printed above)") from None
    if got is None:
        raise RuntimeError("ffcv ended the epoch before the planned batches")
    slot, result = got
    if epoch_iterator.cuda_streams[slot] is not None:
        epoch_iterator.current_stream.wait_stream(epoch_iterator.cuda_streams[slot])
    return result


class _PlannedOrder:
    """Stands in for ffcv's traversal order: hands ffcv the indices the wrapper planned for this epoch."""

    def __init__(self, owner: FFCVViewLoader):
        self.owner = owner

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.owner._planned


@BACKENDS.register("ffcv")
def build_ffcv_loader(data_cfg, spec: AugmentSpec, ctx: LoaderContext) -> FFCVViewLoader:
    return FFCVViewLoader(data_cfg.path, spec, ctx, batch_size=data_cfg.batch_size, workers=data_cfg.workers,
                          order=data_cfg.ffcv_order, os_cache=data_cfg.ffcv_os_cache,
                          drop_last=data_cfg.drop_last, device=data_cfg.device, decode=data_cfg.ffcv_decode,
                          compile_augment=data_cfg.compile)
