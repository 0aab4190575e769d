"""``masked_sgd_step_`` in Triton: ``torch.optim.SGD`` on ``grad * mask``, then ``param *= mask``.

One launch per group of tensors sharing (param dtype, grad dtype, first momentum step,
alignment: :func:`~swamp_kernels.triton.multi_tensor.vector_aligned`).
Each tensor is seen as ``rows`` rows of ``numel / rows`` entries, where the mask (if any)
covers one row: a full-shape mask gives one row, a mask broadcast over the P particles
of a ``[P, *shape]`` param gives P rows. The chunk map runs over one row; a program
reads its mask chunk once and updates that chunk in every row, in float32 registers.
Per launch, one int64 table holds six columns of T entries: param, grad and momentum
buffer addresses, mask addresses, mask lengths (0: no mask), row counts.
On the first momentum step the host allocates the buffers and the kernel writes them.
Operands are flat memory-order views (:class:`~swamp_kernels._tensors.ElementwiseOperands`):
a channels_last param, grad, buffer and mask are updated in place, without copies.
"""
from __future__ import annotations

import triton
import triton.language as tl

from swamp_kernels._tensors import ElementwiseOperands, allocate_first_buffers, group_by
from swamp_kernels.triton.multi_tensor import chunk_map, chunk_of, table_pointer, tl_dtype, vector_aligned
from swamp_kernels.triton.optional_masks import load_keep, masked_operand_table, row_split

CHUNK = 2048


@triton.jit
def _masked_sgd_kernel(table, num_tensors, row_numels, chunk_tensor, chunk_start,
                       neg_lr, momentum, one_minus_dampening, weight_decay,
                       PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
                       MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr,
                       MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, CHUNK: tl.constexpr,
                       ALIGNED: tl.constexpr):
    """One step on ``grad * mask`` then ``param *= mask``; the loads are independent of the mask
    (it selects), so they are in flight together, and with ``ALIGNED`` each moves 16 bytes."""
    t, row_numel, offsets, inside = chunk_of(row_numels, chunk_tensor, chunk_start, tl.program_id(0), CHUNK,
                                             ALIGNED)
    param_ptr = table_pointer(table, t, PARAM_DTYPE, ALIGNED)
    grad_ptr = table_pointer(table, num_tensors + t, GRAD_DTYPE, ALIGNED)
    buffer_ptr = table_pointer(table, 2 * num_tensors + t, PARAM_DTYPE, ALIGNED)
    keep = load_keep(tl.load(table + 3 * num_tensors + t), tl.load(table + 4 * num_tensors + t),
                     offsets, inside, ALIGNED)
    rows = tl.load(table + 5 * num_tensors + t)
    for r in range(rows):
        at = r * row_numel + offsets
        param = tl.load(param_ptr + at, mask=inside).to(tl.float32)
        step = tl.where(keep, tl.load(grad_ptr + at, mask=inside, other=0).to(tl.float32), 0.0)
        if MAXIMIZE:
            step = -step
        if WEIGHT_DECAY:
            step = step + weight_decay * param
        if MOMENTUM:
            if FIRST_STEP:
                buffer = step
            else:
                buffer = tl.load(buffer_ptr + at, mask=inside).to(tl.float32)
                buffer = buffer * momentum + one_minus_dampening * step
            tl.store(buffer_ptr + at, buffer.to(PARAM_DTYPE), mask=inside)
            if NESTEROV:
                step = step + momentum * buffer
            else:
                step = buffer
        param = param + neg_lr * step
        tl.store(param_ptr + at, tl.where(keep, param, 0.0).to(PARAM_DTYPE), mask=inside)


def masked_sgd_step_(params, grads, momentum_buffers, masks, *, lr, momentum, dampening,
                     weight_decay, nesterov, maximize) -> None:
    """Inputs validated by :func:`swamp_kernels.masked_sgd_step_`; new buffers (in their
    param's layout) go into ``momentum_buffers``. Operands sharing a dense layout run in place."""
    device = params[0].device
    count = len(params)
    buffers = [None] * count
    first_step = [False] * count
    if momentum != 0:
        first_step = allocate_first_buffers(params, momentum_buffers)
        buffers = momentum_buffers
    operands = ElementwiseOperands([params, grads, buffers, masks or [None] * count], written=(0, 2))
    ps, gs, bs, ms = operands.columns
    # a param's own address stands in for a buffer the kernel never touches
    bs = [p if b is None else b for p, b in zip(ps, bs)]
    splits = [row_split(p, m) for p, m in zip(ps, ms)]
    keys = [(p.dtype, g.dtype, first, vector_aligned([p, g, b, m], row_numel))
            for p, g, b, m, first, (_, row_numel) in zip(ps, gs, bs, ms, first_step, splits)]
    for (param_dtype, grad_dtype, first, aligned), idx in group_by(keys).items():
        rows, row_numels = zip(*(splits[i] for i in idx))
        chunks = chunk_map(row_numels, CHUNK, device, aligned=aligned)
        if chunks.num_chunks == 0:
            continue
        table = masked_operand_table([[ps[i] for i in idx], [gs[i] for i in idx], [bs[i] for i in idx]],
                                     [ms[i] for i in idx], device, extra=rows)
        _masked_sgd_kernel[(chunks.num_chunks,)](
            table, len(idx), chunks.numels, chunks.chunk_tensor, chunks.chunk_start,
            -lr, momentum, 1.0 - dampening, weight_decay,
            PARAM_DTYPE=tl_dtype(param_dtype), GRAD_DTYPE=tl_dtype(grad_dtype),
            MOMENTUM=momentum != 0, FIRST_STEP=first, NESTEROV=nesterov, MAXIMIZE=maximize,
            WEIGHT_DECAY=weight_decay != 0, CHUNK=chunks.chunk, ALIGNED=aligned)
    operands.write_back()
