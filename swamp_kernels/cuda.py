"""CUDA backend: the compiled ops of ``swamp_kernels._C`` behind the backend signatures.

Importing this module never needs the extension; an op imports ``swamp_kernels._C``
(which registers ``torch.ops.swamp_kernels.*``) when it first runs, and raises
ImportError if the extension was not built. The dispatcher checks availability first.
Kernels read contiguous memory: the elementwise ops pass flat memory-order views
(:class:`~swamp_kernels._tensors.ElementwiseOperands`, no copies where an index's operands
share a dense layout such as channels_last); pruning runs on contiguous stand-ins.

``UNCHECKED_OPS`` hold entries for unvalidated lists, which the public ops try first: the
compiled op checks every tensor itself, in C++ (with torch's op call, about a quarter of a
microsecond per tensor) where the Python checks and layout handling take several microseconds
per tensor (host time of a ResNet-50 SGD step on a 2-core machine: 0.3 ms against 1.75 ms).
When its checks refuse the lists (bad input, or a non-contiguous operand) nothing has run, the
entry returns ``REFUSED``, and the public op validates (precise errors) and takes the general
path.
"""
from __future__ import annotations

import functools
import importlib
import numbers

import torch

from swamp_kernels._dispatch import REFUSED
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


def apply_masks_unchecked(tensors, masks):
    """:func:`apply_masks_` on unvalidated lists (module docstring)."""
    if not is_tensor_list(masks, len(tensors)):
        return REFUSED
    return _unless_refused(_ops().apply_masks_, tensors, masks)


def swa_update_unchecked(swa, params, n_averaged: int, masks=None):
    """:func:`swa_update_` on unvalidated lists (module docstring)."""
    count = len(params)
    if not is_tensor_list(swa, count) or (masks is not None and not is_tensor_list(masks, count, optional=True)):
        return REFUSED
    return _unless_refused(_ops().swa_update_, swa, params, n_averaged, masks or [None] * count)


def masked_sgd_step_unchecked(params, grads, momentum_buffers, masks, *, lr, momentum, dampening,
                              weight_decay, nesterov, maximize):
    """:func:`masked_sgd_step_` on unvalidated lists (module docstring). REFUSED for a first
    momentum step (a None buffer): buffers are allocated only after the Python checks, so that
    bad input never allocates them, and a failed step never leaves one behind."""
    count = len(params)
    if not (is_tensor_list(grads, count) and type(momentum_buffers) is list and len(momentum_buffers) == count
            and (masks is None or is_tensor_list(masks, count, optional=True))):
        return REFUSED
    if momentum != 0 and not is_tensor_list(momentum_buffers, count):
        return REFUSED
    if momentum == 0 and any(b is not None for b in momentum_buffers):
        return REFUSED   # unused without momentum, yet the checked path validates them
    return _unless_refused(_ops().masked_sgd_step_, params, grads, momentum_buffers if momentum != 0 else [],
                           [False] * count if momentum != 0 else [], masks or [None] * count, lr=lr,
                           momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                           nesterov=nesterov, maximize=maximize)


def _unless_refused(compiled_op, *args, **kwargs):
    """``compiled_op(*args, **kwargs)``, or REFUSED when its input checks refuse the arguments
    (ValueError or TypeError, raised before any kernel is queued: csrc/tensor_checks.h) or torch's
    dispatcher finds no kernel for their devices (NotImplementedError: a meta tensor among them)."""
    try:
        return compiled_op(*args, **kwargs)
    except (ValueError, TypeError, NotImplementedError):
        return REFUSED


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


def _prune_keys(op: str, keys, masks, amount, signed_keys: bool):
    """(new masks, status) of the compiled ``op`` on ``keys``: status holds the candidate count of
    each segment, then a NaN/Inf flag per key."""
    count = isinstance(amount, numbers.Integral)
    value = float(min(amount, 2**53)) if count else float(amount)
    return getattr(_ops(), op)(keys, [] if masks is None else masks, value, count, signed_keys)


def _checked_result(op: str, out, status, amount, keys_name: str) -> list[torch.Tensor]:
    """``out``, after reading ``status`` once (the call's only device sync) to raise the errors of
    the reference: NaN/Inf among the candidates, an int amount above n."""
    status = status.tolist()
    raise_if_nonfinite(keys_name, status[-len(out):])
    counts = status[:-len(out)]
    if op == "global_magnitude_prune":
        prune_count(amount, counts[0])
    else:
        for i, n in enumerate(counts):
            prune_count(amount, n, f" of weights[{i}]")
    return out


def _magnitude_prune(op, weights, masks, amount, scores):
    """The compiled ``op`` on contiguous stand-ins of the validated lists."""
    source = scores if scores is not None else weights
    out, status = _prune_keys(op, [dense_view(k) for k in source],
                              None if masks is None else [dense_view(m) for m in masks], amount, scores is not None)
    return _checked_result(op, out, status, amount, "scores" if scores is not None else "weights")


def _magnitude_prune_unchecked(op, weights, masks, amount, scores):
    """:func:`_magnitude_prune` on unvalidated lists (module docstring). REFUSED with ``scores``
    (the compiled op never sees the weights, whose shapes the scores must match) and for tensors
    on more than one device: a meta tensor among them would reach the op's fake kernel (registered
    for torch.compile), which answers without checking."""
    if scores is not None or (masks is not None and not is_tensor_list(masks, len(weights))):
        return REFUSED
    device = weights[0].device
    if any(t.device != device for t in (*weights, *(masks or ()))):
        return REFUSED
    called = _unless_refused(_prune_keys, op, weights, masks, amount, False)
    return called if called is REFUSED else _checked_result(op, *called, amount, "weights")


def global_magnitude_prune(weights, masks, amount, scores=None):
    return _magnitude_prune("global_magnitude_prune", weights, masks, amount, scores)


def layerwise_magnitude_prune(weights, masks, amount, scores=None):
    return _magnitude_prune("layerwise_magnitude_prune", weights, masks, amount, scores)


UNCHECKED_OPS = {
    "apply_masks_": apply_masks_unchecked,
    "swa_update_": swa_update_unchecked,
    "masked_sgd_step_": masked_sgd_step_unchecked,
    "global_magnitude_prune": functools.partial(_magnitude_prune_unchecked, "global_magnitude_prune"),
    "layerwise_magnitude_prune": functools.partial(_magnitude_prune_unchecked, "layerwise_magnitude_prune"),
}

OPS = {
    "apply_masks_": apply_masks_,
    "particle_average": particle_average,
    "swa_update_": swa_update_,
    "masked_sgd_step_": masked_sgd_step_,
    "global_magnitude_prune": global_magnitude_prune,
    "layerwise_magnitude_prune": layerwise_magnitude_prune,
}
