"""``masked_sgd_step_`` cases (issue 4): one SGD step (momentum 0.9, weight decay 1e-4) on
P particles of a whole model, conv/fc weights masked at 80% sparsity.

Baselines are what torch users write: ``torch.optim.SGD`` (``foreach=True`` or ``fused=True``)
then ``torch._foreach_mul_(params, masks)`` with masks stored in the parameter dtype and
shape (as ``torch.nn.utils.prune`` stores them), so the multiply takes the fused fast path.
Each baseline steps its own copy of the parameters; momentum buffers are warm (not None).
"""
from __future__ import annotations

import torch

from benchmarks import inputs, shapes
from benchmarks.case import Case

HYPER = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}


def torch_sgd_then_mask(x: dict, **flags):
    """Baseline factory: ``torch.optim.SGD(**flags).step()`` then ``_foreach_mul_`` by the masks."""
    params = [p.clone().requires_grad_() for p in x["params"]]
    for p, g in zip(params, x["grads"]):
        p.grad = g
    optimizer = torch.optim.SGD(params, **HYPER, **flags)
    masked = [p for p, m in zip(params, x["masks"]) if m is not None]
    masks = [m.to(p.dtype).expand_as(p).contiguous() for p, m in zip(params, x["masks"]) if m is not None]

    def step():
        optimizer.step()
        with torch.no_grad():
            torch._foreach_mul_(masked, masks)
    return step


def _setup(shape_list, particles: int):
    def setup(device: torch.device, smoke: bool) -> dict:
        shps = shapes.shrink(shape_list()) if smoke else shape_list()
        gen = inputs.generator(device)
        x = inputs.particle_model(shps, particles, device, gen)
        x["masks"] = [m if len(s) > 1 else None for m, s in zip(x["masks"], shps)]
        x["grads"] = inputs.weights(shps, torch.float32, device, gen, particles=particles)
        x["momentum_buffers"] = inputs.weights(shps, torch.float32, device, gen, particles=particles)
        return x
    return setup


def _bytes(x) -> int:
    """Read params, grads, buffers and masks; write params and buffers."""
    return inputs.nbytes(x["params"], x["grads"], x["momentum_buffers"], x["masks"],
                         x["params"], x["momentum_buffers"])


CASES = tuple(
    Case(op="masked_sgd_step_", name=f"{prefix}_P{p}", setup=_setup(shape_list, p),
         args=("params", "grads", "momentum_buffers", "masks"), kwargs=HYPER, bytes_moved=_bytes,
         baselines={"SGD_foreach": lambda x: torch_sgd_then_mask(x, foreach=True),
                    "SGD_fused": lambda x: torch_sgd_then_mask(x, fused=True)},
         large=large)
    for prefix, shape_list, p, large in shapes.PARTICLE_MODELS
)
