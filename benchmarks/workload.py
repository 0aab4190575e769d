"""A workload: a layer or training benchmark whose variants are timed in one process.

Op cases (``benchmarks/case.py``) time one ``swamp_kernels`` op against its bandwidth floor.
A workload times whole steps (a layer's forward + backward, a training step) of several
implementations of the same computation, has no floor (``floor_ms`` null), and derives its
headline numbers (ratios, images/s, bytes per weight) into ``extra``. Both go through the
same ``benchmarks.run`` loop and the same results schema.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

import swamp_kernels
from benchmarks import timing
from swamp_kernels import BackendError
from swamp.train import cudnn_autotuned
from swamp_kernels._dispatch import implementation

Inputs = dict
Call = Callable[[], object]
Factory = Callable[[Inputs], Call]


def _no_extra(inputs: Inputs, row: str, step_ms: Mapping[str, float]) -> dict:
    return {}


@dataclass(frozen=True)
class Workload:
    """Workload ``name`` of benchmark ``op`` on the inputs ``setup(device, smoke)`` builds.

    ``variants`` maps a result row's ``backend`` to a factory ``inputs -> call``: swamp's
    implementations, one row each; a key that is a ``swamp_kernels`` backend runs only where
    ``op`` is implemented on it (others are skipped with a note). ``baselines`` are timed once
    and shared by the rows. One call runs ``steps(inputs)`` steps; times are per step.
    ``extra(inputs, row, step_ms)`` gives the row's ``extra`` from the per-step times of every
    variant and baseline that ran. ``compiled`` variants or baselines (torch.compile) run only
    on CUDA and when asked for (``--compile``: minutes of compilation each). ``large``
    workloads are skipped by ``--quick``.
    """
    op: str
    name: str
    setup: Callable[[torch.device, bool], Inputs]
    variants: Mapping[str, Factory]
    baselines: Mapping[str, Factory] = field(default_factory=dict)
    steps: Callable[[Inputs], int] = lambda inputs: 1
    extra: Callable[[Inputs, str, Mapping[str, float]], dict] = _no_extra
    compiled: frozenset[str] = frozenset()
    large: bool = False

    def runs_on(self, name: str, device: torch.device, compile: bool = True) -> bool:
        """Whether variant or baseline ``name`` can run on ``device`` (prints why not); with
        ``compile`` False the compiled ones are left out."""
        if name in self.compiled and device.type != "cuda":
            print(f"  skip {name}: needs CUDA")
            return False
        if name in self.compiled and not compile:
            print(f"  skip {name}: torch.compile variants run with --compile")
            return False
        if name in swamp_kernels.BACKENDS:
            try:
                implementation(self.op, name, device)
            except BackendError as err:
                print(f"  skip {name}: {err}")
                return False
        return True


def _time_step_ms(factory: Factory, x: Inputs, steps: int, device: torch.device,
                  timing_args: dict) -> tuple[float, int | None]:
    """Per-step milliseconds of ``factory(x)``'s call and, on CUDA, its peak allocated bytes.

    On CUDA one untimed call comes first, so that compilation (``torch.compile``, Triton
    autotuning, the cuDNN algorithm search) does not use up the warm-up runs of ``time_ms``.
    """
    call = factory(x)
    if device.type == "cuda":
        call()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ms = timing.time_ms(call, device, **timing_args) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del call
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ms, peak


def measure(work: Workload, device: torch.device, timing_args: dict, smoke: bool,
            compile: bool = False) -> tuple[list[dict], dict[str, str]]:
    """(one result per runnable variant of ``work``, {failed variant: error}); the baselines
    are timed once and shared (``compile``: the compiled ones too).

    A baseline that fails is left out with its error in ``extra.baseline_errors``; a failing
    variant is left out and reported. On CUDA ``extra.peak_memory_bytes`` holds each variant's
    and baseline's peak allocated memory while it ran (inputs of the whole workload included).
    """
    rows_to_run = [n for n in work.variants if work.runs_on(n, device, compile)]
    if not rows_to_run:
        return [], {}
    step_ms, peaks, errors, failed = {}, {}, {}, {}
    with cudnn_autotuned(device):
        x = work.setup(device, smoke)
        steps = work.steps(x)
        for name, factory in [*work.baselines.items(), *((n, work.variants[n]) for n in rows_to_run)]:
            if name in work.baselines and not work.runs_on(name, device, compile):
                continue
            try:
                step_ms[name], peaks[name] = _time_step_ms(factory, x, steps, device, timing_args)
            except Exception as err:  # noqa: BLE001 -- reported, not fatal to the other runs
                (errors if name in work.baselines else failed)[name] = f"{type(err).__name__}: {err}"
            print(f"  {name:20s} " + (f"{step_ms[name]:10.3f} ms/step" if name in step_ms
                                      else f"FAILED: {errors.get(name) or failed[name]}"))
    baselines = {n: ms for n, ms in step_ms.items() if n in work.baselines}
    rows = []
    for name in rows_to_run:
        if name in failed:
            continue
        extra = work.extra(x, name, step_ms)
        if device.type == "cuda":
            extra["peak_memory_bytes"] = peaks
        if errors:
            extra["baseline_errors"] = errors
        rows.append({"op": work.op, "case": work.name, "backend": name, "time_ms": step_ms[name],
                     "floor_ms": None, "baselines": baselines, "extra": extra})
    return rows, failed
