"""``MaskedSGD``: ``torch.optim.SGD`` whose updates keep pruned weights at exactly zero."""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.optim.sgd import sgd as torch_sgd

import swamp_kernels
from swamp.nn import MaskedLayer, mask_replacements
from swamp_kernels import _validate as check
from swamp_kernels._dispatch import require_available


class MaskedSGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` applied to ``grad * mask``, then ``param *= mask``: one fused call per group.

    Arguments are those of ``torch.optim.SGD`` plus:

    - ``masks``: None, a model (``nn.Module``: the ``weight_mask`` of each of its masked
      layers whose weight this optimizer holds), a dict ``{param: bool mask}``, or a sequence
      aligned with the params (all groups, in order; None entries are unmasked). A mask has
      the param's shape or, for stacked particles ``[P, *shape]``, ``shape``. Masks are kept
      by reference, so pruning them in place (``swamp.prune``, ``swamp.set_masks`` on that
      model) takes effect at the next step; a model's masks are also followed when its layers
      get new mask tensors (``model.to(...)``, ``.cuda()``, channels_last) before a step. A copy
      or unpickled optimizer keeps the mask tensors it had.
    - ``backend``: the :mod:`swamp_kernels` backend of :func:`swamp_kernels.masked_sgd_step_`.

    ``foreach`` and ``fused`` are accepted as torch's SGD takes them and change nothing (the step
    is always one fused call per dtype group); ``differentiable=True`` is not supported.
    float64 params (no kernel) step through torch's own SGD on ``grad * mask``. With float32
    params and float16/bfloat16 gradients (AMP), the momentum buffer is float32 (torch's SGD keeps
    it in the gradient's dtype when ``weight_decay`` is 0).

    The state has torch's layout (``state[param]["momentum_buffer"]``), so state dicts move
    between ``torch.optim.SGD`` and ``MaskedSGD`` both ways. Masks are not in the state dict:
    give them again (constructor or :meth:`set_masks`) after loading.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None, differentiable: bool = False,
                 masks=None, backend: str = "auto"):
        if differentiable:
            raise ValueError("MaskedSGD does not support differentiable=True; use torch.optim.SGD")
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if value < 0.0:
                raise ValueError(f"Invalid {name}: {value} (must be >= 0)")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if backend not in ("auto", *swamp_kernels.BACKENDS):
            raise ValueError(f"unknown backend {backend!r}; choose one of auto, "
                             f"{', '.join(swamp_kernels.BACKENDS)}")
        require_available(backend)
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening,
                    "weight_decay": weight_decay, "nesterov": nesterov, "maximize": maximize}
        super().__init__(params, defaults)
        self.backend = backend
        self._masks: dict[torch.Tensor, torch.Tensor] = {}
        self._set_masks(masks)

    def __getstate__(self):
        return {**super().__getstate__(), "backend": self.backend, "_masks": self._masks}

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
        self._layers = []
        self._index_masks()

    def _index_masks(self) -> None:
        """``_mask_of`` finds a param's mask by ``id``: a tensor key hashes through Python
        (``Tensor.__hash__``), an int in C, and a step looks up every param. Not pickled
        (ids do not survive): rebuilt from ``_masks`` on load and copy."""
        self._mask_of = {id(p): m for p, m in self._masks.items()}

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def set_masks(self, masks) -> None:
        """Replace all masks: None, a model, ``{param: mask}`` or a sequence aligned with the params."""
        self._set_masks(masks)

    def _set_masks(self, masks) -> None:
        """:meth:`set_masks`, one frame below it and ``__init__`` alike: a warning names the user's line."""
        params = self._params()
        layers: list[MaskedLayer] = []   # a model's layers, whose masks are followed
        if isinstance(masks, nn.Module):
            held = {id(p) for p in params}
            masked = [layer for layer in masks.modules() if isinstance(layer, MaskedLayer)]
            layers = [layer for layer in masked if id(layer.weight) in held]
            if not layers:
                warnings.warn(f"masks: the {type(masks).__name__} passed has no masked layers (swamp.sparsify "
                              "it first)" if not masked else f"masks: this optimizer holds the weight of none "
                              f"of the {len(masked)} masked layers of the {type(masks).__name__} passed (another "
                              "model, or a copy?): no param is masked", stacklevel=3)
            masks = {layer.weight: layer.weight_mask for layer in layers}
        if masks is None:
            aligned = [None] * len(params)
        elif isinstance(masks, Mapping):
            known = {id(p) for p in params}
            for key in masks:
                if isinstance(key, str):
                    raise TypeError(f"masks has the key {key!r}: a dict of masks is keyed by the param "
                                    "tensors; for masks by weight name, as swamp.masks(model) gives, pass "
                                    "masks=model (its masks are then followed as it is pruned)")
                if id(key) not in known:
                    raise ValueError(f"masks has a key of type {type(key).__name__} "
                                     f"(shape {tuple(getattr(key, 'shape', ()))}) that is not a "
                                     "parameter of this optimizer")
            aligned = [masks.get(p) for p in params]
        elif isinstance(masks, (str, bytes, torch.Tensor)) or not isinstance(masks, Iterable):
            one = " (one param's mask: pass [mask])" if isinstance(masks, torch.Tensor) else ""
            raise TypeError(f"masks must be None, a model, a dict {{param: mask}} or a sequence of masks aligned "
                            f"with the params, got {type(masks).__name__}{one}")
        else:
            aligned = masks
        aligned = check.bool_masks(aligned, "params", params, particle_dim=True, optional=True)
        self._masks = {p: m for p, m in zip(params, aligned) if m is not None}
        self._layers, self._replacements = layers, mask_replacements()
        self._index_masks()

    @property
    def masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """The masked params and their masks (a new dict)."""
        return dict(self._masks)

    def masks_in_step(self, param: torch.Tensor, mask: torch.Tensor) -> bool:
        """True if every step multiplies ``param`` by this very ``mask`` tensor (the masked
        layers' optimizer hook then skips re-masking it)."""
        return self._mask_of.get(id(param)) is mask

    @torch.no_grad()
    def step(self, closure=None):
        """One SGD step on the masked gradients; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._layers and self._replacements != mask_replacements():   # e.g. model.cuda() since
            self._replacements = mask_replacements()
            for layer in self._layers:
                self._masks[layer.weight] = layer.weight_mask
            self._index_masks()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("MaskedSGD does not support sparse gradients")
            fused = [p for p in params if p.dtype in check.FLOAT_DTYPES]
            others = [p for p in params if p.dtype not in check.FLOAT_DTYPES]
            momentum = group["momentum"]
            for chunk, step in ((fused, self._fused_step), (others, _torch_step)):
                if not chunk:
                    continue
                buffers = [self.state[p].get("momentum_buffer") if momentum != 0 else None for p in chunk]
                first = [i for i, buffer in enumerate(buffers) if buffer is None] if momentum != 0 else []
                step(chunk, buffers, [self._mask_of.get(id(p)) for p in chunk], group)
                for i in first:   # the step filled the None buffers (their first step) in place
                    self.state[chunk[i]]["momentum_buffer"] = buffers[i]
        return loss

    def _fused_step(self, params, buffers, masks, group) -> None:
        swamp_kernels.masked_sgd_step_(
            params, [p.grad for p in params], buffers, masks if any(m is not None for m in masks) else None,
            **_hyper(group), backend=self.backend)


def _hyper(group: dict) -> dict:
    return {k: group[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")}


def _torch_step(params, buffers, masks, group) -> None:
    """torch's SGD on ``grad * mask``, then pruned entries zeroed: for dtypes without a kernel."""
    grads = [p.grad if m is None else torch.where(m, p.grad, 0) for p, m in zip(params, masks)]
    torch_sgd(params, grads, buffers, foreach=False, **_hyper(group))
    for p, m in zip(params, masks):
        if m is not None:
            p.masked_fill_(~m, 0)
