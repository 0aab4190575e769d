"""Every benchmark: op cases and workloads, and selection by op name or short alias."""
from __future__ import annotations

from typing import Union

from benchmarks.case import Case
from benchmarks.cases import apply_masks, layers, particles, prune, sgd, train_particles, train_resnet50
from benchmarks.workload import Workload

CASES: tuple[Case, ...] = (*prune.CASES, *particles.CASES, *sgd.CASES, *apply_masks.CASES)
WORKLOADS: tuple[Workload, ...] = (*layers.CASES, *train_particles.CASES, *train_resnet50.CASES)
Benchmark = Union[Case, Workload]

OP_ALIASES = {
    "prune": "global_magnitude_prune",
    "swa": "swa_update_",
    "average": "particle_average",
    "sgd": "masked_sgd_step_",
    "masks": "apply_masks_",
    "conv": "masked_conv2d",
    "linear": "masked_linear",
    "particles": "particles_train_step",
    "resnet50": "resnet50_train_step",
}


def select(ops: list[str] | None = None, *, quick: bool = False) -> list[Benchmark]:
    """The cases and workloads of ``ops`` (op names or aliases; all when None) in the order
    ``ops`` names them (the most needed first, should a run be cut short), without large ones
    if ``quick``."""
    everything = (*CASES, *WORKLOADS)
    known = list(dict.fromkeys(c.op for c in everything))
    wanted = known if ops is None else list(dict.fromkeys(OP_ALIASES.get(o, o) for o in ops))
    unknown = set(wanted) - set(known)
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; choose from {', '.join(known)} "
                         f"or aliases {', '.join(OP_ALIASES)}")
    return [c for op in wanted for c in everything if c.op == op and not (quick and c.large)]
