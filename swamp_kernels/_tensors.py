"""Backend-neutral tensor helpers for multi-tensor kernels (Triton and CUDA alike).

Kernels walk contiguous memory: :func:`dense_view` gives each tensor a contiguous
stand-in (:func:`elementwise_views` avoids the copy where operands share a dense layout) and :func:`write_back` copies in-place results back into the originals
(:func:`dense_optional` for lists that may be None or hold None, like masks);
:func:`group_by` splits a tensor list into launch groups (e.g. one per dtype).
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch


def group_by(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Indices grouped by key, in first-seen order (e.g. one launch per dtype group)."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def dense_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when contiguous, else a contiguous copy (copy back with :func:`write_back`)."""
    return t if t.is_contiguous() else t.contiguous()


def _densely_packed(t: torch.Tensor) -> bool:
    """True when ``t`` covers exactly ``numel`` consecutive elements in some dimension order."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def memory_order_views(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """1-D views in memory order of tensors sharing one shape and one dense layout, else None.

    An elementwise kernel may run on these in place: a channels_last weight and its
    channels_last mask need no contiguous copies. Contiguous tensors get None (use them as they are).
    """
    first = tensors[0]
    if first.is_contiguous() or not _densely_packed(first):
        return None
    if any(t.shape != first.shape or t.stride() != first.stride() for t in tensors[1:]):
        return None
    return [t.as_strided((t.numel(),), (1,)) for t in tensors]


def elementwise_views(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]):
    """Kernel-ready (tensors, masks): memory-order views where layouts agree, else contiguous stand-ins.

    Results written into the returned tensors reach the originals after :func:`write_back`.
    """
    xs, ms = [], []
    for t, m in zip(tensors, masks):
        x, mask = memory_order_views([t, m]) or (dense_view(t), dense_view(m))
        xs.append(x)
        ms.append(mask)
    return xs, ms


def dense_optional(xs: Sequence[torch.Tensor | None] | None, count: int) -> list[torch.Tensor | None]:
    """``count`` entries: all None when ``xs`` is None, else :func:`dense_view` of each entry (None stays None)."""
    if xs is None:
        return [None] * count
    return [None if x is None else dense_view(x) for x in xs]


def write_back(originals: Sequence[torch.Tensor], views: Sequence[torch.Tensor]) -> None:
    """Copy results computed in contiguous copies back into non-contiguous originals."""
    for original, view in zip(originals, views):
        if view.data_ptr() != original.data_ptr():
            original.copy_(view)
