"""Multi-tensor launch plumbing for Triton kernels: one launch walks many tensors.

A kernel receives, per operand, a device table of raw addresses (``int64``, one per
tensor; cast in the kernel with ``tl.load(table + t).to(tl.pointer_type(dtype))``),
the tensors' lengths and a chunk map: program ``c`` handles elements
``[chunk_start[c], chunk_start[c] + chunk)`` of tensor ``chunk_tensor[c]``
(:func:`chunk_of` reads that in the kernel).
Tensors are never concatenated; the tables are small host arrays copied once. Tensors whose
operands all start on 16-byte boundaries with lengths in multiples of 16 (:func:`vector_aligned`)
go to a launch compiled with ``ALIGNED``, where every load and store moves 16 bytes; the others
(a ResNet's 1000-entry classifier bias, an offset view) to a second launch with single-entry
accesses. Launches per call stay independent of the number of tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class ChunkMap:
    """Work split of a tensor list into fixed-size chunks, as device tensors."""
    numels: torch.Tensor        # int64 [T]: elements of each tensor
    chunk_tensor: torch.Tensor  # int32 [C]: tensor index of each chunk
    chunk_start: torch.Tensor   # int64 [C]: first element of each chunk within its tensor
    chunk: int                  # elements per chunk

    @property
    def num_chunks(self) -> int:
        return self.chunk_tensor.numel()


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    host = torch.from_numpy(array)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def chunk_arrays(numels: Sequence[int], chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Host arrays of a chunk map: tensor index (int32) and first element (int64) of each chunk."""
    sizes = np.asarray(numels, dtype=np.int64)
    per_tensor = (sizes + chunk - 1) // chunk
    tensor_of_chunk = np.repeat(np.arange(len(sizes), dtype=np.int32), per_tensor)
    first = np.repeat(np.cumsum(per_tensor) - per_tensor, per_tensor)
    return tensor_of_chunk, (np.arange(len(tensor_of_chunk), dtype=np.int64) - first) * chunk


# Elements per program of a launch that is not ALIGNED: each entry then needs a 64-bit address
# per operand in registers, and 1024 (8 per thread of 4 warps) keeps every kernel free of spills
# on sm_90 (16 or 32 per thread spilled the particle average: tests/test_triton_aot.py).
UNALIGNED_CHUNK = 1024


def chunk_map(numels: Sequence[int], chunk: int, device: torch.device, *, aligned: bool = True) -> ChunkMap:
    """Split tensors of the given lengths into chunks of ``chunk`` elements (last ones short); a
    launch that is not ``aligned`` (:func:`vector_aligned`) takes at most ``UNALIGNED_CHUNK``.
    The kernel's ``CHUNK`` is the map's ``chunk``."""
    chunk = chunk if aligned else min(chunk, UNALIGNED_CHUNK)
    tensor_of_chunk, start = chunk_arrays(numels, chunk)
    return ChunkMap(_to_device(np.asarray(numels, dtype=np.int64), device),
                    _to_device(tensor_of_chunk, device), _to_device(start, device), chunk)


def int64_table(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """Host integers as an int64 device tensor (pinned, asynchronous copy on CUDA)."""
    return _to_device(np.asarray(values, dtype=np.int64), device)


def tl_dtype(dtype: torch.dtype):
    """The Triton element type of a torch dtype (bool masks are read as int8)."""
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.bool: tl.int8, torch.int32: tl.int32, torch.int64: tl.int64}[dtype]


VECTOR_BYTES = 16   # the widest load of one thread


def vector_aligned(tensors: Sequence[torch.Tensor | None], numel: int) -> bool:
    """True when every tensor starts at a ``VECTOR_BYTES`` boundary and ``numel`` (their
    length, or a row's) is a multiple of ``VECTOR_BYTES`` entries: an ``ALIGNED`` kernel may
    then move ``VECTOR_BYTES`` per load for every dtype (bool masks included) and row."""
    if numel % VECTOR_BYTES:
        return False
    for t in tensors:   # a loop, not all(<generator>): called per tensor of every launch
        if t is not None and t.data_ptr() % VECTOR_BYTES:
            return False
    return True


@triton.jit
def chunk_of(numels, chunk_tensor, chunk_start, c, CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
    """Chunk ``c`` of a chunk map: its tensor index, that tensor's length, the element offsets
    and their in-bounds flags (``offsets < length``). ``ALIGNED``: the lengths are multiples
    of ``VECTOR_BYTES`` (:func:`vector_aligned`), which lets the compiler vectorise."""
    t = tl.load(chunk_tensor + c)
    numel = tl.load(numels + t)
    start = tl.load(chunk_start + c)
    if ALIGNED:
        numel = tl.multiple_of(numel, 16)
        start = tl.multiple_of(start, CHUNK)
    offsets = start + tl.arange(0, CHUNK)
    return t, numel, offsets, offsets < numel


@triton.jit
def table_pointer(table, index, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The address ``table[index]`` as a pointer to ``DTYPE`` (``ALIGNED``: 16-byte aligned)."""
    pointer = tl.load(table + index).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer
