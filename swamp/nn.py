"""Drop-in masked layers: :class:`MaskedLinear` and :class:`MaskedConv2d`.

Contract. A masked layer is an ``nn.Linear`` / ``nn.Conv2d`` (``isinstance`` holds; the
parameter is still ``weight``, so state_dict keys do not change) with a bool buffer
``weight_mask`` that is saved in the state_dict. Pruned weights (mask False) never affect the
output, get exactly zero gradient, and are exactly 0 after every step of any
``torch.optim.Optimizer`` (SGD, Adam, AdamW, ..., weight decay and momentum included). (A weight
shared with a module that is not masked, e.g. an embedding tied to a masked output layer, also
gets that module's unmasked gradient; the step still zeroes its pruned entries.)

Design: weights are stored masked.

* Invariant: ``weight == weight * weight_mask`` at all times. Everything that writes the
  weight restores it: :func:`swamp.set_masks`, ``load_state_dict``, ``reset_parameters`` and
  every optimizer step (below).
* Forward is the plain dense ``F.linear`` / ``F.conv2d`` on ``weight``: no masking work,
  dense cuBLAS/cuDNN speed (compiled: after one ``torch.where`` on the weight, see
  :func:`mask_grad`).
* Backward: the weight passes through :func:`mask_grad`, an identity whose backward is one
  ``torch.where(mask, grad, 0)`` per layer. So ``.grad`` is exactly 0 at pruned entries before
  any hook, gradient clipping, DDP all-reduce or optimizer sees it, also for
  ``torch.autograd.grad``, double backward and ``torch.func`` transforms. The alternative, one
  multi-tensor ``swamp_kernels.apply_masks_`` over all grads in an optimizer pre-step hook,
  saves a launch per layer but lets clipping, DDP and ``autograd.grad`` see unmasked
  gradients; the GPU benchmark decides whether that saving is worth the difference.
* Optimizer steps: importing this module registers one global ``torch.optim`` step post-hook
  that re-zeroes the pruned weights of every live masked layer whose weight the stepped
  optimizer holds, in one :func:`swamp_kernels.apply_masks_` call per device. It covers what a
  zero gradient cannot: weight decay, momentum or Adam state from before pruning, and
  optimizers that do not act entry-wise. No user call is needed, and optimizers holding no
  masked weight are untouched; :class:`swamp.optim.MaskedSGD` steps already applying a layer's
  own mask are skipped (``optimizer.masks_in_step(weight, mask)``). Optimizers that do not
  subclass ``torch.optim.Optimizer`` are not seen by the hook: call :func:`zero_pruned_` after
  their step. A compiled ``optimizer.step`` is not covered either.

State dicts. Loading masks the loaded weight with the loaded mask. A plain ``nn.Linear`` /
``nn.Conv2d`` state_dict lacks ``weight_mask``: strict loading reports it as a missing key,
as PyTorch does for any missing key; with ``strict=False`` the layer keeps its current mask
and zeroes the loaded weight outside it. A checkpoint saved from a masked model carries its
masks: loading it restores them too. :func:`swamp.rewind` loads either kind but keeps the
current masks (how a pruned model goes back to its rewind point).

``torch.func.functional_call``: the layer computes with the weight it is given, as any layer
does (compiled: with it zeroed where the mask is False), and masks its gradient with the
``weight_mask`` in effect (the one passed, else its own). Pass weights that are zero where the
mask is False to compute the pruned network.
"""
from __future__ import annotations

import sys
import weakref
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import swamp_kernels
from swamp_kernels._validate import FLOAT_DTYPES

__all__ = ["MaskedLayer", "MaskedLinear", "MaskedConv2d", "mask_grad", "to_masked_", "to_dense_",
           "zero_pruned_"]


