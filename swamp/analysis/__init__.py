"""Loss-landscape analysis of IMP / SWAMP runs: linear mode connectivity, stability, flatness, masks.

:mod:`~swamp.analysis.landscape` (interpolation barriers, distances, mask overlap),
:mod:`~swamp.analysis.hessian` (top eigenvalues and trace by Hessian-vector products),
:mod:`~swamp.analysis.runs` (the same on run directories written by :mod:`swamp.pipeline`),
:mod:`~swamp.analysis.commands` (``swamp analyze``).
"""
from swamp.analysis.hessian import TopEigenvalues, TraceEstimate, hessian_trace, top_hessian_eigenvalues
from swamp.analysis.landscape import (Batches, SampledBatches, data_eval_fn, interpolate_states,
                                      interpolation_barrier, l2_distance, mask_overlap)
from swamp.analysis.runs import instability, layer_densities, level_hessians, load_run, successive_barriers

__all__ = ["Batches", "SampledBatches", "TopEigenvalues", "TraceEstimate", "data_eval_fn", "hessian_trace", "instability",
           "interpolate_states", "interpolation_barrier", "l2_distance", "layer_densities", "level_hessians",
           "load_run", "mask_overlap", "successive_barriers", "top_hessian_eigenvalues"]
