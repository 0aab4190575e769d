"""Pruning at initialisation: the scores SNIP, GraSP and SynFlow rank a network's weights by
before it trains (Lee et al. 2019; Wang et al. 2020; Tanaka et al. 2020), the usual baselines
of lottery-ticket studies (Frankle et al. 2021, "Pruning neural networks at initialization: why
are we missing the mark?").

Each reads a sparsified model (:func:`swamp.sparsify`) without changing it (it works on a
copy) and scores the weights of its masked layers, each weight once (a weight several layers
share under its first name, as in :func:`swamp.sparsify.shared_masks`); pruned weights, being
0, score 0. Higher scores are kept::

    scores = swamp.saliency.snip_scores(model, batches)       # batches: [(x, y), ...]
    swamp.prune(model, 0.9, scores=scores)                    # keep the 10% of highest score
    swamp.set_masks(model, swamp.saliency.synflow_masks(model, input_shape, keep=10_000))
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

import swamp_kernels
from swamp.imp import float32_keys
from swamp.sparsify import set_masks, shared_masks

__all__ = ["GRASP_TEMPERATURE", "SYNFLOW_ROUNDS", "snip_scores", "grasp_scores", "synflow_scores", "synflow_masks"]

GRASP_TEMPERATURE = 200.0   # GraSP divides the logits by it (Wang et al. 2020)
SYNFLOW_ROUNDS = 100        # SynFlow prunes in this many rounds (Tanaka et al. 2020)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _weights(net: nn.Module) -> dict[str, nn.Parameter]:
    """The masked weights of ``net``, each once, by first name."""
    weights = {first: net.get_parameter(first) for first in shared_masks(net)}
    if not weights:
        raise ValueError("the model has no masked layers: call swamp.sparsify(model) first")
    return weights


def _scoring_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in training mode, float32 where it is float16 or bfloat16 (whose range
    GraSP's small scores underflow)."""
    net = copy.deepcopy(model).train()
    return net.float() if any(p.dtype in (torch.float16, torch.bfloat16) for p in net.parameters()) else net


def _outputs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net(x)``, a floating ``x`` in the dtype of ``net``'s parameters."""
    dtype = next(net.parameters()).dtype
    return net(x.to(dtype) if x.is_floating_point() else x)


def _gradients(net: nn.Module, weights: dict[str, nn.Parameter], batches: Batches,
               loss_fn: LossFn) -> list[torch.Tensor]:
    """The gradient of ``loss_fn(net(x), y)`` with respect to ``weights``, summed over ``batches``."""
    total = None
    for x, y in batches:
        grads = torch.autograd.grad(loss_fn(_outputs(net, x), y), list(weights.values()))
        total = list(grads) if total is None else [t + g for t, g in zip(total, grads)]
    if total is None:
        raise ValueError("batches is empty: the scores need at least one batch (x, y)")
    return total


def snip_scores(model: nn.Module, batches: Batches, loss_fn: LossFn = F.cross_entropy) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity ``|w * dL/dw|``, ``L`` the loss summed over ``batches``
    (the model in training mode, as it trains: BatchNorm on batch statistics; float16 and bfloat16
    models in float32)."""
    net = _scoring_copy(model)
    weights = _weights(net)
    grads = _gradients(net, weights, batches, loss_fn)
    return {name: (w.detach() * g).abs() for (name, w), g in zip(weights.items(), grads)}


def grasp_scores(model: nn.Module, batches: Batches, loss_fn: LossFn = F.cross_entropy,
                 temperature: float = GRASP_TEMPERATURE) -> dict[str, torch.Tensor]:
    """GraSP's ``w * Hg``: ``g`` the gradient of the loss of the logits divided by
    ``temperature``, summed over ``batches``, and ``Hg`` the Hessian of that loss times ``g``
    (training mode). GraSP removes the weights of largest ``-w * Hg``, whose removal reduces the
    gradient flow least: keeping the largest of these scores does the same. Training mode and
    float32 as :func:`snip_scores`."""
    net = _scoring_copy(model)
    weights = _weights(net)
    batches = list(batches)

    def cooled(logits, y):
        return loss_fn(logits / temperature, y)
    g = _gradients(net, weights, batches, cooled)
    params, hg = list(weights.values()), [torch.zeros_like(w) for w in weights.values()]
    for x, y in batches:   # Hg = d(g . dL/dw)/dw, a batch at a time
        grads = torch.autograd.grad(cooled(_outputs(net, x), y), params, create_graph=True)
        for total, h in zip(hg, torch.autograd.grad(sum((a * b).sum() for a, b in zip(grads, g)), params)):
            total += h
    return {name: w.detach() * h for (name, w), h in zip(weights.items(), hg)}


def _linearised(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` in eval mode with every float parameter and buffer replaced by
    its absolute value: SynFlow's network, whose output is a sum of positive path products."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for tensor in [*net.parameters(), *net.buffers()]:
            if tensor.is_floating_point():
                tensor.abs_()
    return net


def _flow(net: nn.Module, input_shape, weights: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    x = torch.ones(1, *input_shape, dtype=torch.float64, device=next(iter(weights.values())).device)
    grads = torch.autograd.grad(net(x).sum(), list(weights.values()))
    flows = {name: (w.detach() * g).abs() for (name, w), g in zip(weights.items(), grads)}
    if not all(bool(torch.isfinite(f).all()) for f in flows.values()):
        raise ValueError("SynFlow's synaptic flow overflows float64 in this network: it multiplies the "
                         "absolute weights of every layer along each path, too many layers for it")
    return flows


def synflow_scores(model: nn.Module, input_shape) -> dict[str, torch.Tensor]:
    """SynFlow's synaptic flow ``|w * dR/dw|`` (float64): ``R`` the sum of the outputs, for an
    input of ones of ``input_shape`` (no batch dimension), of the model with every parameter and
    buffer replaced by its absolute value, in eval mode. No data is used. (Normalisation layers
    other than BatchNorm in eval mode make some ``w * dR/dw`` negative: their magnitude counts,
    as in Tanaka et al.'s code.)"""
    net = _linearised(model)
    return _flow(net, input_shape, _weights(net))


def synflow_masks(model: nn.Module, input_shape, keep: int, rounds: int = SYNFLOW_ROUNDS) -> dict[str, torch.Tensor]:
    """SynFlow's masks: ``rounds`` rounds of scoring (:func:`synflow_scores`) under the masks so
    far and pruning the lowest scores, the weights kept shrinking exponentially from those the
    model's masks keep to ``keep``. Keyed like :func:`swamp.masks` (a shared weight's mask under
    each of its names); the model is not changed."""
    net = _linearised(model)
    weights, shared = _weights(net), shared_masks(net)
    masks = {first: mask.clone() for first, (mask, _) in shared.items()}
    start = sum(int(m.sum()) for m in masks.values())
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= start:
        raise ValueError(f"keep must be an int in [0, {start}] (the weights the masks keep), got {keep!r}")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")

    def by_name(first_masks: dict) -> dict:
        return {name: first_masks[first] for first, (_, names) in shared.items() for name in names}
    for step in range(1, rounds + 1):
        set_masks(net, by_name(masks))
        keys = float32_keys(list(_flow(net, input_shape, weights).values()))
        kept = sum(int(m.sum()) for m in masks.values())
        target = round(start * (keep / start) ** (step / rounds)) if start else 0
        masks = dict(zip(masks, swamp_kernels.global_magnitude_prune(keys, list(masks.values()), kept - target,
                                                                      scores=keys)))
    return by_name(masks)
