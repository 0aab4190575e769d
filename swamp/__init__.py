"""swamp: iterative magnitude pruning and SWAMP made fast (thin layer over swamp_kernels)."""
__version__ = "0.1.0"
