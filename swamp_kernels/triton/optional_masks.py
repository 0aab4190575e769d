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

from swamp_kernels.triton.multi_tensor import int64_table


def masked_operand_table(operands: Sequence[Sequence[torch.Tensor]], masks: Sequence[torch.Tensor | None],
                         device: torch.device, extra: Sequence[int] = ()) -> torch.Tensor:
    """One int64 device table of T-entry columns: the addresses of each operand list, then the
    mask addresses and mask lengths, then ``extra``. ``operands[0][i]`` supplies the address of
    a missing ``masks[i]``.

    Operands and masks must be contiguous; masks bool.
    """
    mask_addresses = [(f if m is None else m).data_ptr() for m, f in zip(masks, operands[0])]
    mask_lengths = [0 if m is None else m.numel() for m in masks]
    return int64_table([*(t.data_ptr() for tensors in operands for t in tensors),
                        *mask_addresses, *mask_lengths, *extra], device)


def row_split(tensor: torch.Tensor, mask: torch.Tensor | None) -> tuple[int, int]:
    """(rows, entries per row) of ``tensor`` as its mask covers it: P rows when the mask
    broadcasts over the particle dim of a ``[P, *shape]`` tensor, else one row."""
    if mask is not None and mask.dim() == tensor.dim() - 1:
        return tensor.shape[0], mask.numel()
    return 1, tensor.numel()


@triton.jit
def load_keep(mask_address, mask_length, offsets, inside, ALIGNED: tl.constexpr):
    """``mask[offsets] != 0`` where ``inside``; all True for a tensor without a mask.
    ``ALIGNED``: the mask starts at a 16-byte boundary (see ``multi_tensor.vector_aligned``)."""
    mask_ptr = mask_address.to(tl.pointer_type(tl.int8))
    if ALIGNED:
        mask_ptr = tl.multiple_of(mask_ptr, 16)
    return tl.load(mask_ptr + offsets, mask=inside & (mask_length > 0), other=1) != 0
