"""swamp_kernels: the public ops of swamp, each with torch, Triton and CUDA backends.

Every op checks its input (errors name the offending tensor index; scalar arguments such as
``lr``, ``amount`` and ``n_averaged`` first, then the tensor lists), then runs the
backend chosen by ``backend=`` (``"auto" | "torch" | "triton" | "cuda"``, see
:mod:`swamp_kernels._dispatch`). Contracts: DESIGN.md section 3.

The in-place multi-tensor ops run every step, so their host time counts: where the chosen
backend checks tensors itself (the CUDA backend's ``UNCHECKED_OPS``), they hand it the lists
first and fall back to the checks here only when it refuses them (see :func:`_unchecked`); so do
the prune ops, whose host time counts against a kernel of tens of microseconds.
"""
from __future__ import annotations

import math
import numbers

import torch

from swamp_kernels import _validate as check
from swamp_kernels._dispatch import (BACKENDS, REFUSED, BackendError, available_backends, implementation,
                                     preferred_backend, unchecked_implementation)

__all__ = [
    "BACKENDS", "BackendError", "available_backends", "preferred_backend",
    "global_magnitude_prune", "layerwise_magnitude_prune", "random_scores",
    "particle_average", "swa_update_", "apply_masks_", "masked_sgd_step_",
    "masked_linear", "masked_conv2d",
]


def _run(op: str, backend: str, device: torch.device, *args, **kwargs):
    return implementation(op, backend, device)(*args, **kwargs)


def _run_outside_autograd(op: str, backend: str, device: torch.device, *args, **kwargs):
    """Run an op that has no autograd formula under ``no_grad`` (as torch.optim steps run), so
    that every backend returns plain tensors and writes into parameters that require grad."""
    with torch.no_grad():
        return _run(op, backend, device, *args, **kwargs)


def _unchecked(op: str, backend: str, anchors, *args, **kwargs):
    """The result of ``op(*args, **kwargs)`` run, under ``no_grad``, by the unvalidated entry of the
    backend that runs it for ``anchors[0]``'s device (:func:`~swamp_kernels._dispatch.unchecked_implementation`);
    REFUSED, with nothing changed, when there is none or it refused the arguments. A first tensor
    that is not contiguous (a channels_last model) is refused here, before the entry's costlier
    refusal: the compiled ops take contiguous tensors only."""
    if not check.is_tensor_list(anchors) or not anchors[0].is_contiguous():
        return REFUSED
    run = unchecked_implementation(op, backend, anchors[0].device)
    if run is None:
        return REFUSED
    with torch.no_grad():
        return run(*args, **kwargs)


def _modified(tensors) -> None:
    """Tell autograd that ``tensors`` changed in place: the Triton and CUDA kernels write through
    raw pointers, which autograd cannot see, so a graph that saved one of them would silently
    use the new values in its backward instead of failing as after torch's own in-place ops."""
    torch.autograd.graph.increment_version([t for t in tensors if t is not None])


def _prune(op: str, backend: str, weights, masks, amount, scores) -> list[torch.Tensor]:
    """``op`` through its backend's unchecked entry when that takes the lists as they are, else
    after validating them."""
    check.check_amount(amount)
    out = _unchecked(op, backend, weights, weights, masks, amount, scores)
    if out is REFUSED:
        weights = check.float_tensors("weights", weights)
        masks = check.bool_masks(masks, "weights", weights)
        if scores is not None:
            scores = check.companions("scores", scores, "weights", weights, dtypes=check.FLOAT_DTYPES)
        out = _run_outside_autograd(op, backend, weights[0].device, weights, masks, amount, scores)
    return out


def global_magnitude_prune(weights, masks=None, amount=0.2, *, scores=None,
                           backend: str = "auto") -> list[torch.Tensor]:
    """New bool masks keeping the globally largest ``|w|`` (or ``scores``) among the candidates.

    Candidates are the entries whose mask is True (all when ``masks`` is None); of their
    count n, ``round(amount * n)`` (float ``amount``) or exactly ``amount`` (int) are pruned.
    Ties at the threshold keep the lowest global index (tensors in list order, each in
    logical row-major order). The result is a subset of ``masks``.
    """
    return _prune("global_magnitude_prune", backend, weights, masks, amount, scores)


def layerwise_magnitude_prune(weights, masks=None, amount=0.2, *, scores=None,
                              backend: str = "auto") -> list[torch.Tensor]:
    """:func:`global_magnitude_prune` applied to each tensor on its own."""
    return _prune("layerwise_magnitude_prune", backend, weights, masks, amount, scores)


def random_scores(weights, seed: int) -> list[torch.Tensor]:
    """Seeded uniform random scores shaped like ``weights``: pass as ``scores=`` for random pruning.

    The same seed gives the same scores on every device (drawn on the CPU, then moved).
    """
    weights = check.tensor_list("weights", weights)
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(w.shape, generator=generator).to(w.device) for w in weights]


def particle_average(params, masks=None, *, backend: str = "auto") -> list[torch.Tensor]:
    """Mean over the particle dimension of each ``[P, *shape]`` tensor, zero where masked.

    ``masks`` may be None, or hold None for unmasked params (as in every op taking masks).
    """
    params = check.particle_params("params", params)
    masks = check.bool_masks(masks, "params[:, ...]", params, leading=1, optional=True)
    return _run_outside_autograd("particle_average", backend, params[0].device, params, masks)


