"""Masks that a tensor may lack, as per-tensor table columns and an in-kernel load.

Each tensor of a launch gets a mask address and a mask length; a tensor without a mask
gets length 0 (and any valid address, never read), and all its entries are kept.
Kernels index a mask by the element's offset within one row of the tensor, so a mask
that broadcasts over the leading particle dimension is read with the same index for
every particle.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl


def mask_columns(masks: Sequence[torch.Tensor | None],
                 fallbacks: Sequence[torch.Tensor]) -> tuple[list[int], list[int]]:
    """Mask addresses and lengths; ``fallbacks[i]`` supplies the address when ``masks[i]`` is None.

    Masks must be contiguous bool tensors.
    """
    addresses = [(f if m is None else m).data_ptr() for m, f in zip(masks, fallbacks)]
    lengths = [0 if m is None else m.numel() for m in masks]
    return addresses, lengths


@triton.jit
def load_keep(mask_address, mask_length, offsets, inside):
    """``mask[offsets] != 0`` where ``inside``; all True for a tensor without a mask."""
    mask_ptr = mask_address.to(tl.pointer_type(tl.int8))
    return tl.load(mask_ptr + offsets, mask=inside & (mask_length > 0), other=1) != 0
