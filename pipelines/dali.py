"""Backend "dali": NVIDIA DALI decodes each JPEG once (on the GPU with `mixed` nvJPEG / the hardware
decoder, or on the CPU) and makes every view from that decode; the graph is pipelines/dali_graph.py.

Agreement with the torch backend: the batches of a step are `base.shard_batches` (the same sharding by
accelerate's process_index / num_processes, epoch reshuffle and drop-last rule) fed through
`external_source`, and the per-sample parameters are drawn on the host by the torch backend's samplers
seeded with `batch_seed`, so a resumed run reproduces its views and CPU mode draws the same views as the
torch backend for the same batch.

Memory knobs (recipe `data` section):
- dali_prefetch_queue_depth (default 2): batches DALI prepares ahead. Each in flight holds its decoded
  images plus every view, so memory grows linearly with it; 2 hides the host's parameter drawing and file
  reads behind the device's work, more rarely helps.
- dali_hw_decoder_load (default 0.65): share of JPEGs the A100/H100 hardware decoder takes; the rest go
  to CUDA nvJPEG on the SMs. Lower it if the training step is starved of SMs less than of decode.
- Preallocation: nvJPEG's device/host buffers are padded up front (dali_graph.DEVICE_MEMORY_PADDING /
  HOST_MEMORY_PADDING) so the first epoch does not re-grow them image by image.
Memory does not grow epoch over epoch: the pipeline is built once and `reset()` between epochs (never
rebuilt), every view has the fixed size image_size, no decoder cache is enabled, and an abandoned epoch is
drained rather than leaving batches queued. tests/test_dali.py checks the CPU mode's resident memory.
"""

from __future__ import annotations

import collections

import numpy as np
import torch

from fastssl.errors import UserError, resolve_compile
from pipelines import ops
from pipelines.augment import AugmentSpec
from pipelines.base import (BACKENDS, LoaderContext, ViewBatch, batch_seed, check_dataset_batches, check_global_batch,
                            check_start_batch, data_device, host_to_device, shard_batches, steps_per_epoch)
from pipelines.dali_sources import open_source

INSTALL_HINT = ("data.backend=dali needs NVIDIA DALI, which is not installed; install the extra with "
                "`pip install -e '.[dali]'` (or bash .ci/install_dali.sh .venv)")
# The crop boxes of a batch come from the same numpy stream as pipelines/torch.py's (seed sequence
# [batch_seed, 1]); tests/test_dali.py checks both backends draw the same views.
BOX_STREAM = 1


class _Feeder:
    """DALI's external_source callback: the encoded images and parameters of this rank's next batch."""

    def __init__(self, source, spec: AugmentSpec, ctx: LoaderContext, global_batch: int, drop_last: bool,
                 pack_view_params):
        self.source, self.spec, self.ctx, self.pack = source, spec, ctx, pack_view_params
        self.global_batch, self.drop_last = global_batch, drop_last
        self.batches: list[np.ndarray] = []
        self.epoch = self.step = 0
        self.in_flight: collections.deque[np.ndarray] = collections.deque()  # fed, not yet returned

    def start(self, epoch: int, start_batch: int) -> None:
        self.batches = shard_batches(len(self.source), self.global_batch, self.ctx.seed, epoch,
                                     self.ctx.process_index, self.ctx.num_processes, self.drop_last)
        self.epoch, self.step = epoch, start_batch
        self.in_flight.clear()

    def stop(self) -> None:
        self.step = len(self.batches)

    def __call__(self):
        if self.step >= len(self.batches):
            raise StopIteration  # DALI ends the epoch once the batches already queued are returned
        idx, step = self.batches[self.step], self.step
        self.step += 1
        encoded, hw = self.source.read(idx)
        seed = batch_seed(self.ctx.seed, self.epoch, step, self.ctx.process_index)
        rng = np.random.default_rng([seed, BOX_STREAM])
        boxes = [ops.sample_crop_boxes(hw[:, 0], hw[:, 1], v.crop_scale, v.crop_ratio, rng) for v in self.spec.views]
        gen = torch.Generator().manual_seed(seed)
        params = [self.pack(b, ops.sample_view_params(len(idx), v, gen))
                  for b, v in zip(boxes, self.spec.views)]
        meta = np.stack([self.source.labels[idx], idx], axis=1).astype(np.int64)
        self.in_flight.append(idx)
        return [encoded, meta, *params]


def dali_graph():
    """pipelines.dali_graph, imported on first use: it imports DALI, which this module must not need."""
    try:
        from pipelines import dali_graph as graph
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "nvidia":
            raise UserError(INSTALL_HINT) from None
        raise
    return graph


