"""swamp: iterative magnitude pruning and SWAMP made fast (thin layer over swamp_kernels)."""
from swamp import saliency
from swamp.imp import prune, rewind, shuffled_masks
from swamp.nn import MaskedConv2d, MaskedLinear, zero_pruned_
from swamp.optim import MaskedSGD
from swamp.sparsify import export_dense, masks, set_masks, sparsify, sparsity_report

__version__ = "0.1.0"
__all__ = ["MaskedConv2d", "MaskedLinear", "MaskedSGD", "export_dense", "masks", "prune", "rewind", "saliency",
           "set_masks", "shuffled_masks", "sparsify", "sparsity_report", "zero_pruned_"]