def swa_update_(swa, params, n_averaged, masks=None, *, backend: str = "auto") -> None:
    """In place: ``swa += (mean_p(params) - swa) / (n_averaged + 1)``; masked entries end at 0.

    ``n_averaged == 0`` copies the particle mean.
    """
    n_averaged = check.non_negative_int("n_averaged", n_averaged)
    if _unchecked("swa_update_", backend, params, swa, params, n_averaged, masks) is REFUSED:
        params = check.particle_params("params", params)
        swa = check.companions("swa", swa, "params[:, ...]", params, leading=1, dtypes=check.FLOAT_DTYPES)
        check.distinct(("swa", swa))
        masks = check.bool_masks(masks, "params[:, ...]", params, leading=1, optional=True)
        _run_outside_autograd("swa_update_", backend, params[0].device, swa, params, n_averaged, masks)
    _modified(swa)


def apply_masks_(tensors, masks, *, backend: str = "auto") -> None:
    """In place: zero every entry of ``tensors[i]`` whose mask is False, all tensors in one launch.

    ``masks[i]`` has the shape of ``tensors[i]`` or of ``tensors[i][0]`` (broadcast over particles).
    """
    if _unchecked("apply_masks_", backend, tensors, tensors, masks) is REFUSED:
        tensors = check.float_tensors("tensors", tensors)
        check.distinct(("tensors", tensors))
        masks = check.companions("masks", masks, "tensors", tensors, dtypes=(torch.bool,), particle_dim=True)
        _run_outside_autograd("apply_masks_", backend, tensors[0].device, tensors, masks)
    _modified(tensors)


def _real(name: str, value, low: float = 0.0) -> float:
    """A finite float >= ``low`` within float32's range (the kernels compute in float32) from a
    number or a one-element tensor (as torch.optim takes lr)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < low:
        bound = f" >= {low}" if math.isfinite(low) else ""
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    if abs(value) > torch.finfo(torch.float32).max:
        raise ValueError(f"{name} = {value!r} is beyond float32's range (the step computes in float32)")
    return float(value)


def masked_sgd_step_(params, grads, momentum_buffers, masks, *, lr, momentum=0.0, dampening=0.0,
                     weight_decay=0.0, nesterov=False, maximize=False, backend: str = "auto") -> None:
    """One ``torch.optim.SGD`` step on ``grad * mask``, then ``param *= mask``, in place.

    ``momentum_buffers`` is a list with one entry per param (None before the first step);
    new buffers are stored into it (if the step raises, its None entries stay None). ``masks``
    may be None, or hold None for unmasked params; a mask has the param's shape or, for stacked
    particles ``[P, *shape]``, ``shape``.
    Gradients may be float16/bfloat16 for float32 params; buffers have the param dtype.
    The Triton and CUDA kernels compute in float32 and round once per stored value, where
    torch's float16/bfloat16 SGD rounds every intermediate: results differ by about an ulp, and
    stay finite where an intermediate such as ``grad + weight_decay * param`` overflows float16.
    """
    lr = _real("lr", lr)
    momentum, weight_decay = _real("momentum", momentum), _real("weight_decay", weight_decay)
    dampening = _real("dampening", dampening, low=-math.inf)   # any finite value, as torch.optim.SGD
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov momentum requires momentum > 0 and dampening == 0")
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                 nesterov=bool(nesterov), maximize=bool(maximize))
    if _unchecked("masked_sgd_step_", backend, params, params, grads, momentum_buffers, masks, **hyper) is REFUSED:
        _checked_sgd_step_(params, grads, momentum_buffers, masks, backend, hyper)
    _modified([*params, *momentum_buffers])


def _checked_sgd_step_(params, grads, momentum_buffers, masks, backend: str, hyper: dict) -> None:
    """:func:`masked_sgd_step_` after validating its lists."""
    params = check.float_tensors("params", params)
    grads = check.companions("grads", grads, "params", params, dtypes=check.FLOAT_DTYPES)
    if not isinstance(momentum_buffers, list) or len(momentum_buffers) != len(params):
        raise ValueError("momentum_buffers must be a list with one entry (tensor or None) per param")
    check.companions("momentum_buffers", momentum_buffers, "params", params, optional=True)
    check.distinct(("params", params), ("momentum_buffers", momentum_buffers))
    for i, (p, g, b) in enumerate(zip(params, grads, momentum_buffers)):
        if g.dtype != p.dtype and p.dtype != torch.float32:
            raise TypeError(f"grads[{i}] has dtype {g.dtype} but params[{i}] has {p.dtype}; "
                            "mixed dtypes need float32 params")
        if b is not None and b.dtype != p.dtype:
            raise TypeError(f"momentum_buffers[{i}] has dtype {b.dtype}, expected {p.dtype} like params[{i}]")
    masks = check.bool_masks(masks, "params", params, particle_dim=True, optional=True)
    new_buffers = [i for i, b in enumerate(momentum_buffers) if b is None]
    try:
        _run_outside_autograd("masked_sgd_step_", backend, params[0].device, params, grads, momentum_buffers,
                              masks, **hyper)
    except BaseException:
        for i in new_buffers:   # a buffer the step never wrote must not look like a momentum state
            momentum_buffers[i] = None
        raise


def masked_linear(x, weight, mask, bias=None, *, backend: str = "auto") -> torch.Tensor:
    """``F.linear(x, weight * mask, bias)`` with autograd; the weight gradient is 0 where masked."""
    check.layer_weight(weight, mask)
    check.linear_operands(x, weight, bias)
    return _run("masked_linear", backend, x.device, x, weight, mask, bias)


def masked_conv2d(x, weight, mask, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                  backend: str = "auto") -> torch.Tensor:
    """``F.conv2d(x, weight * mask, ...)`` with autograd; the weight gradient is 0 where masked."""
    check.layer_weight(weight, mask)
    return _run("masked_conv2d", backend, x.device, x, weight, mask, bias, stride, padding,
                dilation, groups)
