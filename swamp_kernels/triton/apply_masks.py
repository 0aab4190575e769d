"""``apply_masks_`` in Triton: zero masked entries of many tensors in one launch per dtype
(two where some tensors are not 16-byte aligned: :func:`~swamp_kernels.triton.multi_tensor.vector_aligned`).

Each tensor is seen as ``rows`` rows of the mask's length: one row for a mask of the tensor's
shape, P rows for a mask broadcast over the particles of a ``[P, *shape]`` tensor. The chunk
map runs over one row; a program reads its mask chunk once and applies it to every row. Per
launch, one int64 table holds four columns of T entries: tensor addresses, mask addresses,
mask lengths, row counts.
"""
from __future__ import annotations

import triton
import triton.language as tl

from swamp_kernels._tensors import ElementwiseOperands, group_by
from swamp_kernels.triton.multi_tensor import chunk_map, chunk_of, table_pointer, tl_dtype, vector_aligned
from swamp_kernels.triton.optional_masks import load_keep, masked_operand_table, row_split

CHUNK = 4096


@triton.jit
def _apply_masks_kernel(table, num_tensors, row_numels, chunk_tensor, chunk_start,
                        DTYPE: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
    t, row_numel, offsets, inside = chunk_of(row_numels, chunk_tensor, chunk_start, tl.program_id(0), CHUNK,
                                             ALIGNED)
    x_ptr = table_pointer(table, t, DTYPE, ALIGNED)
    keep = load_keep(tl.load(table + num_tensors + t), tl.load(table + 2 * num_tensors + t), offsets, inside,
                     ALIGNED)
    rows = tl.load(table + 3 * num_tensors + t)
    for r in range(rows):
        at = r * row_numel + offsets
        x = tl.load(x_ptr + at, mask=inside)
        tl.store(x_ptr + at, tl.where(keep, x, tl.zeros_like(x)), mask=inside)


def apply_masks_(tensors, masks) -> None:
    """Masks have each tensor's shape, or its shape without the leading particle dim; operands
    sharing a dense layout (e.g. channels_last) run in place."""
    operands = ElementwiseOperands([tensors, masks], written=(0,))
    xs, ms = operands.columns
    device = xs[0].device
    splits = [row_split(x, m) for x, m in zip(xs, ms)]
    keys = [(x.dtype, vector_aligned([x, m], row_numel)) for x, m, (_, row_numel) in zip(xs, ms, splits)]
    for (dtype, aligned), idx in group_by(keys).items():
        rows, row_numels = zip(*(splits[i] for i in idx))
        chunks = chunk_map(row_numels, CHUNK, device, aligned=aligned)
        if chunks.num_chunks == 0:
            continue
        table = masked_operand_table([[xs[i] for i in idx]], [ms[i] for i in idx], device, extra=rows)
        _apply_masks_kernel[(chunks.num_chunks,)](
            table, len(idx), chunks.numels, chunks.chunk_tensor, chunks.chunk_start,
            DTYPE=tl_dtype(dtype), CHUNK=chunks.chunk, ALIGNED=aligned)
    operands.write_back()
