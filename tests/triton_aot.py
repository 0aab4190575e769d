"""Ahead-of-time compile checks of Triton kernels for the H100 (sm_90), with no GPU.

Two halves, one per process:

- :class:`LaunchRecorder` (in a process with ``TRITON_INTERPRET=1``) records every
  kernel launch as a *specialisation*: the kernel's import path, each argument by parameter
  name, and the launch options ``num_warps``/``num_stages`` when given. Constexpr arguments
  keep their value (``tl.dtype`` values as ``{"tl_dtype": name}``); the other arguments keep
  only what Triton specialises on: a tensor its dtype and 16-byte alignment, an int a
  representative of its class (1; i32 or i64; divisible by 16 or not), a float ``1.0``,
  a bool ``False``. Specialisations are deduplicated and JSON-serialisable.
- :func:`main` (``python -m tests.triton_aot SPECS.json`` from the repo root, WITHOUT
  ``TRITON_INTERPRET``) compiles each specialisation for ``GPUTarget("cuda", 90, 32)``,
  specialising the arguments as the runtime launcher does, and checks that it compiles and
  fits sm_90's 227 KiB of shared memory. An autotuned kernel is compiled once per config its
  autotuner would time (the GPU configs of a non-interpreted process, after its
  ``early_config_prune``); configs over the limit are
  reported (the autotuner skips them; their compile stops before PTX), and a specialisation
  fails only when no config fits. Registers and spill bytes come from the log of the
  ``ptxas -v`` that Triton runs (its bundled ptxas). Every kernel is compiled afresh
  (``always_compile``). Prints a table; exits 1 naming each failing kernel and specialisation.
  With ``--ir DIR`` it also writes each compiled job's TritonGPU IR and PTX to ``DIR/<n>.ttgir``
  and ``DIR/<n>.ptx``, and ``DIR/index.json``, a list of ``{"kernel", "args", "options",
  "registers", "spill_bytes", "ttgir", "ptx"}`` (the last two: file names), for tests of what the
  compiler made of a kernel.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

SM90_MAX_SHARED = 232448   # bytes of shared memory per block on sm_90 (227 KiB, opt-in)
TARGET = ("cuda", 90, 32)  # GPUTarget of the H100
WORKERS = 2
_OPTIONS = ("num_warps", "num_stages")
IR_KINDS = ("ttgir", "ptx")   # written by --ir

# ------------------------------------------------------------------- recording


def _is_constexpr_annotation(annotation) -> bool:
    import triton.language as tl
    if isinstance(annotation, str):  # ``from __future__ import annotations``
        return annotation.split(".")[-1] == "constexpr"
    return annotation is tl.constexpr


def _int_representative(value: int) -> int:
    """An int that Triton's launcher specialises like ``value``: 1, or i32/i64 x divisible by 16."""
    if value == 1:
        return 1
    if -2**31 <= value < 2**31:
        return 16 if value % 16 == 0 else 3
    if -2**63 <= value < 2**63:
        return 2**32 if value % 16 == 0 else 2**32 + 1
    return value


def _encode(value, constexpr: bool):
    """JSON form of one launch argument (see the module docstring)."""
    import torch
    import triton.language as tl
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if constexpr or value is None:
        if not isinstance(value, (bool, int, float, str)) and value is not None:
            raise TypeError(f"cannot record constexpr argument {value!r} of type {type(value).__name__}")
        return value
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return _int_representative(value)
    if isinstance(value, float):
        return 1.0
    raise TypeError(f"cannot record argument {value!r} of type {type(value).__name__}")


def _decode(value):
    """The argument :func:`_encode` stands for: a tensor of that dtype and alignment, a tl.dtype, a scalar."""
    import torch
    import triton.language as tl
    if isinstance(value, dict) and "tensor" in value:
        tensor = torch.empty(64, dtype=getattr(torch, value["tensor"]))
        return tensor if value["aligned"] else tensor[1:]
    if isinstance(value, dict):
        return tl.dtype(value["tl_dtype"])
    return value


