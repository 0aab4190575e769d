"""Backend-neutral tensor helpers for multi-tensor kernels (Triton and CUDA alike).

Elementwise kernels walk flat memory. :class:`ElementwiseOperands` hands them, per tensor
index, flat views in memory order of that index's operands (param, grad, momentum buffer,
mask; or particles, average, mask): a channels_last weight, its grad, buffer and mask run in
place, with no copies. Only operands whose layout differs from the index's layout run on
stand-in copies (written back for in-place columns). :func:`dense_view` gives order-sensitive
kernels (pruning) a contiguous stand-in; :func:`group_by` splits a tensor list into launch
groups (e.g. one per dtype).
"""
from __future__ import annotations

import math
from typing import Hashable, Sequence

import torch


def group_by(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Indices grouped by key, in first-seen order (e.g. one launch per dtype group)."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def dense_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous, else a contiguous copy."""
    return t if t.is_contiguous() else t.contiguous()


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def densely_packed(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """True when a tensor of this shape and these strides covers exactly ``numel`` consecutive
    elements, each once, in some dimension order (size-1 dims, whose strides are arbitrary, are
    ignored; an empty tensor is trivially packed)."""
    if 0 in shape:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(shape, strides) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def overlaps_itself(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """True when two indices of a tensor of this shape and these strides may address one element
    (an ``expand``-ed or overlapping ``as_strided`` view). Exact for dense layouts and views of
    them; an interleaving in which no dimension's stride steps past all smaller ones counts too."""
    if 0 in shape:
        return False
    reach = 0   # the largest offset the dimensions of smaller stride reach
    for stride, size in sorted((st, sz) for sz, st in zip(shape, strides) if sz != 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _same_layout(shape: Sequence[int], strides: Sequence[int], target: Sequence[int]) -> bool:
    """True when ``strides`` and ``target`` place every element of ``shape`` at the same offset."""
    return 0 in shape or all(size == 1 or a == b for size, a, b in zip(shape, strides, target))


def particle_row_strides(param: torch.Tensor) -> tuple[int, ...]:
    """Strides of one particle of a stacked ``[P, *shape]`` param as the elementwise kernels
    lay it out: ``param[0]``'s strides when the P rows are densely packed one after the other
    (``param.stride(0) == numel(shape)`` unless P == 1, and ``param[0]`` densely packed), else
    contiguous strides."""
    shape, strides = param.shape[1:], param.stride()[1:]
    if densely_packed(shape, strides) and (param.shape[0] == 1 or param.stride(0) == math.prod(shape)):
        return tuple(strides)
    return _contiguous_strides(shape)


def empty_particle_row(param: torch.Tensor) -> torch.Tensor:
    """Uninitialised ``param.shape[1:]`` tensor of param's dtype and device, laid out as
    :func:`particle_row_strides` says (so the elementwise kernels write it in place)."""
    return torch.empty_strided(param.shape[1:], particle_row_strides(param), dtype=param.dtype,
                               device=param.device)


class ElementwiseOperands:
    """Kernel-ready operands of an elementwise multi-tensor op, one column per argument list.

    ``columns[c][i]`` is operand c of tensor index i (None entries stay None). The first
    column holds the anchors: every other operand of index i has the anchor's shape, or,
    for a stacked ``[P, *shape]`` anchor, ``shape`` (a row: mask, average). Kernels index an
    operand of full shape by the flat offset ``k * row_numel + j`` of particle k (k = 0
    unstacked) and a row by ``j`` (the contract of every elementwise kernel here).

    For each index, the layout is the anchor's when it is densely packed (stacked: its
    P rows packed one after the other, :func:`particle_row_strides`), else contiguous.
    Operands already in that layout are used in place; others run on stand-in copies in it.
    :attr:`columns` then holds views in memory order: ``(numel,)`` for unstacked operands,
    ``(P, row_numel)`` for stacked anchors and their full-shape companions, ``(row_numel,)``
    for rows. An index whose operands are all contiguous keeps its tensors unchanged.
    :attr:`stand_ins` lists ``(column, index)`` of every operand that runs on a copy; after
    the launch, :meth:`write_back` copies those of the ``written`` columns into their originals.
    """

    def __init__(self, columns: Sequence[Sequence[torch.Tensor | None]], written: Sequence[int] = ()):
        self._written = tuple(written)
        self._copies: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # column, index, original, copy
        if all(t is None or t.is_contiguous() for column in columns for t in column):
            self.columns = [list(column) for column in columns]   # the common case, checked in one pass
            return
        out: list[list[torch.Tensor | None]] = [[] for _ in columns]
        for i, operands in enumerate(zip(*columns)):
            for c, x in enumerate(self._index_operands(i, operands)):
                out[c].append(x)
        self.columns = out

    @property
    def stand_ins(self) -> list[tuple[int, int]]:
        """``(column, index)`` of every operand that runs on a copy."""
        return [(c, i) for c, i, _, _ in self._copies]

    def _index_operands(self, i: int, operands) -> list[torch.Tensor | None]:
        if all(t is None or t.is_contiguous() for t in operands):
            return list(operands)
        anchor = operands[0]
        stacked = any(t is not None and t.dim() < anchor.dim() for t in operands)
        if stacked:
            row_strides = particle_row_strides(anchor)
            row_numel = math.prod(anchor.shape[1:])
            full_strides = (row_numel, *row_strides)
        else:
            full_strides = (anchor.stride() if densely_packed(anchor.shape, anchor.stride())
                            else _contiguous_strides(anchor.shape))
        views = []
        for c, t in enumerate(operands):
            if t is None:
                views.append(None)
                continue
            is_row = t.dim() < anchor.dim()
            target = row_strides if is_row else full_strides
            if not _same_layout(t.shape, t.stride(), target):
                copy = torch.empty_strided(t.shape, target, dtype=t.dtype, device=t.device).copy_(t)
                self._copies.append((c, i, t, copy))
                t = copy
            if is_row:
                views.append(t.as_strided((row_numel,), (1,)))
            elif stacked:
                views.append(t.as_strided((anchor.shape[0], row_numel), (row_numel, 1)))
            else:
                views.append(t.as_strided((t.numel(),), (1,)))
        return views

    def write_back(self) -> None:
        """Copy the results computed in stand-ins of written columns into their originals."""
        for column, _, original, copy in self._copies:
            if column in self._written:
                original.copy_(copy)


def allocate_first_buffers(params: Sequence[torch.Tensor],
                           momentum_buffers: list[torch.Tensor | None]) -> list[bool]:
    """Fill the None entries of ``momentum_buffers`` with uninitialised buffers in their param's
    dtype and layout (``torch.empty_like``: a dense param's strides, so no stand-in copies) and
    return which entries were None (their first momentum step: the kernel writes, never reads them)."""
    first_step = [b is None for b in momentum_buffers]
    for i, first in enumerate(first_step):
        if first:
            momentum_buffers[i] = torch.empty_like(params[i])
    return first_step
