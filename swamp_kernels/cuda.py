"""CUDA backend: the compiled ops of ``swamp_kernels._C`` behind the backend signatures.

Importing this module never needs the extension; an op imports ``swamp_kernels._C``
(which registers ``torch.ops.swamp_kernels.*``) when it first runs, and raises
ImportError if the extension was not built. The dispatcher checks availability first.
Kernels read contiguous memory: non-contiguous operands run on contiguous copies that
are written back.
"""
from __future__ import annotations

import importlib

import torch

from swamp_kernels._tensors import dense_view, write_back


def _ops():
    """``torch.ops.swamp_kernels`` with the compiled ops registered."""
    importlib.import_module("swamp_kernels._C")
    return torch.ops.swamp_kernels


def apply_masks_(tensors, masks) -> None:
    """Masks have each tensor's shape, or its shape without the leading particle dim."""
    xs = [dense_view(t) for t in tensors]
    _ops().apply_masks_(xs, [dense_view(m) for m in masks])
    write_back(tensors, xs)


OPS = {
    "apply_masks_": apply_masks_,
}
