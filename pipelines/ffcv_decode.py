"""FFCV decoder operations for fastssl's two-view pipeline (imports ffcv: load through pipelines/ffcv.py).

`RegionDecoder` decodes each image once and copies out a per-sample region of it (the box covering both
views' crops, or one view's crop box), edge-padded to the batch's largest region as `ops.pad_batch` does;
`IndexLabelDecoder` returns the dataset index beside the label so the loader knows which boxes belong to
which row whatever order ffcv ran.

Why the regions travel through a raw address: ffcv hands a decoder only (indices, its own buffers, the file
metadata, the storage state), and numba freezes any array a compiled function closes over into a constant
copy. The loader therefore owns one int32 (num_samples, 4) table, rewrites it before each epoch, and the
decoder re-reads it through its address. The table is never reallocated while a loader lives.
"""

from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np
from ffcv.libffcv import imdecode, memcpy
from ffcv.memory_managers import OSCacheManager, ProcessCacheManager
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

JPEG_MODE = 0  # ffcv.fields.rgb_image.IMAGE_MODES["jpg"]


def _readonly(dtype, ndim: int):
    return types.Array(dtype, ndim, "C", readonly=True)


# ffcv 1.0.2's memory managers declare their state type by setting `.mutable = False` on numba's interned
# `uint8[::1]`-style types. That changes the hash of types already used as dictionary keys, so the next
# loader in the process fails inside numba with a KeyError (and numba's finalizers print more of them).
# The same types, built fresh instead of mutated (and the one signature that relied on the mutation):
OSCacheManager.state_type = property(
    lambda self: types.Tuple([_readonly(types.uint8, 1), _readonly(types.uint64, 1), _readonly(types.uint64, 1)]))


def _os_cache_reader(self):
    def read(address, mem_state):
        size = mem_state[2][np.searchsorted(mem_state[1], address)]
        return mem_state[0][address:address + size]

    return Compiler.compile(read, _readonly(types.uint8, 1)(types.uint64, self.state_type))


OSCacheManager.compile_reader = _os_cache_reader
ProcessCacheManager.state_type = property(
    lambda self: types.Tuple([_readonly(types.uint8, 2), _readonly(types.uint64, 1), _readonly(types.uint64, 1),
                              _readonly(types.uint32, 1)]))

# Compiled once per process and shared by every loader (ffcv compiles its own copies per pipeline).
_imdecode = numba.njit(nogil=True)(imdecode)
_memcpy = numba.njit(nogil=True)(memcpy)


@intrinsic
def _voidptr(typingctx, address):
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


def table_reader(table: np.ndarray):
    """A function of no arguments returning `table` inside compiled code, without freezing its contents."""
    if not table.flags.c_contiguous or table.dtype != np.int32:
        raise TypeError("region table must be a C-contiguous int32 array")
    if not Compiler.is_enabled:  # ffcv's pure-Python debug mode
        return lambda: table
    address, shape = table.ctypes.data, table.shape

    @numba.njit(inline="always")
    def read():
        return numba.carray(_voidptr(address), shape, np.int32)

    return read


class RegionDecoder(Operation):
    """Decode each image once; output its `regions[index]` box (y0, x0, h, w), edge-padded, H x W x 3 uint8."""

    def __init__(self, regions: np.ndarray):
        super().__init__()
        self.regions = regions

    def declare_state_and_memory(self, previous_state: State):
        self.max_height = int(self.metadata["height"].max())
        self.max_width = int(self.metadata["width"].max())
        shape = (self.max_height, self.max_width, 3)
        u1 = np.dtype("u1")
        # Second buffer: the full decoded image, of which only the region is copied out.
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=u1),
                (AllocationQuery(shape, u1), AllocationQuery((self.max_height * self.max_width * 3,), u1)))

    def generate_code(self):
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c, memcpy_c = _imdecode, _memcpy
        read_regions = table_reader(self.regions)
        max_height, max_width = self.max_height, self.max_width

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, full_storage = my_storage
            regions = read_regions()
            n = len(batch_indices)
            # The batch's largest region bounds the padding, so only that much crosses to the device.
            hb, wb = 1, 1
            for i in range(n):
                hb = max(hb, regions[batch_indices[i], 2])
                wb = max(wb, regions[batch_indices[i], 3])
            hb, wb = min(hb, max_height), min(wb, max_width)
            for i in my_range(n):
                index = batch_indices[i]
                field = metadata[index]
                height, width = np.int64(field["height"]), np.int64(field["width"])
                image_data = mem_read(field["data_ptr"], storage_state)
                full = full_storage[i][:height * width * 3]
                if field["mode"] == JPEG_MODE:
                    imdecode_c(image_data, full, height, width, height, width, 0, 0, 1, 1, False, False)
                else:
                    memcpy_c(image_data, full)
                image = full.reshape(height, width, 3)
                # Clamped because the table may be rewritten for the next epoch while an abandoned
                # iterator still decodes: a torn read must stay inside the image (numba has no bounds checks).
                y0 = min(max(np.int64(regions[index, 0]), 0), height - 1)
                x0 = min(max(np.int64(regions[index, 1]), 0), width - 1)
                h = min(max(np.int64(regions[index, 2]), 1), height - y0, hb)
                w = min(max(np.int64(regions[index, 3]), 1), width - x0, wb)
                out = destination[i]
                out[:h, :w] = image[y0:y0 + h, x0:x0 + w]
                # Edge replication, as ops.pad_batch (crop_resize reads only the box, so any fill would do).
                for y in range(h, hb):
                    out[y, :w] = out[h - 1, :w]
                for x in range(w, wb):
                    out[:hb, x] = out[:hb, w - 1]
            return destination[:n, :hb, :wb]

        decode.is_parallel = True
        return decode


class IndexLabelDecoder(Operation):
    """(dataset index, label) per row, int64, from an IntField."""

    def declare_state_and_memory(self, previous_state: State):
        i8 = np.dtype("<i8")
        return replace(previous_state, jit_mode=True, shape=(2,), dtype=i8), AllocationQuery((2,), i8)

    def generate_code(self):
        def decode(batch_indices, destination, metadata, storage_state):
            for i in range(len(batch_indices)):
                destination[i, 0] = batch_indices[i]
                destination[i, 1] = metadata[batch_indices[i]]
            return destination[:len(batch_indices)]

        return decode
