"""Whole-model masking: convert layers, read and write masks, report density, export dense.

Masks are keyed by parameter name, e.g. ``"layer1.0.conv1.weight"``, the keys of
``model.state_dict()``::

    swamp.sparsify(model, exclude=["conv1", "fc"])       # keep the stem and classifier dense
    ...train, then choose masks (swamp.prune does it by magnitude)...
    swamp.set_masks(model, new_masks)                    # zeroes the newly pruned weights
    print(swamp.sparsity_report(model))
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from swamp.nn import MaskedLayer, to_dense_, to_masked_, zero_pruned_

__all__ = ["sparsify", "masks", "set_masks", "shared_masks", "sparsity_report", "export_dense",
           "SparsityReport", "LayerDensity"]

Selector = Union[None, Callable[[str, nn.Module], bool], str, type, Sequence[Union[str, type]]]
_CONVERTIBLE = (nn.Linear, nn.Conv2d)


def _is_candidate(module: nn.Module) -> bool:
    return type(module) in _CONVERTIBLE or isinstance(module, MaskedLayer) or _unrun_lazy(module)


def _unrun_lazy(module: nn.Module) -> bool:
    """A lazy layer that becomes a Conv2d/Linear at its first forward, which it has not had."""
    return (isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()
            and getattr(type(module), "cls_to_become", None) in _CONVERTIBLE)


def _describe(modules: Mapping[str, nn.Module], limit: int = 6) -> str:
    shown = [f"{name or '<root>'} ({type(m).__name__})" for name, m in list(modules.items())[:limit]]
    return ", ".join(shown) + (", ..." if len(modules) > limit else "")


def _item_matches(item, name: str, module: nn.Module) -> bool:
    return isinstance(module, item) if isinstance(item, type) else fnmatchcase(name, item)


def _predicate(arg: str, selector: Selector, modules: dict[str, nn.Module],
               candidates: dict[str, nn.Module]) -> Callable[[str, nn.Module], bool]:
    """``selector`` as a predicate on (name, module); each name/pattern/type must match a layer."""
    if callable(selector) and not isinstance(selector, type):
        return selector
    items = [selector] if isinstance(selector, (str, type)) else list(selector)
    for item in items:
        if not isinstance(item, (str, type)):
            raise TypeError(f"{arg} must be a callable (name, module) -> bool or a list of module "
                            f"names, glob patterns or module types; got an item {item!r}")
        if any(_item_matches(item, n, m) for n, m in candidates.items()):
            continue
        others = {n: m for n, m in modules.items() if _item_matches(item, n, m)}
        if others:
            inside = [n for n in candidates if isinstance(item, str) and n.startswith(f"{item}.")]
            hint = f" (the layers inside it: {item}.*)" if inside else ""
            raise ValueError(f"{arg} item {item!r} matches only modules sparsify does not convert: "
                             f"{_describe(others)}; it converts exactly nn.Conv2d and nn.Linear{hint}")
        raise ValueError(f"{arg} item {item!r} matches no module; Conv2d/Linear layers are: "
                         f"{_describe(candidates)}")
    return lambda name, module: any(_item_matches(item, name, module) for item in items)


def sparsify(model: nn.Module, include: Selector = None, exclude: Selector = None) -> nn.Module:
    """In place: turn ``model``'s ``nn.Conv2d`` / ``nn.Linear`` layers into masked ones (all True).

    ``include`` (default: all) and ``exclude`` (default: none) select layers by a callable
    ``(name, module) -> bool``, or a module name, glob pattern (``"layer4.*"``) or module type,
    or a list of these; a name, pattern or type that matches no such layer raises ValueError.
    Layers keep their identity, parameters, device, dtype and memory format, so optimizers
    built before still hold the right tensors. Subclasses of Conv2d/Linear are left alone
    (they may use their weight outside forward); masked layers stay masked. A layer whose weight
    a layer left dense shares stays dense too (one weight, one mask). Returns ``model``.
    """
    modules = dict(model.named_modules())
    candidates = {n: m for n, m in modules.items() if _is_candidate(m)}
    included = (lambda name, module: True) if include is None else \
        _predicate("include", include, modules, candidates)
    excluded = (lambda name, module: False) if exclude is None else \
        _predicate("exclude", exclude, modules, candidates)
    selected = {n: m for n, m in candidates.items() if included(n, m) and not excluded(n, m)}
    kept_dense = {id(m.weight) for n, m in candidates.items() if n not in selected and not isinstance(m, MaskedLayer)
                  and isinstance(getattr(m, "weight", None), torch.Tensor)}
    selected = {n: m for n, m in selected.items() if id(getattr(m, "weight", None)) not in kept_dense}
    lazy = {n: m for n, m in selected.items() if _unrun_lazy(m)}
    if lazy:
        raise ValueError(f"lazy layers not yet initialised: {_describe(lazy)}; run the model once (a forward "
                         "pass) before sparsify, which makes them Conv2d/Linear layers")
    for module in selected.values():
        to_masked_(module)
    return model


def _weight_name(module_name: str) -> str:
    return f"{module_name}.weight" if module_name else "weight"


def _masked_layers(model: nn.Module, aliases: bool = False) -> dict[str, MaskedLayer]:
    """Masked layers of ``model`` keyed by their weight's parameter name; with ``aliases``, a
    layer registered under several names appears under each (as in the state_dict)."""
    return {_weight_name(n): m for n, m in model.named_modules(remove_duplicate=not aliases)
            if isinstance(m, MaskedLayer)}


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the masks of ``model``'s masked layers, keyed by weight name (``"fc.weight"``)."""
    return {name: layer.weight_mask.detach().clone() for name, layer in _masked_layers(model).items()}


