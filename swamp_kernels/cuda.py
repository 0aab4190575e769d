"""CUDA backend: the compiled ops of ``swamp_kernels._C`` behind the backend signatures.

Importing this module never needs the extension; an op imports ``swamp_kernels._C``
(which registers ``torch.ops.swamp_kernels.*``) when it first runs, and raises
ImportError if the extension was not built. The dispatcher checks availability first.
Kernels read contiguous memory: the elementwise ops pass flat memory-order views
(:class:`~swamp_kernels._tensors.ElementwiseOperands`, no copies where an index's operands
share a dense layout such as channels_last); pruning runs on contiguous stand-ins.
"""
from __future__ import annotations

import functools
import importlib
import numbers

import torch

from swamp_kernels._tensors import ElementwiseOperands, allocate_first_buffers, dense_view, empty_particle_row
from swamp_kernels._validate import prune_count, raise_if_nonfinite


@functools.cache
def _ops():
    """``torch.ops.swamp_kernels`` with the compiled ops registered."""
    importlib.import_module("swamp_kernels._C")
    register_fake_kernels("swamp_kernels")
    return torch.ops.swamp_kernels


def register_fake_kernels(namespace: str) -> None:
    """Shape functions of the prune ops under ``namespace`` (FakeTensor, meta, torch.compile).

    The in-place ops return nothing and need none. The prune ops return contiguous bool masks
    of the keys' shapes and the int64 status [n per segment..., NaN/Inf flag per tensor]."""
    for op, layerwise in (("global_magnitude_prune", False), ("layerwise_magnitude_prune", True)):
        def fake(keys, masks, amount, amount_is_count, signed_keys, layerwise=layerwise):
            segments = len(keys) if layerwise else 1
            out = [torch.empty(k.shape, dtype=torch.bool, device=k.device) for k in keys]
            return out, keys[0].new_empty(segments + len(keys), dtype=torch.long)
        torch.library.register_fake(f"{namespace}::{op}", fake)


def apply_masks_(tensors, masks) -> None:
    """Masks have each tensor's shape, or its shape without the leading particle dim."""
    operands = ElementwiseOperands([tensors, masks], written=(0,))
    _ops().apply_masks_(*operands.columns)
    operands.write_back()


def particle_average(params, masks=None) -> list[torch.Tensor]:
    """New tensors: the masked mean over each param's leading particle dim, laid out like one
    particle (:func:`~swamp_kernels._tensors.particle_row_strides`); ``swa_update_`` at 0."""
    outs = [empty_particle_row(p) for p in params]
    swa_update_(outs, params, 0, masks)
    return outs


def swa_update_(swa, params, n_averaged: int, masks=None) -> None:
    """``swa += (mean_p(params) - swa) / (n_averaged + 1)`` in place; ``swa`` is not read at 0."""
    operands = ElementwiseOperands([params, swa, masks or [None] * len(params)], written=(1,))
    ps, outs, ms = operands.columns
    _ops().swa_update_(outs, ps, n_averaged, ms)
    operands.write_back()


def masked_sgd_step_(params, grads, momentum_buffers, masks, *, lr, momentum, dampening,
                     weight_decay, nesterov, maximize) -> None:
    """Inputs validated by :func:`swamp_kernels.masked_sgd_step_`; new buffers go into ``momentum_buffers``.

    With momentum, a None buffer is allocated here (param dtype and layout) and the kernel
    writes its first value; without momentum, no buffer is passed or touched.
    """
    count = len(params)
    first_step, buffers = [], [None] * count
    if momentum != 0:
        first_step = allocate_first_buffers(params, momentum_buffers)
        buffers = momentum_buffers
    operands = ElementwiseOperands([params, grads, buffers, masks or [None] * count], written=(0, 2))
    ps, gs, bs, ms = operands.columns
    _ops().masked_sgd_step_(ps, gs, bs if momentum != 0 else [], first_step, ms,
                            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                            nesterov=nesterov, maximize=maximize)
    operands.write_back()


def _magnitude_prune(op, weights, masks, amount, scores):
    """Runs the compiled ``op`` and reads its status once (the call's only device sync) to raise
    the errors of the reference: NaN/Inf among the candidates, an int amount above n."""
    source = scores if scores is not None else weights
    keys = [dense_view(k) for k in source]
    count = isinstance(amount, numbers.Integral)
    value = float(min(amount, 2**53)) if count else float(amount)
    out, status = getattr(_ops(), op)(keys, [] if masks is None else [dense_view(m) for m in masks],
                                      value, count, scores is not None)
    status = status.tolist()
    raise_if_nonfinite("scores" if scores is not None else "weights", status[-len(keys):])
    counts = status[:-len(keys)]
    if op == "global_magnitude_prune":
        prune_count(amount, counts[0])
    else:
        for i, n in enumerate(counts):
            prune_count(amount, n, f" of weights[{i}]")
    return out


def global_magnitude_prune(weights, masks, amount, scores=None):
    return _magnitude_prune("global_magnitude_prune", weights, masks, amount, scores)


def layerwise_magnitude_prune(weights, masks, amount, scores=None):
    return _magnitude_prune("layerwise_magnitude_prune", weights, masks, amount, scores)


OPS = {
    "apply_masks_": apply_masks_,
    "particle_average": particle_average,
    "swa_update_": swa_update_,
    "masked_sgd_step_": masked_sgd_step_,
    "global_magnitude_prune": global_magnitude_prune,
    "layerwise_magnitude_prune": layerwise_magnitude_prune,
}
