"""CUDA backend: the compiled ops of ``swamp_kernels._C`` behind the backend signatures.

Importing this module never needs the extension; an op imports ``swamp_kernels._C``
(which registers ``torch.ops.swamp_kernels.*``) when it first runs, and raises
ImportError if the extension was not built. The dispatcher checks availability first.
Kernels read contiguous memory: non-contiguous operands run on contiguous copies that
are written back.
"""
from __future__ import annotations

import importlib
import numbers

import torch

from swamp_kernels._tensors import dense_optional, dense_view, elementwise_views, write_back
from swamp_kernels._validate import prune_count, raise_if_nonfinite


def _ops():
    """``torch.ops.swamp_kernels`` with the compiled ops registered."""
    importlib.import_module("swamp_kernels._C")
    return torch.ops.swamp_kernels


def apply_masks_(tensors, masks) -> None:
    """Masks have each tensor's shape, or its shape without the leading particle dim."""
    xs, ms = elementwise_views(tensors, masks)
    _ops().apply_masks_(xs, ms)
    write_back(tensors, xs)


def particle_average(params, masks=None) -> list[torch.Tensor]:
    """New contiguous tensors: the masked mean over each param's leading particle dim."""
    return _ops().particle_average([dense_view(p) for p in params], dense_optional(masks, len(params)))


def swa_update_(swa, params, n_averaged: int, masks=None) -> None:
    """``swa += (mean_p(params) - swa) / (n_averaged + 1)`` in place; ``swa`` is not read at 0."""
    outs = [dense_view(s) for s in swa]
    _ops().swa_update_(outs, [dense_view(p) for p in params], n_averaged, dense_optional(masks, len(params)))
    write_back(swa, outs)


def masked_sgd_step_(params, grads, momentum_buffers, masks, *, lr, momentum, dampening,
                     weight_decay, nesterov, maximize) -> None:
    """Inputs validated by :func:`swamp_kernels.masked_sgd_step_`; new buffers go into ``momentum_buffers``.

    With momentum, a None buffer is allocated here (param dtype, contiguous) and the kernel
    writes its first value; without momentum, no buffer is passed or touched.
    """
    first_step, buffers = [], []
    if momentum != 0:
        first_step = [b is None for b in momentum_buffers]
        for i in (i for i, first in enumerate(first_step) if first):
            momentum_buffers[i] = torch.empty(params[i].shape, dtype=params[i].dtype, device=params[i].device)
        buffers = momentum_buffers
    ps = [dense_view(p) for p in params]
    bs = [dense_view(b) for b in buffers]
    _ops().masked_sgd_step_(ps, [dense_view(g) for g in grads], bs, first_step, dense_optional(masks, len(params)),
                            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                            nesterov=nesterov, maximize=maximize)
    write_back(params, ps)
    write_back(buffers, bs)


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
