"""The two IMP steps on a masked model in your own training loop: prune, then rewind.

::

    swamp.sparsify(model)
    ...train k iterations...
    rewind_state = copy.deepcopy(model.state_dict())     # the rewind point
    for level in range(levels):
        ...train to the end...
        swamp.prune(model, 0.2)                          # 20% of the remaining weights
        swamp.rewind(model, rewind_state)                # back to the rewind point, new masks kept

:func:`next_masks` is the same selection on ``{weight name: tensor}`` dicts (what the pipeline
prunes its averaged state with).
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

import swamp_kernels
from swamp.config import PRUNE_SCOPES
from swamp.sparsify import masks as model_masks
from swamp.sparsify import _masked_layers, require_values, set_masks, shared_masks, wrapper_hint

__all__ = ["CRITERIA", "next_masks", "float32_keys", "shuffled_masks", "prune", "rewind"]

CRITERIA = ("magnitude", "random")


def next_masks(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], amount: float = 0.2,
               *, scope: str = "global", criterion: str = "magnitude", seed: int = 0,
               scores: Mapping[str, torch.Tensor] | None = None, backend: str = "auto") -> dict[str, torch.Tensor]:
    """The masks after pruning ``amount`` of the entries that ``masks`` keeps, keyed like ``masks``.

    ``amount`` as in :func:`swamp_kernels.global_magnitude_prune` (a fraction of the remaining
    entries, or an int count). ``scope``: ``"global"`` (one threshold over all weights) or
    ``"layerwise"`` (each weight loses ``amount`` of its own). ``criterion``: ``"magnitude"``
    (smallest ``|w|`` pruned, ties keep the lowest index; float64 weights are ranked by their
    float32 rounding) or ``"random"`` (uniform, from ``seed``: the lottery-ticket control).
    ``scores`` (criterion magnitude): rank by these instead of ``|w|``, the largest kept (e.g.
    :mod:`swamp.saliency`'s; float64 ones by :func:`float32_keys`). ``weights`` (and ``scores``)
    must hold every key of ``masks``; errors name the weights.
    """
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"scope must be one of {', '.join(PRUNE_SCOPES)}; got {scope!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    if scores is not None and criterion != "magnitude":
        raise ValueError(f"scores rank the weights instead of their magnitudes: criterion {criterion!r} takes none")
    for what, given in (("weights", weights), ("scores", scores)):
        missing = [name for name in masks if given is not None and name not in given]
        if missing:
            raise ValueError(f"{what} lacks the masked weight(s) {', '.join(map(repr, missing[:6]))}")
    names = list(masks)
    require_values({name: weights[name] for name in names})
    tensors = _float32([weights[name] for name in names])
    select = (swamp_kernels.global_magnitude_prune if scope == "global"
              else swamp_kernels.layerwise_magnitude_prune)
    try:
        keys = (swamp_kernels.random_scores(tensors, seed=seed) if criterion == "random" else
                None if scores is None else float32_keys([scores[name] for name in names]))
        new = select(tensors, [masks[name] for name in names], amount, scores=keys, backend=backend)
    except (TypeError, ValueError) as error:
        raise _naming(error, names) from None
    return dict(zip(names, new))


def _float32(tensors: list) -> list:
    """float64 tensors rounded to float32 (what the prune ops rank); others as they are."""
    return [t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.float64 else t for t in tensors]


def float32_keys(scores: Sequence[torch.Tensor]) -> list:
    """Keys the prune ops can rank (float32, float16, bfloat16) in the order of all ``scores``
    together: float64 ones rounded to float32 where it holds every score, else ``asinh`` of every
    score in float32 (monotone, logarithmic beyond float32's range, as SynFlow's flows of deep
    networks are). What is no tensor is left for the op to name."""
    beyond = any(isinstance(s, torch.Tensor) and s.dtype == torch.float64 and s.numel()
                 and bool(s.abs().max() > torch.finfo(torch.float32).max) for s in scores)
    if not beyond:
        return _float32(list(scores))
    return [s.double().asinh().float() if isinstance(s, torch.Tensor) else s for s in scores]


def shuffled_masks(masks: Mapping[str, torch.Tensor], scope: str = "layerwise", seed: int = 0) -> dict[str, torch.Tensor]:
    """``masks`` with their kept entries moved to uniformly random places, from ``seed``: inside
    each mask (``scope="layerwise"``: every layer keeps its density) or over all of them together
    (``"global"``: only the overall density is kept). The random-pruning controls for masks found
    otherwise (by IMP, say), as OpenLTH's random-prune branches draw them. New bool tensors, on
    the devices of ``masks``, keyed like it.
    """
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"scope must be one of {', '.join(PRUNE_SCOPES)}; got {scope!r}")
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be a bool tensor, got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    generator = torch.Generator().manual_seed(seed)   # on the CPU: the same masks from any device
    flat = [mask.detach().cpu().flatten() for mask in masks.values()]
    if scope == "global":
        joined = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.bool)
        flat = list(joined[torch.randperm(joined.numel(), generator=generator)].split([f.numel() for f in flat]))
    else:
        flat = [f[torch.randperm(f.numel(), generator=generator)] for f in flat]
    return {name: f.view(mask.shape).to(mask.device) for (name, mask), f in zip(masks.items(), flat)}


def _naming(error: Exception, names: list[str]) -> Exception:
    """``error`` of an op on the list ``names`` with the names of the indices it mentions."""
    indices = sorted({int(i) for i in re.findall(r"\[(\d+)\]", str(error))} & set(range(len(names))))
    if not indices:
        return error
    return type(error)(f"{error} ({', '.join(f'[{i}] is {names[i]!r}' for i in indices)})")


def prune(model: nn.Module, amount: float = 0.2, *, scope: str = "global", criterion: str = "magnitude",
          seed: int = 0, scores: Mapping[str, torch.Tensor] | None = None,
          backend: str = "auto") -> dict[str, torch.Tensor]:
    """In place: prune ``amount`` of the remaining weights of ``model``'s masked layers.

    Arguments as in :func:`next_masks`. A weight shared by several layers counts once (its
    ``scores`` under its first name, as :mod:`swamp.saliency` gives them) and gets one mask in
    all of them. The new masks go into the layers and the newly pruned
    weights become 0 (:func:`swamp.set_masks`); returns copies of them, keyed by weight name.
    """
    shared = shared_masks(model)
    if not shared:
        raise ValueError("the model has no masked layers: call swamp.sparsify(model) first")
    weights = {first: model.get_parameter(first).detach() for first in shared}
    new = next_masks(weights, {first: mask for first, (mask, _) in shared.items()}, amount, scope=scope,
                     criterion=criterion, seed=seed, scores=scores, backend=backend)
    emptied = emptied_layers({first: (mask, new[first]) for first, (mask, _) in shared.items()})
    if emptied:
        warnings.warn(collapse_warning(emptied), stacklevel=2)
    by_name = {name: new[first] for first, (_, names) in shared.items() for name in names}
    set_masks(model, by_name)
    return {name: by_name[name] for name in model_masks(model)}


def emptied_layers(masks: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    """The names whose mask kept weights before pruning but none after ({name: (before, after)}):
    global magnitude pruning can empty a layer of small weights, which cuts the network there."""
    device = next(iter(masks.values()))[0].device   # one device-to-host copy for all layers
    alive = torch.stack([torch.stack([before.any(), after.any()]).to(device) for before, after in masks.values()])
    return [name for name, (before, after) in zip(masks, alive.cpu().tolist()) if before and not after]


def collapse_warning(emptied: Sequence[str]) -> str:
    """What to tell a user whose pruning emptied the layers ``emptied``."""
    return (f"pruning removed every remaining weight of {', '.join(emptied[:6])}"
            f"{', ...' if len(emptied) > 6 else ''}: the network is cut there (layer collapse); keep such "
            "layers dense (sparsify(exclude=...), the config's prune.exclude) or prune layerwise")


def rewind(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """In place: load ``state`` (a state_dict, e.g. saved at the rewind point) but keep the masks.

    ``state`` may come from the masked model or from the dense one: its masks of the model's
    masked layers, and of layers the model keeps dense, are ignored (another module's own
    ``weight_mask`` buffer loads as usual); every other key, shape and value type must match the model's
    (checked before anything is loaded). Pruned weights are 0 afterwards. (A plain
    ``load_state_dict`` of a masked checkpoint would restore that checkpoint's masks too: at
    the rewind point, all True.)
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a state_dict (a mapping of names to tensors), got {type(state).__name__}")
    expected = model.state_dict()
    current = {f"{name}_mask": layer.weight_mask for name, layer in _masked_layers(model, aliases=True).items()}
    dense_here = {k for k in state if k.endswith("weight_mask") and k not in expected   # layers kept dense
                  and k.removesuffix("_mask") in expected}
    loaded = {**{k: v for k, v in state.items() if k not in current and k not in dense_here}, **current}
    _check_matches(expected, loaded, wrapper_hint(expected, state, "the state's", "rewind the wrapped module with "
                                                  "its own state_dict, or the wrapper with the wrapper's"))
    model.load_state_dict(loaded)


def _check_matches(expected: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor], hint: str) -> None:
    """Raise (ending with ``hint``) before anything is loaded: ``load_state_dict`` loads what
    matches, then raises."""
    tensors = {k: v for k, v in expected.items() if isinstance(v, torch.Tensor) and k in loaded}
    problems = {
        "missing keys": [k for k in expected if k not in loaded],
        "unexpected keys": [k for k in loaded if k not in expected],
        "not tensors": [f"{k} ({type(loaded[k]).__name__})" for k in tensors
                        if not isinstance(loaded[k], torch.Tensor)],
        "shape mismatches": [f"{k} {tuple(loaded[k].shape)} != {tuple(v.shape)}" for k, v in tensors.items()
                             if isinstance(loaded[k], torch.Tensor) and loaded[k].shape != v.shape],
    }
    found = [f"{what}: {', '.join(items[:6])}{', ...' if len(items) > 6 else ''}"
             for what, items in problems.items() if items]
    if found:
        raise ValueError(f"state does not match the model ({'; '.join(found)}); nothing was loaded{hint}")
