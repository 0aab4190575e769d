"""Linear mode connectivity: error along the segment between two weight states, distances, mask overlap."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from swamp import evaluate
from swamp.data import SampledBatches   # re-exported: BatchNorm and Hessian batches drawn at random

__all__ = ["Batches", "SampledBatches", "data_eval_fn", "interpolate_states", "interpolation_barrier", "l2_distance",
           "mask_overlap"]


class Batches:
    """A re-iterable view of ``data.eval_batches(split, batch_size)`` (a fresh pass per ``iter``)."""

    def __init__(self, data, split: str, batch_size: int):
        self.data, self.split, self.batch_size = data, split, batch_size

    def __iter__(self):
        return iter(self.data.eval_batches(self.split, self.batch_size))


class _LoaderAsData:
    """Adapter: ``evaluate.recompute_bn_`` reads ``data.eval_batches``; this replays a loader
    (split and batch size are the loader's own)."""

    def __init__(self, loader: Iterable):
        self.loader = loader

    def eval_batches(self, split: str, batch_size: int, shard: tuple[int, int] = (0, 1)):
        index, count = shard
        for i, batch in enumerate(self.loader):
            if i % count == index:
                yield batch if isinstance(batch, (tuple, list)) else (batch, None)


def data_eval_fn(data, batch_size: int, split: str = "test") -> Callable[[nn.Module], tuple[float, float]]:
    """``net -> (error, mean cross-entropy)`` on ``data``'s ``split``, "test" or "train"
    (un-augmented: every training example once)."""
    evaluate.checked_split(split)

    def eval_fn(net: nn.Module) -> tuple[float, float]:
        probs, labels = evaluate.probabilities(net, data, batch_size, split)
        loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
        return 1.0 - evaluate.accuracy(probs, labels), loss
    return eval_fn


def interpolate_states(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                       alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * A + alpha * B`` for floating tensors; bool tensors (masks) become the union
    ``A | B`` so both ends' weights stay live; other tensors (counters) are taken from A."""
    if set(state_a) != set(state_b):
        raise ValueError(f"state_a and state_b differ in keys: {sorted(set(state_a) ^ set(state_b))[:6]}")
    out = {}
    for name, a in state_a.items():
        b = state_b[name]
        if a.shape != b.shape:
            raise ValueError(f"state[{name!r}] has shape {tuple(a.shape)} in state_a but "
                             f"{tuple(b.shape)} in state_b")
        if a.is_floating_point():
            out[name] = torch.lerp(a, b.to(a.device, a.dtype), alpha)
        elif a.dtype == torch.bool:
            out[name] = a | b.to(a.device)
        else:
            out[name] = a
    return out


def interpolation_barrier(model: nn.Module, state_a: Mapping[str, torch.Tensor],
                          state_b: Mapping[str, torch.Tensor],
                          eval_fn: Callable[[nn.Module], tuple[float, float]], num_points: int = 11,
                          bn_loader: Iterable | None = None) -> dict:
    """Evaluate ``eval_fn(net) -> (error, loss)`` at ``num_points`` evenly spaced ``alpha`` in [0, 1]
    on networks holding :func:`interpolate_states` ``(state_a, state_b, alpha)`` (``model`` gives
    the architecture and is not changed). With ``bn_loader`` (re-iterable batches ``(x, y)`` or
    ``x``), BatchNorm statistics are recomputed at every point, the two ends included.

    Returns ``{"alphas", "errors", "losses", "barrier", "loss_barrier"}``; ``barrier`` is the
    largest error along the path minus the mean of the two end errors (likewise for the loss).
    """
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    alphas = [i / (num_points - 1) for i in range(num_points)]
    errors, losses = [], []
    for alpha in alphas:
        net = evaluate.network(model, interpolate_states(state_a, state_b, alpha))
        if bn_loader is not None:
            evaluate.recompute_bn_(net, _LoaderAsData(bn_loader), batch_size=0)
        error, loss = eval_fn(net)
        errors.append(float(error))
        losses.append(float(loss))
    return {"alphas": alphas, "errors": errors, "losses": losses,
            "barrier": max(errors) - (errors[0] + errors[-1]) / 2,
            "loss_barrier": max(losses) - (losses[0] + losses[-1]) / 2}


def l2_distance(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                names: Iterable[str] | None = None) -> float:
    """Euclidean distance between the tensors ``names`` (default: every floating tensor) of two states."""
    names = [n for n, t in state_a.items() if t.is_floating_point()] if names is None else list(names)
    missing = [n for n in names if n not in state_a or n not in state_b]
    if missing:
        raise ValueError(f"l2_distance: {missing[:6]} missing from state_a or state_b")
    total = sum(float((state_a[n].double() - state_b[n].to(state_a[n].device).double()).square().sum())
                for n in names)
    return math.sqrt(total)


def mask_overlap(mask_a: Mapping[str, torch.Tensor], mask_b: Mapping[str, torch.Tensor]) -> dict:
    """Jaccard index ``|A & B| / |A | B|`` of two mask dicts (weight name -> bool tensor), per
    layer and over all layers: ``{"layers": {name: j}, "global": j}`` (1.0 when a union is empty)."""
    if set(mask_a) != set(mask_b):
        raise ValueError(f"mask_a and mask_b name different weights: {sorted(set(mask_a) ^ set(mask_b))[:6]}")
    layers, inter_total, union_total = {}, 0, 0
    for name, a in mask_a.items():
        b = mask_b[name]
        if a.dtype != torch.bool or b.dtype != torch.bool:
            raise TypeError(f"masks[{name!r}] must be bool tensors, got {a.dtype} and {b.dtype}")
        if a.shape != b.shape:
            raise ValueError(f"masks[{name!r}] has shape {tuple(a.shape)} in mask_a but {tuple(b.shape)} in mask_b")
        b = b.to(a.device)
        inter, union = int((a & b).sum()), int((a | b).sum())
        layers[name] = inter / union if union else 1.0
        inter_total += inter
        union_total += union
    return {"layers": layers, "global": inter_total / union_total if union_total else 1.0}
