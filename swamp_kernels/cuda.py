"""CUDA backend: the compiled ops of ``swamp_kernels._C`` behind the backend signatures.

Importing this module never needs the extension; an op imports ``swamp_kernels._C``
(which registers ``torch.ops.swamp_kernels.*``) when it first runs, and raises
ImportError if the extension was not built. The dispatcher checks availability first.
Kernels read contiguous memory: the elementwise ops pass flat memory-order views
(:class:`~swamp_kernels._tensors.ElementwiseOperands`, no copies where an index's operands
share a dense layout such as channels_last); pruning runs on contiguous stand-ins.

``UNCHECKED_OPS`` hold the elementwise ops' entries for unvalidated lists, which the public
ops try first: the compiled op checks every tensor itself, in C++ (with torch's op call, about
a quarter of a microsecond per tensor) where the Python checks and layout handling take several
microseconds per tensor (host time of a ResNet-50 SGD step on a 2-core machine: 0.3 ms against
1.75 ms). When its checks refuse the lists (bad input, or a non-contiguous operand) nothing has
run, the entry returns False, and the public op validates (precise errors) and takes the
general path.
"""
from __future__ import annotations

import functools
import importlib
import numbers

import torch

from swamp_kernels._tensors import ElementwiseOperands, allocate_first_buffers, dense_view, empty_particle_row
from swamp_kernels._validate import is_tensor_list, prune_count, raise_if_nonfinite


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


def apply_masks_unchecked(tensors, masks) -> bool:
    """:func:`apply_masks_` on unvalidated lists (module docstring): True when it ran."""
    if not is_tensor_list(masks, len(tensors)):
        return False
    return _ran_if_accepted(_ops().apply_masks_, tensors, masks)


def swa_update_unchecked(swa, params, n_averaged: int, masks=None) -> bool:
    """:func:`swa_update_` on unvalidated lists (module docstring): True when it ran."""
    count = len(params)
    if not is_tensor_list(swa, count) or (masks is not None and not is_tensor_list(masks, count, optional=True)):
        return False
    return _ran_if_accepted(_ops().swa_update_, swa, params, n_averaged, masks or [None] * count)


def masked_sgd_step_unchecked(params, grads, momentum_buffers, masks, *, lr, momentum, dampening,
                              weight_decay, nesterov, maximize) -> bool:
    """:func:`masked_sgd_step_` on unvalidated lists (module docstring): True when it ran. Buffers
    it allocated for a first momentum step are set back to None when it did not."""
    count = len(params)
    if not (is_tensor_list(grads, count) and type(momentum_buffers) is list and len(momentum_buffers) == count
            and (masks is None or is_tensor_list(masks, count, optional=True))):
        return False
    first_step, buffers = [], []
    if momentum != 0:
        if not is_tensor_list(momentum_buffers, count, optional=True):
            return False
        first_step = allocate_first_buffers(params, momentum_buffers)
        buffers = momentum_buffers
    elif any(b is not None for b in momentum_buffers):
        return False   # unused without momentum, yet the checked path validates them
    ran = False
    try:
        ran = _ran_if_accepted(_ops().masked_sgd_step_, params, grads, buffers, first_step, masks or [None] * count,
                               lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                               nesterov=nesterov, maximize=maximize)
    finally:
        if not ran:   # a buffer the step never wrote must not look like a momentum state
            for i in (i for i, first in enumerate(first_step) if first):
                momentum_buffers[i] = None
    return ran


def _ran_if_accepted(compiled_op, *args, **kwargs) -> bool:
    """Call ``compiled_op``; False when its input checks refuse the arguments (ValueError or
    TypeError, raised before any kernel is queued: csrc/tensor_checks.h) or torch's dispatcher
    finds no kernel for their devices (NotImplementedError: a meta tensor among them)."""
    try:
        compiled_op(*args, **kwargs)
    except (ValueError, TypeError, NotImplementedError):
        return False
    return True


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


UNCHECKED_OPS = {
    "apply_masks_": apply_masks_unchecked,
    "swa_update_": swa_update_unchecked,
    "masked_sgd_step_": masked_sgd_step_unchecked,
}

OPS = {
    "apply_masks_": apply_masks_,
    "particle_average": particle_average,
    "swa_update_": swa_update_,
    "masked_sgd_step_": masked_sgd_step_,
    "global_magnitude_prune": global_magnitude_prune,
    "layerwise_magnitude_prune": layerwise_magnitude_prune,
}