class DaliViewLoader:
    def __init__(self, source, spec: AugmentSpec, ctx: LoaderContext, global_batch: int, drop_last: bool,
                 dali_device: str, workers: int, prefetch_queue_depth: int, hw_decoder_load: float):
        self.spec, self.ctx, self.dali_device = spec, ctx, dali_device
        self._source = source
        self._steps = steps_per_epoch(len(source), global_batch, drop_last)
        self._epoch, self._start = 0, 0
        graph = dali_graph()
        self._feeder = _Feeder(source, spec, ctx, global_batch, drop_last, graph.pack_view_params)
        self._running = False
        self._iteration = 0  # which __iter__ generator owns the pipeline
        self.batches_ahead = prefetch_queue_depth
        device_id = None
        if dali_device == "gpu":
            device_id = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
        try:  # a short last batch (drop_last false) is fed as a smaller batch: DALI takes any size up to this
            self.pipeline = graph.build_pipeline(
                spec, self._feeder, global_batch // ctx.num_processes, dali_device, device_id, max(1, workers),
                prefetch_queue_depth, hw_decoder_load, seed=ctx.seed)
        except RuntimeError as e:
            if dali_device != "gpu":
                raise
            raise UserError(f"DALI could not start its GPU pipeline on cuda:{device_id} "
                            f"({str(e).strip().splitlines()[0]}); set data.device=cpu to run it on the CPU") from None

    def __len__(self) -> int:
        return self._steps

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        check_start_batch(start_batch, self._steps)
        self._epoch, self._start = epoch, start_batch

    def __iter__(self):
        self._drain()
        self._feeder.start(self._epoch, self._start)
        self._running = True
        self._iteration += 1
        this = self._iteration
        try:
            while True:
                try:
                    out = self.pipeline.run()
                except StopIteration:
                    self.pipeline.reset()
                    self._running = False
                    return
                except UserError:  # raised by the feeder (an unreadable file); the pipeline is unusable
                    self._running = False
                    raise
                except RuntimeError as e:  # a DALI operator failed: most often an image it cannot decode
                    self._running = False
                    self._raise_bad_image(e)
                    raise
                self._feeder.in_flight.popleft()
                yield self._to_batch(out)
        finally:  # the consumer stopped early (the generator closed at its yield), unless a newer one runs
            if this == self._iteration:
                self._drain()

    def _drain(self) -> None:
        """Finish an epoch the consumer left early: discard the queued batches so the next starts clean."""
        if not self._running:
            return
        self._feeder.stop()
        while True:
            try:
                self.pipeline.run()
            except StopIteration:
                break
        self.pipeline.reset()
        self._running = False

    def _raise_bad_image(self, error: RuntimeError) -> None:
        # DALI's error names neither the file nor the sample: PIL finds it among the batches in flight.
        for idx in self._feeder.in_flight:
            self._source.check_decodes(idx)  # raises UserError naming a corrupt file, or a shard and sample key
        if "decod" in str(error).lower():
            in_flight = list(self._feeder.in_flight)
            where = self._source.describe(np.concatenate(in_flight)) if in_flight else self._source.root
            raise UserError(f"DALI failed to decode an image that PIL reads ({_dali_reason(error)}); the batches "
                            f"in flight came from {where}") from None

    def _to_batch(self, out) -> ViewBatch:
        target = self.ctx.device
        *views, meta = out
        meta = torch.from_numpy(np.array(meta.as_tensor()))
        views = tuple(self._to_torch(v) for v in views)
        if self.dali_device == "cpu" and target.type != "cpu":  # a GPU trainer fed by CPU-mode DALI
            views = tuple(host_to_device(v, target) for v in views)
        return ViewBatch(views, host_to_device(meta[:, 0], target), host_to_device(meta[:, 1], target))

    def _to_torch(self, tensor_list) -> torch.Tensor:
        if self.dali_device == "cpu":
            return torch.from_numpy(np.array(tensor_list.as_tensor()))  # a copy: DALI reuses its buffers
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device=self.ctx.device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.ctx.device))
        return out


def _dali_reason(error: RuntimeError) -> str:
    """The line of a DALI pipeline error that says what failed: its first lines are only "Critical error in
    pipeline:", then the operator's traceback, then what it encountered."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    noise = ("Critical error in pipeline", "Current pipeline object is no longer valid")
    useful = [ln for ln in lines if not ln.startswith(noise)]
    return useful[0] if useful else type(error).__name__


def dali_device(choice: str, ctx: LoaderContext) -> str:
    """Where DALI runs: "gpu" (mixed decode) or "cpu", from data.device and the training device."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("data.device=cuda runs DALI's GPU (mixed) JPEG decoder but this machine has no usable "
                        "CUDA GPU; set data.device=cpu to run the same DALI pipeline on the CPU")
    return "gpu" if data_device(choice, ctx).type == "cuda" else "cpu"


@BACKENDS.register("dali")
def build(data_cfg, spec: AugmentSpec, ctx: LoaderContext) -> DaliViewLoader:
    dali_graph()  # the install hint comes first: nothing else can work without DALI
    if data_cfg.workers < 0:
        raise UserError(f"data.workers={data_cfg.workers}; expected DALI CPU threads >= 1 (0 means 1)")
    check_global_batch(data_cfg.batch_size, ctx.num_processes)
    if data_cfg.dali_prefetch_queue_depth < 1:
        raise UserError(f"data.dali_prefetch_queue_depth={data_cfg.dali_prefetch_queue_depth}; expected >= 1")
    if not 0.0 <= data_cfg.dali_hw_decoder_load <= 1.0:
        raise UserError(f"data.dali_hw_decoder_load={data_cfg.dali_hw_decoder_load}; expected a share in [0, 1]")
    device = dali_device(data_cfg.device, ctx)
    if resolve_compile(data_cfg.compile, torch.device("cpu"), "data.compile"):
        raise UserError("data.compile=true compiles the torch augmentation of the torch and ffcv backends; DALI "
                        "runs its own operators: use auto or false with data.backend=dali")
    source = open_source(data_cfg.path)
    check_dataset_batches(data_cfg.path, len(source), data_cfg.batch_size, data_cfg.drop_last, ctx.num_processes)
    return DaliViewLoader(source, spec, ctx, data_cfg.batch_size, data_cfg.drop_last, device, data_cfg.workers,
                          data_cfg.dali_prefetch_queue_depth, data_cfg.dali_hw_decoder_load)
