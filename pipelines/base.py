"""The loader protocol every backend implements, and the sharding rule they all share."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from fastssl.errors import UserError
from fastssl.registry import Registry


@dataclass
class ViewBatch:
    """What a backend hands the method: augmented views already on the training device."""

    views: tuple[torch.Tensor, ...]  # each N x C x H x W, float, normalised
    labels: torch.Tensor  # N, int64 (class index; never used by the self-supervised loss)
    indices: torch.Tensor  # N, int64 dataset indices (for tests and kNN bookkeeping)


@dataclass(frozen=True)
class LoaderContext:
    """Where this process sits: accelerate's process index / count and the training device."""

    device: torch.device
    process_index: int = 0
    num_processes: int = 1
    seed: int = 0


class ViewLoader(Protocol):
    def __iter__(self) -> Iterator[ViewBatch]: ...

    def __len__(self) -> int: ...  # batches per epoch (identical on every process)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...  # start_batch: resume mid-epoch

    # The most batches the loader prepares before they are asked for (its prefetch queue): a benchmark window
    # of fewer batches than a few times this partly times batches made before it started.
    batches_ahead: int


# name -> builder(data_cfg: DataConfig, spec: AugmentSpec, ctx: LoaderContext) -> ViewLoader
BACKENDS: Registry = Registry("data backend")


def steps_per_epoch(num_samples: int, global_batch: int, drop_last: bool) -> int:
    return num_samples // global_batch if drop_last else -(-num_samples // global_batch)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global sample order of an epoch: identical on every process (same seed, same epoch)."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_samples)


def host_to_device(x, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host array or tensor (labels, indices, crop boxes, views made on the CPU) on `device` without a host
    sync: a copy from pageable memory first waits for all work queued on the stream; staged through pinned
    memory it is queued behind it and overlaps the training step (the caching host allocator keeps the staging
    buffer until the copy has run)."""
    t = torch.as_tensor(x, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def check_data_device(choice: str) -> None:
    if choice not in ("auto", "cpu", "cuda"):
        raise UserError(f"data.device={choice!r}; expected auto, cpu or cuda")


def data_device(choice: str, ctx: LoaderContext) -> torch.device:
    """Where a backend makes the views, from data.device: auto (the training device), cpu, or cuda (which must
    be the training device: views are not moved between GPUs)."""
    check_data_device(choice)
    target = torch.device(ctx.device)
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" and target.type != "cuda":
        raise UserError(f"data.device='cuda' but the training device is {target}; use auto or cpu")
    return target


def check_global_batch(global_batch: int, num_processes: int) -> None:
    """data.batch_size is the global batch: every process takes an equal share (checked before reading data)."""
    if global_batch < 1:
        raise UserError(f"data.batch_size={global_batch}; expected the global batch, a positive integer")
    if global_batch % num_processes:
        raise UserError(f"data.batch_size={global_batch} is the global batch; expected a multiple of the "
                        f"{num_processes} processes")


def check_dataset_batches(source: str, num_samples: int, global_batch: int, drop_last: bool,
                          num_processes: int) -> None:
    """What the data must allow, for every backend: at least one batch, and equal shares of a short last batch
    (the global negatives, Shuffle BN and the MoCo queue all-gather equal-sized tensors from every process)."""
    if drop_last and num_samples < global_batch:
        raise UserError(f"{source} holds {num_samples} images, fewer than one global batch of {global_batch} "
                        f"(data.drop_last=true); lower data.batch_size")
    tail = num_samples % global_batch
    if not drop_last and tail % num_processes:
        raise UserError(f"data.drop_last=false leaves a last global batch of {tail} images of {source}, which "
                        f"{num_processes} processes cannot share equally; set data.drop_last=true or a "
                        f"data.batch_size that leaves a multiple of {num_processes}")


def check_start_batch(start_batch: int, steps: int) -> None:
    """set_epoch's resume point: 0..steps, where `steps` (the epoch's length) resumes an epoch that has ended."""
    if not 0 <= start_batch <= steps:
        raise UserError(f"start_batch={start_batch} is outside this epoch's {steps} batches; expected an integer in "
                        f"0..{steps}")


def shard_order(order: np.ndarray, global_batch: int, process_index: int, num_processes: int,
                drop_last: bool) -> list[np.ndarray]:
    """This process's batches of one epoch, for any global order: global batch s is order[s*G:(s+1)*G] and
    process r takes its r-th contiguous chunk, so concatenating the processes' batches in rank order gives the
    global batch (what the distributed tests compare against). Without drop_last the last global batch is
    short; check_dataset_batches makes it split into equal shares."""
    batches = []
    for s in range(steps_per_epoch(len(order), global_batch, drop_last)):
        g = np.asarray(order[s * global_batch:(s + 1) * global_batch], dtype=np.int64)
        batches.append(np.array_split(g, num_processes)[process_index])
    return batches


def shard_batches(num_samples: int, global_batch: int, seed: int, epoch: int, process_index: int,
                  num_processes: int, drop_last: bool = True, shuffle: bool = True) -> list[np.ndarray]:
    """Dataset indices of this process's batches for one epoch, in the shared epoch order."""
    return shard_order(epoch_order(num_samples, seed, epoch, shuffle), global_batch, process_index, num_processes,
                       drop_last)


def batch_seed(seed: int, epoch: int, step: int, process_index: int) -> int:
    """Seed of the augmentation randomness of one batch on one process.

    Derived, not stateful, so a resumed run draws the same views as an uninterrupted one and ranks draw
    independent views.
    """
    return int(np.random.SeedSequence([seed, epoch, step, process_index]).generate_state(1, np.uint64)[0] >> 1)


_BACKEND_MODULES = {"torch": "pipelines.torch", "dali": "pipelines.dali", "ffcv": "pipelines.ffcv"}


def check_backend(name: str) -> None:
    if name not in _BACKEND_MODULES:
        raise UserError(f"unknown data.backend {name!r}; valid: {', '.join(_BACKEND_MODULES)}")


def build_loader(data_cfg, spec, ctx: LoaderContext) -> ViewLoader:
    """Import the backend's module (it registers itself) and build its loader."""
    import importlib

    check_backend(data_cfg.backend)
    importlib.import_module(_BACKEND_MODULES[data_cfg.backend])  # they import without their optional package
    return BACKENDS.get(data_cfg.backend)(data_cfg, spec, ctx)