class _MaskGrad(torch.autograd.Function):
    """Identity on ``weight``; its gradient, and a forward-mode tangent (the transpose of the
    backward: ``torch.func.jvp``, ``jacfwd``, ``hessian``), are zeroed where ``mask`` is False."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight, mask):
        return weight.view_as(weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0), None

    @staticmethod
    def jvp(ctx, weight_tangent, mask_tangent):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, weight_tangent, 0)


def mask_grad(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` itself in forward; in backward its gradient (and a forward-mode tangent) is 0
    where the bool ``mask`` is False. Compiled, it is ``torch.where(mask, weight, 0)``: Dynamo
    drops a custom Function's backward inside ``torch.func`` transforms and cannot trace a custom
    ``jvp``, while ``where`` differentiates alike in every mode (the same forward for weights
    stored masked; the few reads of the weight and mask that it adds fuse into the graph)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"the weight mask has dtype {mask.dtype}; expected bool (torch.nn.utils.prune on a swamp "
                        "layer replaces its mask with a float one: prune swamp layers with swamp.prune or "
                        "swamp.set_masks)")
    if torch.compiler.is_compiling():
        return torch.where(mask, weight, 0)
    return _MaskGrad.apply(weight, mask)


_LIVE: weakref.WeakSet[MaskedLayer] = weakref.WeakSet()  # layers the optimizer step hook re-masks
_mask_replacements = 0   # bumped whenever a masked layer's weight_mask becomes another tensor


def mask_replacements() -> int:
    """How often a masked layer's ``weight_mask`` became another tensor object (``model.to``,
    ``.cuda()``, channels_last, assignment): who keeps masks by reference re-reads them on a change."""
    return _mask_replacements


def _mask_replaced() -> None:
    global _mask_replacements
    _mask_replacements += 1


class MaskedLayer(nn.Module):
    """What :class:`MaskedLinear` and :class:`MaskedConv2d` share: the mask and its invariant."""

    weight: torch.Tensor
    weight_mask: torch.Tensor

    def __init__(self, *args, **kwargs) -> None:   # the dense layer's arguments
        super().__init__(*args, **kwargs)
        self._add_mask()

    def _add_mask(self) -> None:
        self.register_buffer("weight_mask", torch.ones_like(self.weight, dtype=torch.bool))
        _LIVE.add(self)

    def _apply(self, fn, recurse: bool = True):
        """As ``nn.Module._apply``; a mask leaving the meta device (``to_empty``: uninitialised
        memory) becomes all True, as a layer built off the meta device starts."""
        was_meta, mask = self.weight_mask.is_meta, self.weight_mask
        super()._apply(fn, recurse)
        if was_meta and not self.weight_mask.is_meta:
            with torch.no_grad():
                self.weight_mask.fill_(True)
        if self.weight_mask is not mask:
            _mask_replaced()
        return self

    def __setattr__(self, name: str, value) -> None:
        if name == "weight_mask" and isinstance(value, torch.Tensor):
            _require_bool_mask(value)
        super().__setattr__(name, value)
        if name == "weight_mask":
            _mask_replaced()

    def __delattr__(self, name: str) -> None:
        if name == "weight" and _reparametrizing():
            _zero_pruned([self])   # a parametrization's right_inverse may have rewritten the weight already
            raise TypeError(f"{type(self).__name__}: its weight must stay a parameter: a parametrization "
                            f"(spectral_norm, weight_norm, orthogonal, register_parametrization) would compute "
                            f"the weight from another tensor, which weight_mask does not cover (the weight is "
                            f"kept, with any values its right_inverse wrote). {_NO_REPLACED_WEIGHT}")
        super().__delattr__(name)

    def register_parameter(self, name: str, param) -> None:
        if name == "weight_g" and "weight" not in self._parameters and _reparametrizing():
            # the old torch.nn.utils.weight_norm has just taken the weight (its local) out of
            # _parameters: back in first place (as the dense layer registers it) it goes
            weight = sys._getframe(1).f_locals.get("weight")
            restored = isinstance(weight, nn.Parameter)
            if restored:
                others = dict(self._parameters)
                self._parameters.clear()
                self._parameters.update(weight=weight, **others)
            left = "the layer is left as it was" if restored else "this layer is left without its weight: build it again"
            raise TypeError(f"{type(self).__name__}: torch.nn.utils.weight_norm would compute its weight from "
                            f"weight_g and weight_v, which weight_mask does not cover ({left}). {_NO_REPLACED_WEIGHT}")
        super().register_parameter(name, param)

    def register_buffer(self, name: str, tensor, persistent: bool = True) -> None:
        if name == "weight_mask" and tensor is not None:
            _require_bool_mask(tensor)
        super().register_buffer(name, tensor, persistent)

    def reset_parameters(self) -> None:
        """Re-initialise ``weight`` and ``bias`` as the dense layer does, keeping the mask."""
        super().reset_parameters()
        if "weight_mask" in self._buffers:  # absent while the dense __init__ runs
            _zero_pruned([self])

    def load_mask_(self, mask: torch.Tensor) -> None:
        """In place: the mask becomes a copy of the bool ``mask`` (of the weight's shape). The
        weight is not touched: zero it afterwards (:func:`zero_pruned_`, or set_masks does)."""
        with torch.no_grad():
            self.weight_mask.copy_(mask)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)
        if self.weight_mask.is_meta and not self.weight.is_meta:   # assign=True without a mask
            self.weight_mask = torch.ones_like(self.weight, dtype=torch.bool)
        assigned = local_metadata.get("assign_to_params_buffers", False) and prefix + "weight" in state_dict
        if assigned and not self.weight.is_meta:
            # the weight is the caller's tensor: mask a copy, if it needs masking, never theirs
            with torch.no_grad():
                if torch.any(self.weight.masked_select(~self.weight_mask) != 0):
                    self.weight = nn.Parameter(self.weight.masked_fill(~self.weight_mask, 0),
                                               self.weight.requires_grad)
        _zero_pruned([self])

    def __prepare_scriptable__(self):
        raise TypeError(f"{type(self).__name__} cannot be scripted (its weight gradient is masked by an autograd "
                        "Function): script swamp.export_dense(model), the same network with plain layers, or "
                        "use torch.jit.trace, torch.export or torch.compile")

    def __setstate__(self, state) -> None:  # deepcopy and unpickling
        super().__setstate__(state)
        _LIVE.add(self)


class MaskedLinear(MaskedLayer, nn.Linear):
    """``nn.Linear`` whose pruned weights (``weight_mask`` False) stay 0. Same arguments as ``nn.Linear``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, mask_grad(self.weight, self.weight_mask), self.bias)


