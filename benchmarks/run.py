"""Measure the benchmark cases on this GPU and record them: ``python -m benchmarks.run``.

    python -m benchmarks.run [--ops prune,swa,sgd,...] [--backends triton,cuda] [--quick] [--out DIR]
    python -m benchmarks.run --smoke --out DIR     # tiny sizes on the CPU: checks the harness only

Each op case is timed on every requested swamp backend that implements its op (others are
skipped with a note) and against its baselines, in the same process. Workloads (layer and
training benchmarks, benchmarks/workload.py) time all their variants; ``--backends`` does not
apply to them. Results are merged into ``<out>/<gpu-slug>.json`` and ``.md`` after every case
(default out: benchmarks/results).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks import cases, results, timing, workload
from benchmarks.case import Case
from benchmarks.workload import Workload
from swamp_kernels import BackendError
from swamp_kernels._dispatch import implementation

GPU_BACKENDS = ("triton", "cuda")
GPU_TIMING = {"budget_ms": 1000.0, "warmup": 3, "min_runs": 3, "max_runs": 200}
QUICK_TIMING = {"budget_ms": 200.0, "warmup": 2, "min_runs": 3, "max_runs": 50}
SMOKE_TIMING = {"budget_ms": 0.0, "warmup": 1, "min_runs": 1, "max_runs": 1}
SMOKE_COPY_BYTES = 8 * 2**20


def _runnable(op: str, backends: list[str], device: torch.device) -> list[str]:
    out = []
    for backend in backends:
        try:
            implementation(op, backend, device)
        except BackendError as err:
            print(f"  skip {backend}: {err}")
        else:
            out.append(backend)
    return out


def _baseline_times(case: Case, x: dict, device: torch.device, timing_args: dict):
    """Times of the case's baselines; a baseline that fails (out of memory, unsupported dtype)
    is recorded with its error instead of stopping the run."""
    times, errors = {}, {}
    for name in case.baseline_names:
        try:
            times[name] = timing.time_ms(case.baseline(name, x), device, **timing_args)
        except Exception as err:  # noqa: BLE001 -- any baseline failure is reported, not fatal
            errors[name] = f"{type(err).__name__}: {err}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  {name:16s} " + (f"{times[name]:10.3f} ms" if name in times else errors[name]))
    return times, errors


def measure(case: Case, backends: list[str], device: torch.device, bandwidth_gbs: float,
            timing_args: dict, smoke: bool) -> tuple[list[dict], dict[str, str]]:
    """(one result per backend for ``case``, {failed backend: error}); the baselines are timed
    once and shared. A failing backend leaves the others' results standing."""
    x = case.setup(device, smoke)
    nbytes = case.bytes_moved(x)
    floor = timing.floor_ms(nbytes, bandwidth_gbs)
    baselines, errors = _baseline_times(case, x, device, timing_args)
    rows, failed = [], {}
    for backend in backends:
        try:
            call = case.swamp(x, backend)
            ms = timing.time_ms(call, device, **timing_args)
        except Exception as err:  # noqa: BLE001 -- reported with the other failures of the run
            failed[backend] = f"{type(err).__name__}: {err}"
            print(f"  {backend:16s} FAILED: {failed[backend]}")
            continue
        extra = {"bytes": nbytes, "achieved_gbs": nbytes / (ms * 1e6),
                 "pct_of_copy_bandwidth": 100 * floor / ms,
                 "host_ms": timing.host_ms(call, device, runs=1 if smoke else 21)}
        if errors:
            extra["baseline_errors"] = errors
        rows.append({"op": case.op, "case": case.name, "backend": backend, "time_ms": ms,
                     "floor_ms": floor, "baselines": baselines, "extra": extra})
        print(f"  {backend:16s} {ms:10.3f} ms  {ms / floor:6.2f}x floor")
    return rows, failed


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--ops", help="comma-separated ops or aliases "
                        f"({', '.join(cases.OP_ALIASES)}); default: all")
    parser.add_argument("--backends", help="comma-separated swamp backends to time in op cases "
                        f"(default: {','.join(GPU_BACKENDS)}; torch with --smoke)")
    parser.add_argument("--quick", action="store_true", help="fewer runs, no large cases")
    parser.add_argument("--compile", action="store_true",
                        help="also time the torch.compile variants of the training workloads (minutes each)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default: {results.RESULTS_DIR})")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes on the CPU to test the harness; needs --out, never "
                        "writes benchmarks/results")
    return parser.parse_args(argv)


def _split(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        selected = cases.select(_split(args.ops), quick=args.quick)
    except ValueError as err:
        sys.exit(str(err))
    if args.smoke:
        if args.out is None or args.out.resolve() == results.RESULTS_DIR.resolve():
            sys.exit("--smoke needs --out DIR outside benchmarks/results (smoke numbers are not results)")
        device, gpu, timing_args = torch.device("cpu"), results.SMOKE_GPU, SMOKE_TIMING
        bandwidth = timing.copy_bandwidth_gbs(device, SMOKE_COPY_BYTES, **timing_args)
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks.run needs a CUDA GPU and torch.cuda.is_available() is False here. "
                     "Run `make bench` on a GPU machine, or `python -m benchmarks.run --smoke "
                     "--out DIR` to check the harness on the CPU.")
        device = torch.device("cuda", torch.cuda.current_device())
        gpu, timing_args = torch.cuda.get_device_name(device), QUICK_TIMING if args.quick else GPU_TIMING
        bandwidth = timing.copy_bandwidth_gbs(device, **timing_args)
    backends = _split(args.backends) or (["torch"] if args.smoke else list(GPU_BACKENDS))
    out = args.out or results.RESULTS_DIR
    print(f"{gpu}: copy bandwidth {bandwidth:.0f} GB/s; {len(selected)} cases -> {out}")
    header = results.new_document(gpu, bandwidth)
    failures = []
    for case in selected:
        print(f"{case.op} {case.name}")
        try:
            if isinstance(case, Workload):
                rows, failed = workload.measure(case, device, timing_args, args.smoke, compile=args.compile)
            else:
                runnable = _runnable(case.op, backends, device)
                rows, failed = (measure(case, runnable, device, bandwidth, timing_args, args.smoke)
                                if runnable else ([], {}))
        except Exception as err:  # noqa: BLE001 -- a failing set-up must not lose the other cases
            rows, failed = [], {"set-up": f"{type(err).__name__}: {err}"}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        failures += [f"{case.op} {case.name} {name}: {error}" for name, error in failed.items()]
        if rows:
            results.save({**header, "results": rows}, out)
    if failures:
        print("failed cases:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
