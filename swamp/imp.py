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

from typing import Mapping

import torch
from torch import nn

import swamp_kernels
from swamp.config import PRUNE_SCOPES
from swamp.sparsify import masks as model_masks
from swamp.sparsify import set_masks

__all__ = ["next_masks", "prune", "rewind", "CRITERIA"]

CRITERIA = ("magnitude", "random")


def next_masks(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], amount: float | int = 0.2,
               *, scope: str = "global", criterion: str = "magnitude", seed: int = 0,
               backend: str = "auto") -> dict[str, torch.Tensor]:
    """The masks after pruning ``amount`` of the entries that ``masks`` keeps, keyed like ``masks``.

    ``amount`` as in :func:`swamp_kernels.global_magnitude_prune` (a fraction of the remaining
    entries, or an int count). ``scope``: ``"global"`` (one threshold over all weights) or
    ``"layerwise"`` (each weight loses ``amount`` of its own). ``criterion``: ``"magnitude"``
    (smallest ``|w|`` pruned, ties keep the lowest index) or ``"random"`` (uniform, from
    ``seed``: the lottery-ticket control). ``weights`` must hold every key of ``masks``.
    """
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"scope must be one of {', '.join(PRUNE_SCOPES)}; got {scope!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    missing = [name for name in masks if name not in weights]
    if missing:
        raise ValueError(f"weights lacks the masked weight(s) {', '.join(map(repr, missing[:6]))}")
    names = list(masks)
    tensors = [weights[name] for name in names]
    scores = swamp_kernels.random_scores(tensors, seed=seed) if criterion == "random" else None
    select = (swamp_kernels.global_magnitude_prune if scope == "global"
              else swamp_kernels.layerwise_magnitude_prune)
    return dict(zip(names, select(tensors, [masks[name] for name in names], amount, scores=scores,
                                  backend=backend)))


def prune(model: nn.Module, amount: float | int = 0.2, *, scope: str = "global", criterion: str = "magnitude",
          seed: int = 0, backend: str = "auto") -> dict[str, torch.Tensor]:
    """In place: prune ``amount`` of the remaining weights of ``model``'s masked layers.

    Arguments as in :func:`next_masks`. The new masks go into the layers and the newly pruned
    weights become 0 (:func:`swamp.set_masks`); returns copies of them, keyed by weight name.
    """
    current = model_masks(model)
    if not current:
        raise ValueError("the model has no masked layers: call swamp.sparsify(model) first")
    weights = {name: model.get_parameter(name).detach() for name in current}
    new = next_masks(weights, current, amount, scope=scope, criterion=criterion, seed=seed, backend=backend)
    set_masks(model, new)
    return new


def rewind(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """In place: load ``state`` (a state_dict, e.g. saved at the rewind point) but keep the masks.

    ``state`` may come from the masked model (its ``weight_mask`` entries are ignored) or from
    the dense one; every other key and shape must match the model's (checked before anything
    is loaded). Pruned
    weights are 0 afterwards. (A plain ``load_state_dict`` of a masked checkpoint would restore
    that checkpoint's masks too: at the rewind point, all True.)
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a state_dict (a mapping of names to tensors), got {type(state).__name__}")
    current = {f"{name}_mask": mask for name, mask in model_masks(model).items()}
    loaded = {**{k: v for k, v in state.items() if k not in current}, **current}
    _check_matches(model.state_dict(), loaded)
    model.load_state_dict(loaded)


def _check_matches(expected: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor]) -> None:
    """Raise before anything is loaded (``load_state_dict`` loads what matches, then raises)."""
    problems = {
        "missing keys": [k for k in expected if k not in loaded],
        "unexpected keys": [k for k in loaded if k not in expected],
        "shape mismatches": [f"{k} {tuple(loaded[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                             if isinstance(v, torch.Tensor) and isinstance(loaded.get(k), torch.Tensor)
                             and loaded[k].shape != v.shape],
    }
    found = [f"{what}: {', '.join(items[:6])}{', ...' if len(items) > 6 else ''}"
             for what, items in problems.items() if items]
    if found:
        raise ValueError(f"state does not match the model ({'; '.join(found)}); nothing was loaded")
