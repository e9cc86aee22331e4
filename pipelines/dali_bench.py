"""Loader throughput in view pairs per second, the same way for every backend (for `tools/bench.py loader`).

What is timed is iterating the loader as training does (decode, both views, normalised tensors on the
device), after `warmup` batches that absorb graph building, worker start-up and first allocations. On CUDA
the clock stops after a synchronise, so queued GPU work is counted.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from fastssl.config import DataConfig
from pipelines.augment import preset
from pipelines.base import LoaderContext, build_loader


def loader_throughput(backend: str, path: str, image_size: int = 224, batch_size: int = 256, workers: int = 2,
                      device: str = "cpu", augment: str = "simclr", batches: int = 20, warmup: int = 2,
                      **data_fields) -> dict:
    """Time `batches` batches of a `backend` loader over `path`; returns figures for a benchmark record."""
    dev = torch.device(device)
    data = replace(DataConfig(), backend=backend, path=path, device="cpu" if dev.type == "cpu" else "auto",
                   image_size=image_size, batch_size=batch_size, workers=workers, augment=augment, **data_fields)
    spec = preset(augment, image_size)
    loader = build_loader(data, spec, LoaderContext(dev))
    if warmup < 1:
        raise ValueError("warmup must be >= 1: the first batch includes building the pipeline")
    done, epoch, start = 0, 0, 0.0
    while done < warmup + batches:
        loader.set_epoch(epoch)
        for batch in loader:
            done += 1
            if done == warmup:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                start = time.perf_counter()
            if done == warmup + batches:
                break
        epoch += 1
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    pairs = batches * batch_size
    return {"backend": backend, "device": str(dev), "image_size": image_size, "batch_size": batch_size,
            "workers": workers, "augment": augment, "batches": batches, "seconds": seconds,
            "pairs_per_s": pairs / seconds, "views_per_s": pairs * len(spec.views) / seconds,
            "views_shape": tuple(batch.views[0].shape)}


def dali_loader_throughput(path: str, **kwargs) -> dict:
    """DALI (CPU mode on a CPU device, `mixed` GPU decode on a CUDA device) view pairs per second."""
    return loader_throughput("dali", path, **kwargs)
