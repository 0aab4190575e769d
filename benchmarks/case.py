"""A benchmark case: one op on one set of shapes, with the baselines it is compared against.

A case is data plus factories, so that ``benchmarks/run.py`` and the pytest-benchmark
suite time exactly the same calls. Factories build inputs lazily: listing cases is free.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

import swamp_kernels

Inputs = dict
Call = Callable[[], object]
SWAMP_TORCH = "swamp_torch"  # the baseline every case has: the op on the torch reference backend


@dataclass(frozen=True)
class Case:
    """``op`` (a public swamp_kernels op) on the inputs ``setup(device, smoke)`` builds.

    The op is called as ``op(*(inputs[a] for a in args), **kwargs, backend=...)``.
    ``baselines`` maps a name to a factory ``inputs -> call``; a factory may copy inputs it
    would otherwise change. ``bytes_moved(inputs)`` is the floor's byte count: each input
    read once, each output written once. ``large`` cases are skipped by ``--quick``.
    """
    op: str
    name: str
    setup: Callable[[torch.device, bool], Inputs]
    args: tuple[str, ...]
    bytes_moved: Callable[[Inputs], int]
    baselines: Mapping[str, Callable[[Inputs], Call]] = field(default_factory=dict)
    kwargs: Mapping[str, object] = field(default_factory=dict)
    large: bool = False

    @property
    def baseline_names(self) -> tuple[str, ...]:
        return (SWAMP_TORCH, *self.baselines)

    def swamp(self, inputs: Inputs, backend: str) -> Call:
        """The timed call of the swamp op on ``backend``."""
        return functools.partial(getattr(swamp_kernels, self.op), *(inputs[a] for a in self.args),
                                 **self.kwargs, backend=backend)

    def baseline(self, name: str, inputs: Inputs) -> Call:
        """The timed call of baseline ``name``."""
        return self.swamp(inputs, "torch") if name == SWAMP_TORCH else self.baselines[name](inputs)


def calling(fn: Callable, *args: str, **kwargs) -> Callable[[Inputs], Call]:
    """Baseline factory: ``fn(*(inputs[a] for a in args), **kwargs)``."""
    return lambda inputs: functools.partial(fn, *(inputs[a] for a in args), **kwargs)
