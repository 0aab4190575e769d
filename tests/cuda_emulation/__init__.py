"""The CUDA backend's kernels on the CPU: a host build of swamp_kernels/csrc for tests without a GPU.

The sources of ``swamp_kernels._C`` are compiled unchanged by the host compiler against the
headers in ``include/``, which emulate the CUDA runtime, the device model (threads as fibers,
warps, barriers, shared memory, atomics: ``include/emulated_device.h``) and the few c10 CUDA
helpers the bindings use. Three spellings only nvcc reads are rewritten on the way in:
``kernel<<<grid, block, shared, stream>>>(args)`` becomes a call of the emulated launch, and the
bindings register for CPU tensors under the op namespace ``swamp_kernels_emulated`` (so the
real extension can be loaded beside it). ``device_upload.cpp`` is replaced by a host copy.

:func:`activate` then routes ``backend="cuda"`` to these ops for CPU tensors: the very
bindings, launchers and kernels of the CUDA backend run under the backend tests' whole
matrix. With ``SWAMP_CUDA_EMULATION_SANITIZE`` the build is instrumented: by the compiler's
sanitizers, which catch out-of-bounds and misaligned accesses, or for racecheck.cpp, which
catches races between threads and blocks (tests/test_cuda_sanitizers.py). What only a GPU shows
(timing, the device's memory model) is left to ``pytest -m gpu`` and compute-sanitizer.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "swamp_kernels" / "csrc"
HERE = Path(__file__).resolve().parent
NAMESPACE = "swamp_kernels_emulated"
# Compiler sanitizers for the host build, e.g. "address,undefined" (an AddressSanitizer build
# needs libasan preloaded), or "racecheck" (racecheck.cpp); tests/test_cuda_sanitizers.py sets it
# for a child process.
SANITIZE = os.environ.get("SWAMP_CUDA_EMULATION_SANITIZE", "")
BUILD = ROOT / "build" / ("cuda_emulation" + (f"-{SANITIZE.replace(',', '-')}" if SANITIZE else ""))
HOST_FLAGS = ["-Wno-unknown-pragmas", "-ffp-contract=off"]  # every host build of CUDA sources
# GCC's ThreadSanitizer instrumentation without its runtime: racecheck.cpp implements the hooks
RACECHECK_FLAGS = ["-g", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)<<<(.+?)>>>\(")
_LIBRARY = re.compile(r"\b(TORCH_LIBRARY(?:_FRAGMENT|_IMPL)?)\(swamp_kernels\b")


def host_source(path: Path) -> str:
    """The text of csrc file ``path`` as the host build compiles it."""
    text = path.read_text()
    text = _LAUNCH.sub(r"::swamp_emu::launch(\1, \2)(", text)
    text = _LIBRARY.sub(rf"\1({NAMESPACE}", text)
    text = text.replace(f"TORCH_LIBRARY_IMPL({NAMESPACE}, CUDA,", f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU,")
    text = text.replace("device.is_cuda()", "device.is_cpu()")
    for nvcc_only in ("<<<", "TORCH_LIBRARY(swamp_kernels,", "swamp_kernels, CUDA", "is_cuda()"):
        if nvcc_only in text:
            raise RuntimeError(f"{path.name}: the host build cannot rewrite {nvcc_only!r} here")
    return text


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _instrumented_objects(kernels: list[Path], include_dirs: list[Path]) -> list[Path]:
    """The kernel files compiled apart with GCC's -fsanitize=thread instrumentation, whose hooks
    racecheck.cpp implements (the bindings stay uninstrumented: torch's atomics would call more).
    Each object is named by a digest of its inputs, so that a change relinks the library."""
    flags = ["-std=c++17", "-O1", "-fPIC", *HOST_FLAGS, *RACECHECK_FLAGS,
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             *(f"-I{d}" for d in include_dirs)]
    headers = "".join(h.read_text() for d in include_dirs for h in sorted(d.rglob("*")) if h.suffix in (".h", ".cuh"))
    objects = []
    for source in kernels:
        digest = hashlib.sha256("\0".join([*flags, headers, source.read_text()]).encode()).hexdigest()[:16]
        target = BUILD / f"{source.stem}-{digest}.o"
        if not target.exists():
            for stale in BUILD.glob(f"{source.stem}-*.o"):
                stale.unlink()
            subprocess.run(["c++", *flags, "-c", str(source), "-o", str(target)], check=True)
        objects.append(target)
    return objects


@functools.cache
def ops():
    """``torch.ops.swamp_kernels_emulated``, building the host library first if needed."""
    from torch.utils.cpp_extension import load

    # the venv's ninja (requirements-dev.txt), also when the venv is not on PATH
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    sources_dir = BUILD / "src"
    sources_dir.mkdir(parents=True, exist_ok=True)
    sources = [HERE / "device_upload.cpp"]
    for path in sorted(CSRC.iterdir()):
        if path.name == "device_upload.cpp" or path.suffix not in (".cpp", ".cu", ".cuh", ".h"):
            continue
        target = sources_dir / (path.stem + ".cpp" if path.suffix == ".cu" else path.name)
        _write_if_changed(target, host_source(path))
        if target.suffix == ".cpp":
            sources.append(target)
    cflags, ldflags = ["-O2", *HOST_FLAGS], []
    if SANITIZE == "racecheck":
        kernels = [s for s in sources if (CSRC / f"{s.stem}.cu").exists()]
        sources = [s for s in sources if s not in kernels] + [HERE / "racecheck.cpp"]
        ldflags = [str(o) for o in _instrumented_objects(kernels, [HERE / "include", sources_dir])]
    elif SANITIZE:
        sanitize = [f"-fsanitize={SANITIZE}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        cflags, ldflags = ["-O1", *HOST_FLAGS, *sanitize], sanitize[:1]
    load(name=NAMESPACE, sources=[str(s) for s in sources], build_directory=str(BUILD),
         extra_include_paths=[str(HERE / "include"), str(sources_dir)], extra_cflags=cflags,
         extra_ldflags=ldflags, is_python_module=False, verbose=False)
    from swamp_kernels.cuda import register_fake_kernels
    register_fake_kernels(NAMESPACE)
    return getattr(torch.ops, NAMESPACE)


def activate(monkeypatch) -> None:
    """Until the test ends, ``backend="cuda"`` runs the host build on CPU tensors."""
    from swamp_kernels import _dispatch, cuda

    emulated = ops()
    is_available, runs_on = _dispatch._is_available, _dispatch._runs_on
    monkeypatch.setattr(_dispatch, "_is_available", lambda backend: backend == "cuda" or is_available(backend))
    monkeypatch.setattr(_dispatch, "_runs_on",
                        lambda backend, device: (backend == "cuda" and device.type == "cpu") or runs_on(backend, device))
    monkeypatch.setattr(cuda, "_ops", lambda: emulated)
