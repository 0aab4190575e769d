"""Triton backend: one module per op family; ``OPS`` maps op names to implementations.

Importing this package imports triton; the dispatcher only does so when Triton can run
(a CUDA device, or ``TRITON_INTERPRET=1`` for CPU tensors).
"""
from swamp_kernels.triton.apply_masks import apply_masks_
from swamp_kernels.triton.magnitude_prune import global_magnitude_prune, layerwise_magnitude_prune
from swamp_kernels.triton.masked_linear import masked_linear
from swamp_kernels.triton.masked_sgd import masked_sgd_step_
from swamp_kernels.triton.particles import particle_average, swa_update_

OPS = {
    "apply_masks_": apply_masks_,
    "global_magnitude_prune": global_magnitude_prune,
    "layerwise_magnitude_prune": layerwise_magnitude_prune,
    "particle_average": particle_average,
    "swa_update_": swa_update_,
    "masked_sgd_step_": masked_sgd_step_,
    "masked_linear": masked_linear,
}