def wrapper_hint(model_keys: Iterable, given_keys: Iterable, given: str, advice: str) -> str:
    """When only one of the key sets starts with the prefix of a DDP or torch.compile wrapper, a
    hint saying so (``given`` names the second set, e.g. "the state's"), then ``advice``; else ""."""
    key_sets = list(model_keys), list(given_keys)
    for prefix, wrapper in (("module.", "DistributedDataParallel"), ("_orig_mod.", "torch.compile")):
        model_has, given_has = (bool(keys) and all(isinstance(k, str) and k.startswith(prefix) for k in keys)
                                for keys in key_sets)
        if model_has != given_has:
            which = "the model's" if model_has else given
            return f". Only {which} keys start with {prefix!r} ({wrapper}): {advice}"
    return ""


def _unknown_key(model: nn.Module, key, layers: Mapping[str, MaskedLayer], given: Iterable) -> ValueError:
    modules = dict(model.named_modules())
    if isinstance(key, str) and (key == "weight" or key.endswith(".weight")):
        owner = modules.get(key.removesuffix("weight").removesuffix("."))
        if isinstance(owner, _CONVERTIBLE) and not isinstance(owner, MaskedLayer):
            return ValueError(f"masks[{key!r}]: that layer is a {type(owner).__name__} without a "
                              "mask; swamp.sparsify converts nn.Conv2d and nn.Linear layers")
    if key in modules and _weight_name(key) in layers:
        return ValueError(f"masks has key {key!r}, a module name; did you mean {_weight_name(key)!r}?")
    names = list(layers)
    hint = wrapper_hint(names, given, "the masks'", "name the weights as the model passed does")
    return ValueError(f"masks has key {key!r}, which is no masked weight of the model; masked weights "
                      f"are: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}{hint}")


