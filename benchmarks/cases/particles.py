"""``swa_update_`` and ``particle_average`` cases (issue 4): P particles of a whole model.

The ``AveragedModel`` baseline is how torch users keep an SWA average: one
``update_parameters`` call per particle (the particles' parameters are views of the stacked
``[P, *shape]`` tensors; no masking). ``mean_mul_mask`` is the per-tensor torch loop.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from benchmarks import inputs, shapes
from benchmarks.case import Case, calling

N_AVERAGED = 5


class _Particle(nn.Module):
    """One particle's parameters, as views of the stacked tensors."""

    def __init__(self, tensors):
        super().__init__()
        self.params = nn.ParameterList(nn.Parameter(t, requires_grad=False) for t in tensors)


def averaged_model_updates(x: dict):
    """Baseline factory: ``AveragedModel.update_parameters`` once per particle."""
    particles = [_Particle([p[i] for p in x["params"]]) for i in range(x["params"][0].shape[0])]
    average = AveragedModel(particles[0], device=x["params"][0].device)

    def update():
        for particle in particles:
            average.update_parameters(particle)
    return update


def mean_mul_mask(params, masks):
    return [p.mean(0).mul_(m) for p, m in zip(params, masks)]


def _setup(shape_list, particles: int, with_swa: bool):
    def setup(device: torch.device, smoke: bool) -> dict:
        shps = shapes.shrink(shape_list()) if smoke else shape_list()
        gen = inputs.generator(device)
        x = inputs.particle_model(shps, particles, device, gen)
        if with_swa:
            x["swa"] = inputs.weights(shps, torch.float32, device, gen)
            x["n_averaged"] = N_AVERAGED
        return x
    return setup


def _swa_bytes(x) -> int:
    """Read params, masks and the average, write the average."""
    return inputs.nbytes(x["params"], x["masks"], x["swa"], x["swa"])


def _average_bytes(x) -> int:
    """Read params and masks, write the average (one particle's size)."""
    return inputs.nbytes(x["params"], x["masks"]) + inputs.nbytes(x["params"]) // x["params"][0].shape[0]


CASES = tuple(
    case
    for prefix, shape_list, p, large in shapes.PARTICLE_MODELS
    for case in (
        Case(op="swa_update_", name=f"{prefix}_P{p}", setup=_setup(shape_list, p, with_swa=True),
             args=("swa", "params", "n_averaged", "masks"), bytes_moved=_swa_bytes,
             baselines={"AveragedModel": averaged_model_updates}, large=large),
        Case(op="particle_average", name=f"{prefix}_P{p}", setup=_setup(shape_list, p, with_swa=False),
             args=("params", "masks"), bytes_moved=_average_bytes,
             baselines={"mean_mul_mask": calling(mean_mul_mask, "params", "masks")}, large=large),
    )
)
