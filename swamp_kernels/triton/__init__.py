"""Triton backend: one module per op family; ``OPS`` maps op names to implementations.

Importing this package imports triton; the dispatcher only does so when Triton can run
(a CUDA device, or ``TRITON_INTERPRET=1`` for CPU tensors).
"""
from swamp_kernels.triton.apply_masks import apply_masks_

OPS = {
    "apply_masks_": apply_masks_,
}
