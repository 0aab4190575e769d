"""``apply_masks_`` case (issue 2): zero the pruned entries of ResNet-50's conv/fc weights.

Baselines multiply by masks stored in the weight dtype (as ``torch.nn.utils.prune`` keeps
them): a per-tensor ``mul_`` loop and one ``torch._foreach_mul_``.
"""
from __future__ import annotations

import torch

from benchmarks import inputs, shapes
from benchmarks.case import Case


def _float_masks(x: dict) -> list[torch.Tensor]:
    return [m.to(w.dtype) for w, m in zip(x["tensors"], x["masks"])]


def mul_loop(x: dict):
    """Baseline factory: ``w.mul_(mask)`` for each tensor."""
    tensors, masks = x["tensors"], _float_masks(x)

    def apply():
        for w, m in zip(tensors, masks):
            w.mul_(m)
    return apply


def foreach_mul(x: dict):
    """Baseline factory: ``torch._foreach_mul_(tensors, masks)``."""
    tensors, masks = x["tensors"], _float_masks(x)
    return lambda: torch._foreach_mul_(tensors, masks)


def _setup(device: torch.device, smoke: bool) -> dict:
    shps = shapes.resnet50_conv_fc()
    shps = shapes.shrink(shps) if smoke else shps
    gen = inputs.generator(device)
    return {"tensors": inputs.weights(shps, torch.float32, device, gen),
            "masks": inputs.masks(shps, 0.2, device, gen)}


def _bytes(x) -> int:
    """Read tensors and masks, write tensors."""
    return inputs.nbytes(x["tensors"], x["masks"], x["tensors"])


CASES = (
    Case(op="apply_masks_", name="resnet50_convfc_fp32_pruned80", setup=_setup,
         args=("tensors", "masks"), bytes_moved=_bytes,
         baselines={"mul_loop": mul_loop, "foreach_mul_": foreach_mul}),
)
