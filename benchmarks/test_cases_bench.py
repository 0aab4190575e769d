"""pytest-benchmark view of the benchmark cases, on a GPU only:

    pytest benchmarks -m gpu --benchmark-only

It times the same calls as ``python -m benchmarks.run`` (the cases and workloads of
benchmarks/cases), grouped per case so pytest-benchmark compares each swamp backend or
variant with the baselines (a workload's time here is per call, not per step). The
numbers recorded in benchmarks/results come from ``benchmarks.run``, not from this suite.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.cases import CASES, WORKLOADS
from benchmarks.run import GPU_BACKENDS
from swamp_kernels import BackendError
from swamp_kernels._dispatch import implementation

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _bench(benchmark, case, call, extra_info) -> None:
    def synced():
        call()
        torch.cuda.synchronize()
    benchmark.group = f"{case.op}[{case.name}]"
    benchmark.extra_info.update(extra_info)
    benchmark(synced)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}[{c.name}]")
def test_swamp(benchmark, case, backend):
    device = torch.device("cuda")
    try:
        implementation(case.op, backend, device)
    except BackendError as err:
        pytest.skip(str(err))
    inputs = case.setup(device, False)
    _bench(benchmark, case, case.swamp(inputs, backend), {"bytes": case.bytes_moved(inputs)})


@pytest.mark.parametrize(("case", "baseline"), [(c, b) for c in CASES for b in c.baseline_names],
                         ids=lambda v: v if isinstance(v, str) else f"{v.op}[{v.name}]")
def test_baseline(benchmark, case, baseline):
    inputs = case.setup(torch.device("cuda"), False)
    _bench(benchmark, case, case.baseline(baseline, inputs), {"bytes": case.bytes_moved(inputs)})


@pytest.mark.parametrize(("work", "name"), [(w, n) for w in WORKLOADS for n in (*w.variants, *w.baselines)],
                         ids=lambda v: v if isinstance(v, str) else f"{v.op}[{v.name}]")
def test_workload(benchmark, work, name):
    device = torch.device("cuda")
    if not work.runs_on(name, device):
        pytest.skip(f"{name} does not run on {device}")
    inputs = work.setup(device, False)
    factory = work.variants[name] if name in work.variants else work.baselines[name]
    _bench(benchmark, work, factory(inputs), {"steps_per_call": work.steps(inputs)})
