"""``global_magnitude_prune`` cases (issue 3) and the ways users prune globally without swamp.

Inputs are pruned weights as in IMP: entries outside the mask are already zero. Baselines
concatenate the candidates into one buffer and select there: ``topk`` (what
``torch.nn.utils.prune.global_unstructured`` does), ``kthvalue``, ``sort``, and ``numpy_sort_cpu``
(OpenLTH's ``sparse_global``: copy to the host, ``np.sort``, threshold). Their tie handling
differs from the op's contract; they are timed, not checked.
"""
from __future__ import annotations

import numpy as np
import torch

from benchmarks import inputs, shapes
from benchmarks.case import Case, calling

OP = "global_magnitude_prune"
AMOUNT = 0.2


def _candidates(weights, masks) -> tuple[torch.Tensor, torch.Tensor]:
    flat_masks = torch.cat([m.reshape(-1) for m in masks])
    keys = torch.cat([w.reshape(-1) for w in weights])[flat_masks].abs()
    return keys, flat_masks


def _scatter(keep: torch.Tensor, flat_masks: torch.Tensor, weights) -> list[torch.Tensor]:
    """New per-tensor masks: the candidates' ``keep`` written back where ``flat_masks`` is True."""
    new = torch.zeros_like(flat_masks)
    new[flat_masks] = keep
    return [part.view(w.shape) for part, w in zip(new.split([w.numel() for w in weights]), weights)]


def _drop_indices(keys: torch.Tensor, indices: torch.Tensor, flat_masks, weights):
    keep = torch.ones_like(keys, dtype=torch.bool)
    keep[indices] = False
    return _scatter(keep, flat_masks, weights)


def prune_topk(weights, masks, amount):
    """torch.nn.utils.prune's way: ``topk(largest=False)`` picks the entries to drop."""
    keys, flat_masks = _candidates(weights, masks)
    k = round(amount * keys.numel())
    return _drop_indices(keys, torch.topk(keys, k, largest=False).indices, flat_masks, weights)


def prune_kthvalue(weights, masks, amount):
    """``kthvalue`` finds the threshold; entries above it are kept."""
    keys, flat_masks = _candidates(weights, masks)
    k = round(amount * keys.numel())
    return _scatter(keys > torch.kthvalue(keys, k).values, flat_masks, weights)


def prune_sort(weights, masks, amount):
    """A full ``sort``; the first ``k`` sorted indices are dropped."""
    keys, flat_masks = _candidates(weights, masks)
    k = round(amount * keys.numel())
    return _drop_indices(keys, torch.sort(keys).indices[:k], flat_masks, weights)


def prune_numpy_cpu(weights, masks, amount):
    """OpenLTH ``sparse_global``: weights and masks to the host, ``np.sort`` of the candidates'
    magnitudes, keep entries above the threshold. Returns host (numpy) masks, as OpenLTH does."""
    ws = [w.detach().float().cpu().numpy() for w in weights]
    ms = [m.cpu().numpy() for m in masks]
    vector = np.concatenate([w[m] for w, m in zip(ws, ms)])
    k = int(np.ceil(amount * vector.size))
    threshold = np.sort(np.abs(vector))[k]
    return [np.where(np.abs(w) > threshold, m, False) for w, m in zip(ws, ms)]


BASELINES = {
    "topk": calling(prune_topk, "weights", "masks", amount=AMOUNT),
    "kthvalue": calling(prune_kthvalue, "weights", "masks", amount=AMOUNT),
    "sort": calling(prune_sort, "weights", "masks", amount=AMOUNT),
    "numpy_sort_cpu": calling(prune_numpy_cpu, "weights", "masks", amount=AMOUNT),
}


def _setup(shape_list, dtype: torch.dtype, pruned: float):
    def setup(device: torch.device, smoke: bool) -> dict:
        shps = shapes.shrink(shape_list()) if smoke else shape_list()
        gen = inputs.generator(device)
        masks = inputs.masks(shps, 1 - pruned, device, gen)
        weights = [w.mul_(m) for w, m in zip(inputs.weights(shps, dtype, device, gen), masks)]
        return {"weights": weights, "masks": masks}
    return setup


def _bytes(x) -> int:
    """Read weights and masks, write the new masks."""
    return inputs.nbytes(x["weights"], x["masks"], x["masks"])


def _case(name: str, shape_list, dtype: torch.dtype, pruned: float, large: bool = False) -> Case:
    return Case(op=OP, name=name, setup=_setup(shape_list, dtype, pruned),
                args=("weights", "masks"), kwargs={"amount": AMOUNT}, bytes_moved=_bytes,
                baselines=BASELINES, large=large)


CASES = (
    _case("resnet50_convfc_fp32_pruned0", shapes.resnet50_conv_fc, torch.float32, 0.0),
    _case("resnet50_convfc_fp32_pruned80", shapes.resnet50_conv_fc, torch.float32, 0.8),
    _case("resnet50_convfc_bf16_pruned0", shapes.resnet50_conv_fc, torch.bfloat16, 0.0),
    _case("resnet50_convfc_bf16_pruned80", shapes.resnet50_conv_fc, torch.bfloat16, 0.8),
    _case("mixed_1e8_fp32_pruned0", lambda: shapes.MIXED_1E8, torch.float32, 0.0, large=True),
)
