"""Seeded benchmark inputs: weights at realistic per-layer scales, masks, particle stacks.

Values are never all zeros: weights are normal with std 1/sqrt(fan_in), as after
Kaiming-style initialisation, so the global magnitude order mixes layers.
"""
from __future__ import annotations

import math

import torch

from benchmarks.shapes import Shape


def generator(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def weights(shapes: list[Shape], dtype: torch.dtype, device: torch.device, gen: torch.Generator,
            particles: int | None = None) -> list[torch.Tensor]:
    """One tensor per shape (``[particles, *shape]`` when ``particles`` is given)."""
    out = []
    for shape in shapes:
        lead = (particles,) if particles is not None else ()
        w = torch.randn(lead + tuple(shape), generator=gen, device=device)
        out.append(w.mul_(1 / math.sqrt(math.prod(shape[1:]))).to(dtype))
    return out


def masks(shapes: list[Shape], density: float, device: torch.device, gen: torch.Generator,
          *, prunable_only: bool = False) -> list[torch.Tensor]:
    """Bool masks keeping a random ``density`` fraction; with ``prunable_only``, 1-D shapes
    (BatchNorm, biases: never pruned) keep everything."""
    def one(shape):
        if density >= 1 or (prunable_only and len(shape) < 2):
            return torch.ones(shape, dtype=torch.bool, device=device)
        return torch.rand(shape, generator=gen, device=device) < density
    return [one(s) for s in shapes]


def nbytes(*tensor_lists) -> int:
    """Bytes held by the tensors of all lists (None entries count 0)."""
    return sum(t.numel() * t.element_size() for ts in tensor_lists for t in ts if t is not None)


def particle_model(shapes: list[Shape], particles: int, device: torch.device,
                   gen: torch.Generator) -> dict:
    """float32 ``params`` of shape ``[particles, *shape]`` and ``masks`` keeping 20% of every
    conv/fc weight (all True for 1-D parameters), as in a SWAMP run at 80% sparsity."""
    return {"params": weights(shapes, torch.float32, device, gen, particles=particles),
            "masks": masks(shapes, 0.2, device, gen, prunable_only=True)}