def set_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Copy ``masks`` (weight name -> bool tensor of the weight's shape) into ``model``'s layers.

    Layers not named keep their masks; masks may live on any device. Everything is checked
    before anything changes. Newly pruned weights become 0 (one ``apply_masks_`` call).
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict weight name -> bool tensor, got {type(masks).__name__}")
    layers = _masked_layers(model, aliases=True)
    named: dict[int, str] = {}   # id(layer) -> the first key naming it
    for key, mask in masks.items():
        if key not in layers:
            raise _unknown_key(model, key, layers, masks)
        other = named.setdefault(id(layers[key]), key)
        if other != key and isinstance(mask, torch.Tensor) and not torch.equal(mask.cpu(), masks[other].cpu()):
            raise ValueError(f"masks[{key!r}] and masks[{other!r}] name one layer but differ; give it one mask")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"masks[{key!r}] is a {type(mask).__name__}, not a tensor")
        if mask.dtype != torch.bool:
            raise TypeError(f"masks[{key!r}] has dtype {mask.dtype}; expected torch.bool")
        expected = tuple(layers[key].weight.shape)
        if tuple(mask.shape) != expected:
            raise ValueError(f"masks[{key!r}] has shape {tuple(mask.shape)}, expected {expected} "
                             "like the layer's weight")
    for key, mask in masks.items():
        layers[key].load_mask_(mask)
    zero_pruned_(model)


@dataclass(frozen=True)
class LayerDensity:
    """Kept entries of one masked weight."""

    name: str
    layer_type: str
    shape: tuple[int, ...]
    kept: int
    total: int

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 1.0


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer and global density of a model's masked weights; ``str()`` is a table.

    ``kept`` and ``total`` count each weight once: a weight shared by several layers is
    kept where all their masks keep it."""

    layers: tuple[LayerDensity, ...]
    kept: int
    total: int

    @property
    def density(self) -> float:
        """Kept fraction over all masked weights (1.0 when there are none)."""
        return self.kept / self.total if self.total else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def __str__(self) -> str:
        if not self.layers:
            return "no masked layers"
        rows = [(l.name, l.layer_type, "x".join(map(str, l.shape)), f"{l.kept}/{l.total}",
                 f"{100 * l.density:.2f}%") for l in self.layers]
        rows.append(("global", "", "", f"{self.kept}/{self.total}", f"{100 * self.density:.2f}%"))
        header = ("weight", "layer", "shape", "kept/total", "density")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        line = "  ".join
        out = [line(h.ljust(w) for h, w in zip(header, widths))]
        out += [line(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                for r in rows]
        return "\n".join(s.rstrip() for s in out)


def shared_masks(model: nn.Module) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """Each distinct masked weight once: its first name -> (the AND of the masks of the layers
    holding it, all its names)."""
    shared: dict[int, tuple[str, torch.Tensor, list[str]]] = {}
    for name, layer in _masked_layers(model).items():
        first, mask, names = shared.get(id(layer.weight), (name, None, []))
        mask = layer.weight_mask if mask is None else mask & layer.weight_mask
        shared[id(layer.weight)] = first, mask, [*names, name]
    return {first: (mask, names) for first, mask, names in shared.values()}


def require_values(tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming the tensors on the meta device (shapes without values)."""
    meta = [name for name, t in tensors.items() if isinstance(t, torch.Tensor) and t.is_meta]
    if meta:
        raise ValueError(f"{', '.join(meta[:3])}{', ...' if len(meta) > 3 else ''} "
                         f"{'is' if len(meta) == 1 else 'are'} on the meta device (shapes, no values): "
                         "materialise the model first (model.to_empty(device=...), then load_state_dict)")


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Density of every masked weight of ``model`` and over all of them."""
    layers = _masked_layers(model)
    require_values({f"{name}_mask": layer.weight_mask for name, layer in layers.items()})
    rows = tuple(LayerDensity(name, type(layer).__name__, tuple(layer.weight.shape), int(layer.weight_mask.sum()),
                              layer.weight_mask.numel()) for name, layer in layers.items())
    distinct = [mask for mask, _ in shared_masks(model).values()]
    return SparsityReport(rows, sum(int(m.sum()) for m in distinct), sum(m.numel() for m in distinct))


def export_dense(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with plain ``nn.Linear`` / ``nn.Conv2d`` layers holding the zeros.

    Its state_dict has no ``weight_mask`` keys and loads strictly into the unsparsified
    architecture; ``model`` is not changed.
    """
    dense = copy.deepcopy(model)
    for module in dense.modules():
        if isinstance(module, MaskedLayer):
            to_dense_(module)
    return dense
