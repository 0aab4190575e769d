"""The CUDA kernels under sanitizers, on the CPU: compute-sanitizer's memcheck and racecheck as
far as CI can check them.

A child pytest runs the kernel-path tests of the CUDA backend (``KERNEL_TESTS``) against an
instrumented host build of swamp_kernels/csrc (tests/cuda_emulation, ``SWAMP_CUDA_EMULATION_SANITIZE``):

- ``address,undefined``: a read or write past a tensor, past a ``__shared__`` array or past a
  thread's local array, a misaligned vector access (a fault on the device), a signed overflow or
  an out-of-range shift, in a kernel or in its launcher, fails the run;
- ``racecheck``: a race (two accesses to one byte, one of them a plain write, or a plain one
  beside an atomic one, that nothing orders: threads of a block between the same two barriers,
  in shared or global memory, or two blocks of one launch) fails the run, naming both lines.

What stays with ``pytest -m gpu`` and compute-sanitizer on a GPU: the device's own memory model
(visibility without fences), timing, and launches too large to emulate.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
KERNEL_TESTS = ["test_cuda_extension.py", "test_cuda_sgd.py", "test_cuda_particles.py", "test_cuda_prune.py"]


def _gcc_runtime(name: str) -> str | None:
    """The path of gcc's runtime library ``name``, or None (no gcc, or no such library)."""
    try:
        path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


def run_kernel_tests(sanitize: str, **env) -> None:
    """Runs KERNEL_TESTS in a child against the host build with SWAMP_CUDA_EMULATION_SANITIZE
    = ``sanitize`` (on CPU tensors, also on a machine with a GPU) and asserts they all pass."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", SWAMP_CUDA_EMULATION_SANITIZE=sanitize, **env)
    # -s: a sanitizer ends the child inside a test, where pytest's capture would swallow its report
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "not gpu",
                             *(f"tests/{name}" for name in KERNEL_TESTS)], cwd=TESTS.parent, env=env,
                            capture_output=True, text=True, timeout=1800)
    report = result.stdout[-8000:] + result.stderr[-8000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and " failed" not in result.stdout, report


def test_cuda_kernels_are_clean_under_address_and_undefined_behaviour_sanitizers():
    runtimes = [_gcc_runtime("libasan.so"), _gcc_runtime("libstdc++.so")]
    if None in runtimes:
        pytest.skip("gcc's libasan.so or libstdc++.so is not installed")
    run_kernel_tests(
        "address,undefined",
        # ASan's runtime must come first; libstdc++ too, so that ASan finds __cxa_throw
        # (python does not link it) and the ops' input errors can be thrown
        LD_PRELOAD=" ".join(runtimes),
        ASAN_OPTIONS="detect_leaks=0:exitcode=97",  # python's own allocations stay
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=98",
    )


def test_cuda_kernels_are_clean_under_racecheck():
    """No two unordered accesses to one byte with a plain write among them, or a plain access
    beside an atomic one, in shared or global memory: tests/cuda_emulation/racecheck.cpp."""
    run_kernel_tests("racecheck")
