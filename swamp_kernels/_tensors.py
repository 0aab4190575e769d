"""Backend-neutral tensor helpers for multi-tensor kernels (Triton and CUDA alike).

Kernels walk contiguous memory: :func:`dense_view` gives each tensor a contiguous
stand-in and :func:`write_back` copies in-place results back into the originals
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