class LaunchRecorder(contextlib.AbstractContextManager):
    """Records the interpreted kernel launches made inside the ``with`` block.

    ``specs`` is the sorted, deduplicated list of ``{"kernel", "args", "options"}`` dicts.
    """

    def __init__(self):
        self._seen: set[str] = set()

    @property
    def specs(self) -> list[dict]:
        return [json.loads(s) for s in sorted(self._seen)]

    @property
    def kernels(self) -> set[str]:
        return {spec["kernel"] for spec in self.specs}

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        self._original = InterpretedFunction.run
        recorder = self

        def run(interpreted, *args, grid, warmup, **kwargs):
            recorder._record(interpreted.fn, args, kwargs)
            return recorder._original(interpreted, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpretedFunction
        InterpretedFunction.run = self._original
        return None

    def _record(self, fn, args, kwargs) -> None:
        params = inspect.signature(fn).parameters
        bound = dict(zip(params, args)) | {k: v for k, v in kwargs.items() if k in params}
        encoded = {name: _encode(value, _is_constexpr_annotation(params[name].annotation))
                   for name, value in bound.items()}
        options = {k: kwargs[k] for k in _OPTIONS if kwargs.get(k) is not None}
        spec = {"kernel": f"{fn.__module__}.{fn.__name__}", "args": encoded, "options": options}
        self._seen.add(json.dumps(spec, sort_keys=True))


def with_constexprs(specs: list[dict], variants: dict[str, Callable[[dict], dict[str, list]]]) -> list[dict]:
    """Specs with constexprs replaced by each combination of ``variants[kernel](args)``, a dict
    of name -> values (for constexprs that a GPU launch sets differently than the interpreter);
    deduplicated, sorted."""
    out = set()
    for spec in specs:
        choices = variants[spec["kernel"]](spec["args"]) if spec["kernel"] in variants else {}
        missing = set(choices) - set(spec["args"])
        if missing:
            raise KeyError(f"{spec['kernel']} has no argument(s) {sorted(missing)}")
        for values in itertools.product(*choices.values()):
            out.add(json.dumps(spec | {"args": spec["args"] | dict(zip(choices, values))}, sort_keys=True))
    return [json.loads(s) for s in sorted(out)]


# ------------------------------------------------------------------- compiling


@dataclass(frozen=True)
class Job:
    """One compile: a spec with the launch options (and autotune config) to use."""
    spec_index: int
    kernel: str
    args: dict
    options: dict
    autotuned: bool


@dataclass(frozen=True)
class Result:
    job: Job
    shared: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    seconds: float = 0.0
    error: str | None = None
    ir: dict[str, str] | None = None   # {"ttgir": text, "ptx": text}


def _import_kernel(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _configs_timed(autotuner, args: dict) -> list:
    """The GPU configs ``autotuner`` would time for a call with ``args``: all of them, or those
    its ``early_config_prune`` keeps."""
    if autotuner.early_config_prune is None:
        return autotuner.configs
    values = {name: _decode(value) for name, value in args.items()}
    return autotuner.early_config_prune(autotuner.configs, values, **values)


def _jobs(specs: list[dict]) -> list[Job]:
    from triton.runtime.autotuner import Autotuner
    jobs = []
    for index, spec in enumerate(specs):
        kernel = _import_kernel(spec["kernel"])
        if not isinstance(kernel, Autotuner):
            jobs.append(Job(index, spec["kernel"], spec["args"], spec["options"], False))
            continue
        for config in _configs_timed(kernel, spec["args"]):  # replace the interpreter's config values
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            jobs.append(Job(index, spec["kernel"], spec["args"] | config.kwargs, options, True))
    return jobs


class SharedMemoryOverLimit(Exception):
    """Ends the compile of a kernel that cannot launch on sm_90 (see :func:`_stop_over_limit`)."""

    def __init__(self, shared: int):
        super().__init__(f"{shared} bytes of shared memory")
        self.shared = shared


def _stop_over_limit() -> None:
    """Make the CUDA backend raise :class:`SharedMemoryOverLimit` once the shared memory is known
    (after LLVM IR), skipping PTX codegen and ptxas (the costly steps) for kernels that cannot
    launch on sm_90; the autotuner skips such configs."""
    from triton.backends.nvidia.compiler import CUDABackend
    make_ptx = CUDABackend.make_ptx

    def make_ptx_within_limit(self, src, metadata, *rest):
        if metadata["shared"] > SM90_MAX_SHARED:
            raise SharedMemoryOverLimit(metadata["shared"])
        return make_ptx(self, src, metadata, *rest)

    CUDABackend.make_ptx = make_ptx_within_limit


def _ptxas_usage(log: str) -> tuple[int, int]:
    """(registers, spill store + load bytes) from the log of Triton's ``ptxas -v`` run."""
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return registers, int(spills.group(1)) + int(spills.group(2))


def _compile(job: Job) -> Result:
    """Compile ``job`` as the runtime launcher would (its binder and argument packing)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import create_function_from_signature
    start = time.perf_counter()
    try:
        kernel = _import_kernel(job.kernel)
        jit = kernel.fn if isinstance(kernel, Autotuner) else kernel
        backend = triton.compiler.make_backend(GPUTarget(*TARGET))
        kwargs = {name: _decode(value) for name, value in job.args.items()} | job.options
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        bound, specialization, options = binder(**kwargs)
        options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
        ptxas_log = io.StringIO()
        with contextlib.redirect_stdout(ptxas_log):  # knobs.nvidia.dump_ptxas_log prints it
            compiled = triton.compile(triton.compiler.ASTSource(jit, signature, constexprs, attrs),
                                      target=GPUTarget(*TARGET), options=options.__dict__)
        registers, spill_bytes = _ptxas_usage(ptxas_log.getvalue())
        return Result(job, compiled.metadata.shared, registers, spill_bytes, time.perf_counter() - start,
                      ir={kind: compiled.asm[kind] for kind in IR_KINDS})
    except SharedMemoryOverLimit as over:
        return Result(job, over.shared, seconds=time.perf_counter() - start)
    except Exception as error:  # reported per job; the table names the kernel and its spec
        return Result(job, error=f"{type(error).__name__}: {error}".strip()[:2000],
                      seconds=time.perf_counter() - start)


def _summary(args: dict) -> str:
    """Compact form of a spec's arguments: pointer dtypes, then constexpr-like values."""
    pointers = sorted({v["tensor"] for v in args.values() if isinstance(v, dict) and "tensor" in v})
    values = [f"{k}={v['tl_dtype'] if isinstance(v, dict) else v}" for k, v in args.items()
              if not (isinstance(v, dict) and "tensor" in v)]
    return f"ptr[{','.join(pointers)}] " + " ".join(values)


def _failures(specs: list[dict], results: list[Result]) -> list[str]:
    failures = []
    for index, spec in enumerate(specs):
        mine = [r for r in results if r.job.spec_index == index]
        for r in mine:
            if r.error:
                failures.append(f"{spec['kernel']} [{_summary(r.job.args)}] {r.job.options}: "
                                f"does not compile for sm_90: {r.error}")
        fits = [r for r in mine if r.error is None and r.shared <= SM90_MAX_SHARED]
        if not fits and not any(r.error for r in mine):
            over = min(r.shared for r in mine)
            failures.append(f"{spec['kernel']} [{_summary(spec['args'])}]: needs {over} bytes of shared "
                            f"memory{' in every autotune config' if mine[0].job.autotuned else ''}; "
                            f"sm_90 has {SM90_MAX_SHARED}")
    return failures


def _table(results: list[Result]) -> str:
    rows = [("kernel", "w/s", "shared", "regs", "spill", "sec", "specialisation")]
    for r in results:
        over = " (over limit)" if r.shared is not None and r.shared > SM90_MAX_SHARED else ""
        rows.append((r.job.kernel.rsplit(".", 1)[1],
                     f"{r.job.options.get('num_warps', '-')}/{r.job.options.get('num_stages', '-')}",
                     "ERROR" if r.error else f"{r.shared}{over}",
                     "-" if r.registers is None else str(r.registers),
                     "-" if r.spill_bytes is None else str(r.spill_bytes),
                     f"{r.seconds:.1f}", _summary(r.job.args)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
                     for row in rows)


def _write_ir(results: list[Result], directory: str) -> None:
    """Each compiled job's TritonGPU IR and PTX, and the ``index.json`` naming them (module docstring)."""
    os.makedirs(directory, exist_ok=True)
    index = []
    for number, r in enumerate(results):
        if r.ir is None:
            continue
        entry = {"kernel": r.job.kernel, "args": r.job.args, "options": r.job.options,
                 "registers": r.registers, "spill_bytes": r.spill_bytes}
        for kind, text in r.ir.items():
            entry[kind] = f"{number}.{kind}"
            with open(os.path.join(directory, entry[kind]), "w") as f:
                f.write(text)
        index.append(entry)
    with open(os.path.join(directory, "index.json"), "w") as f:
        json.dump(index, f)


def main(argv: list[str] | None = None) -> int:
    import argparse

    import triton
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter never compiles")
    triton.knobs.compilation.always_compile = True  # a cached kernel never hides a failure
    triton.knobs.nvidia.dump_ptxas_log = True       # registers and spills, read by _ptxas_usage
    parser = argparse.ArgumentParser(prog="python -m tests.triton_aot")
    parser.add_argument("specs", help="JSON list of specialisations (LaunchRecorder.specs)")
    parser.add_argument("--ir", metavar="DIR", help="write each compiled job's TritonGPU IR and PTX here")
    arguments = parser.parse_args(argv)
    with open(arguments.specs) as f:
        specs = json.load(f)
    print(f"triton {triton.__version__} from {os.path.dirname(triton.__file__)}")
    _stop_over_limit()
    jobs = _jobs(specs)
    longest_first = sorted(range(len(jobs)), key=lambda i: not jobs[i].autotuned)  # the GEMMs are slow
    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("fork")) as pool:
        done = dict(zip(longest_first, pool.map(_compile, [jobs[i] for i in longest_first])))
    results = [done[i] for i in range(len(jobs))]
    if arguments.ir:
        _write_ir(results, arguments.ir)
    print(_table(results))
    failures = _failures(specs, results)
    print(f"{len(jobs)} compiles of {len(specs)} specialisations for sm_90: "
          f"{len(failures)} failure(s)")
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
