"""Every benchmark case, and selection by op name or short alias."""
from __future__ import annotations

from benchmarks.case import Case
from benchmarks.cases import apply_masks, particles, prune, sgd

CASES: tuple[Case, ...] = (*prune.CASES, *particles.CASES, *sgd.CASES, *apply_masks.CASES)

OP_ALIASES = {
    "prune": "global_magnitude_prune",
    "swa": "swa_update_",
    "average": "particle_average",
    "sgd": "masked_sgd_step_",
    "masks": "apply_masks_",
}


def select(ops: list[str] | None = None, *, quick: bool = False) -> list[Case]:
    """The cases of ``ops`` (op names or aliases; all when None), without large ones if ``quick``."""
    known = dict.fromkeys(c.op for c in CASES)
    wanted = set(known) if ops is None else {OP_ALIASES.get(o, o) for o in ops}
    unknown = wanted - set(known)
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; choose from {', '.join(known)} "
                         f"or aliases {', '.join(OP_ALIASES)}")
    return [c for c in CASES if c.op in wanted and not (quick and c.large)]