class MaskedConv2d(MaskedLayer, nn.Conv2d):
    """``nn.Conv2d`` whose pruned weights (``weight_mask`` False) stay 0. Same arguments as ``nn.Conv2d``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, mask_grad(self.weight, self.weight_mask), self.bias)


_NO_REPLACED_WEIGHT = ("Apply it to the plain layer (keep this one dense: swamp.sparsify(model, exclude=...)), "
                       "or to a dense copy of the pruned model (swamp.export_dense(model)).")


_REPARAMETRIZERS = ("torch.nn.utils.parametrize", "torch.nn.utils.spectral_norm", "torch.nn.utils.weight_norm")


def _reparametrizing() -> bool:
    """True when the code deleting or setting a masked layer's weight (two frames up) is torch's
    weight reparametrization (parametrizations, the old spectral_norm / weight_norm). Others
    that swap the weight for views and back, as FSDP does, go on."""
    return sys._getframe(2).f_globals.get("__name__") in _REPARAMETRIZERS


def _require_bool_mask(mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise TypeError(f"weight_mask must be a bool tensor, got {mask.dtype} (torch.nn.utils.prune on a swamp "
                        "layer sets a float one: prune swamp layers with swamp.prune or swamp.set_masks)")


_MASKED_CLASS = {nn.Linear: MaskedLinear, nn.Conv2d: MaskedConv2d}
_DENSE_CLASS = {masked: dense for dense, masked in _MASKED_CLASS.items()}


def to_masked_(layer: nn.Module) -> MaskedLayer:
    """In place: make an ``nn.Linear`` / ``nn.Conv2d`` (exactly these types) masked, all True.

    The object, its parameters, hooks, device, dtype and memory format stay; the mask buffer
    is created like ``weight``. Masked layers are returned unchanged.
    """
    if isinstance(layer, MaskedLayer):
        return layer
    if type(layer) not in _MASKED_CLASS:
        raise TypeError(f"cannot mask a {type(layer).__name__}: only nn.Linear and nn.Conv2d "
                        "(exactly these types; subclasses may use their weight outside forward)")
    if "weight_orig" in layer._parameters or "weight_mask" in layer._buffers:
        raise TypeError(f"cannot mask a {type(layer).__name__} pruned by torch.nn.utils.prune: call "
                        "prune.remove(layer, 'weight') first (its zeros stay; set_masks can keep them pruned)")
    layer.__class__ = _MASKED_CLASS[type(layer)]
    layer._add_mask()
    return layer


def to_dense_(layer: MaskedLayer) -> nn.Module:
    """In place: the plain ``nn.Linear`` / ``nn.Conv2d`` again, without ``weight_mask``.

    The weight keeps its zeros; the optimizer step hook no longer re-masks it.
    """
    if type(layer) not in _DENSE_CLASS:
        raise TypeError(f"expected a MaskedLinear or MaskedConv2d, got {type(layer).__name__}")
    del layer.weight_mask
    _LIVE.discard(layer)
    layer.__class__ = _DENSE_CLASS[type(layer)]
    return layer


def _zero_pruned(layers: Iterable[MaskedLayer]) -> None:
    """Zero the pruned weights of ``layers``: one ``apply_masks_`` call per device. A weight
    shared by several layers is zeroed once, where any of their masks is False."""
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in layers:
        weight, mask = layer.weight, layer.weight_mask
        if id(weight) in weights:
            mask = weights[id(weight)][1] & mask
        weights[id(weight)] = weight, mask
    by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for weight, mask in weights.values():
        by_device.setdefault(weight.device, []).append((weight, mask))
    with torch.no_grad():
        for group in by_device.values():
            kernel = [(w, m) for w, m in group if w.dtype in FLOAT_DTYPES]
            if kernel:
                swamp_kernels.apply_masks_([w for w, _ in kernel], [m for _, m in kernel])
            for weight, mask in group:
                if weight.dtype not in FLOAT_DTYPES:  # float64: no kernel, plain torch
                    weight.masked_fill_(~mask, 0)


def zero_pruned_(model: nn.Module) -> None:
    """Zero the pruned weights of every masked layer in ``model`` (itself included).

    Steps of ``torch.optim`` optimizers do this automatically; call it after the step of an
    optimizer that is not a ``torch.optim.Optimizer`` or after writing weights directly.
    """
    _zero_pruned(m for m in model.modules() if isinstance(m, MaskedLayer))


def _zero_pruned_after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _LIVE:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    masked_by_step = getattr(optimizer, "masks_in_step", lambda param, mask: False)
    layers = [layer for layer in list(_LIVE)
              if id(layer.weight) in stepped and not masked_by_step(layer.weight, layer.weight_mask)]
    if layers:
        _zero_pruned(layers)


register_optimizer_step_post_hook(_zero_pruned_after_step)
