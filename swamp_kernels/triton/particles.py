"""``particle_average`` and ``swa_update_`` in Triton: one pass over memory, one launch per dtype group
(two where some tensors are not 16-byte aligned: :func:`~swamp_kernels.triton.multi_tensor.vector_aligned`).

A parameter of P particles is one ``[P, *shape]`` tensor; the chunk map runs over the
``shape`` entries and each program sums its entries over the P particles in float32.
``particle_average`` is ``swa_update_`` with ``n_averaged == 0`` into fresh tensors.
Per launch, one int64 table holds four columns of T entries: particle tensor
addresses, output addresses, mask addresses, mask lengths (0: no mask).
Operands are flat memory-order views (:class:`~swamp_kernels._tensors.ElementwiseOperands`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from swamp_kernels._tensors import ElementwiseOperands, empty_particle_row, group_by
from swamp_kernels.triton.multi_tensor import chunk_map, chunk_of, table_pointer, tl_dtype, vector_aligned
from swamp_kernels.triton.optional_masks import load_keep, masked_operand_table

CHUNK = 4096


@triton.jit
def _average_kernel(table, num_tensors, numels, chunk_tensor, chunk_start, num_particles, divisor,
                    PARAM_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, COPY: tl.constexpr,
                    CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
    """out = mean_p(params) if COPY else out + (mean_p(params) - out) / divisor; 0 where masked.

    Every load is independent of the others (the mask selects at the end), so all are in
    flight together, and with ``ALIGNED`` each moves 16 bytes."""
    t, numel, offsets, inside = chunk_of(numels, chunk_tensor, chunk_start, tl.program_id(0), CHUNK, ALIGNED)
    param_ptr = table_pointer(table, t, PARAM_DTYPE, ALIGNED)
    out_ptr = table_pointer(table, num_tensors + t, OUT_DTYPE, ALIGNED)
    keep = load_keep(tl.load(table + 2 * num_tensors + t), tl.load(table + 3 * num_tensors + t),
                     offsets, inside, ALIGNED)
    if not COPY:
        current = tl.load(out_ptr + offsets, mask=inside, other=0).to(tl.float32)
    total = tl.zeros([CHUNK], dtype=tl.float32)
    for k in range(num_particles):
        total += tl.load(param_ptr + k * numel + offsets, mask=inside, other=0).to(tl.float32)
    average = total / num_particles
    if not COPY:
        average = current + (average - current) / divisor
    tl.store(out_ptr + offsets, tl.where(keep, average, 0.0).to(OUT_DTYPE), mask=inside)


def _average_into(params, outs, masks, n_averaged: int) -> None:
    """Launch :func:`_average_kernel` on kernel-ready operands (:class:`ElementwiseOperands`
    columns), one launch per dtype pair and alignment (:func:`vector_aligned`)."""
    device = params[0].device
    keys = [(p.dtype, o.dtype, vector_aligned([p, o, m], o.numel())) for p, o, m in zip(params, outs, masks)]
    for (param_dtype, out_dtype, aligned), idx in group_by(keys).items():
        chunks = chunk_map([outs[i].numel() for i in idx], CHUNK, device, aligned=aligned)
        if chunks.num_chunks == 0:
            continue
        table = masked_operand_table([[params[i] for i in idx], [outs[i] for i in idx]],
                                     [masks[i] for i in idx], device)
        _average_kernel[(chunks.num_chunks,)](
            table, len(idx), chunks.numels, chunks.chunk_tensor, chunks.chunk_start,
            params[0].shape[0], float(n_averaged + 1),
            PARAM_DTYPE=tl_dtype(param_dtype), OUT_DTYPE=tl_dtype(out_dtype),
            COPY=n_averaged == 0, CHUNK=chunks.chunk, ALIGNED=aligned)


def particle_average(params, masks=None) -> list[torch.Tensor]:
    """New tensors: the masked particle mean in each param's dtype, laid out like one particle
    (``params[i][0]``'s strides when the particles are densely packed, else contiguous; see
    :func:`~swamp_kernels._tensors.particle_row_strides`)."""
    outs = [empty_particle_row(p) for p in params]
    swa_update_(outs, params, 0, masks)
    return outs


def swa_update_(swa, params, n_averaged: int, masks=None) -> None:
    """``swa += (mean_p(params) - swa) / (n_averaged + 1)`` in place; ``swa`` is not read at 0.
    No copies where ``swa``, the masks and one particle share a dense layout."""
    operands = ElementwiseOperands([params, swa, masks or [None] * len(params)], written=(1,))
    _average_into(*operands.columns, n_averaged)
    operands.write_back()
