"""``apply_masks_`` in Triton: zero masked entries of many tensors in one launch per dtype."""
from __future__ import annotations

import triton
import triton.language as tl

from swamp_kernels._tensors import ElementwiseOperands, group_by
from swamp_kernels.triton.multi_tensor import address_table, chunk_map, int64_table, tl_dtype

CHUNK = 4096


@triton.jit
def _apply_masks_kernel(x_addrs, mask_addrs, numels, mask_numels, chunk_tensor, chunk_start,
                        DTYPE: tl.constexpr, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    x_ptr = tl.load(x_addrs + t).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(mask_addrs + t).to(tl.pointer_type(tl.int8))
    offs = tl.load(chunk_start + c) + tl.arange(0, CHUNK)
    inside = offs < tl.load(numels + t)
    keep = tl.load(m_ptr + offs % tl.load(mask_numels + t), mask=inside, other=0)
    x = tl.load(x_ptr + offs, mask=inside)
    tl.store(x_ptr + offs, tl.where(keep != 0, x, tl.zeros_like(x)), mask=inside)


def apply_masks_(tensors, masks) -> None:
    """Masks have each tensor's shape, or its shape without the leading particle dim; operands
    sharing a dense layout (e.g. channels_last) run in place."""
    operands = ElementwiseOperands([tensors, masks], written=(0,))
    xs, ms = operands.columns
    device = xs[0].device
    for idx in group_by([x.dtype for x in xs]).values():
        chunks = chunk_map([xs[i].numel() for i in idx], CHUNK, device)
        if chunks.num_chunks == 0:
            continue
        _apply_masks_kernel[(chunks.num_chunks,)](
            address_table([xs[i] for i in idx], device), address_table([ms[i] for i in idx], device),
            chunks.numels, int64_table([max(ms[i].numel(), 1) for i in idx], device),
            chunks.chunk_tensor, chunks.chunk_start, DTYPE=tl_dtype(xs[idx[0]].dtype), CHUNK=CHUNK)
    operands.write_back()
