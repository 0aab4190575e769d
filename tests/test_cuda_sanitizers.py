"""The CUDA kernels under AddressSanitizer and UndefinedBehaviorSanitizer, on the CPU.

A child pytest runs the kernel-path tests of the CUDA backend (``KERNEL_TESTS``) against a host
build of swamp_kernels/csrc compiled with ``-fsanitize=address,undefined`` (tests/cuda_emulation,
``SWAMP_CUDA_EMULATION_SANITIZE``). A read or write past a tensor, past a ``__shared__`` array or
past a thread's local array, a misaligned vector access (a fault on the device), a signed
overflow or an out-of-range shift, in a kernel or in its launcher, fails the run. This is the part
of compute-sanitizer's memcheck that CI can check; data races and the device's own memory model
stay with ``pytest -m gpu`` on a GPU.
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


def test_cuda_kernels_are_clean_under_address_and_undefined_behaviour_sanitizers():
    runtimes = [_gcc_runtime("libasan.so"), _gcc_runtime("libstdc++.so")]
    if None in runtimes:
        pytest.skip("gcc's libasan.so or libstdc++.so is not installed")
    env = dict(
        os.environ,
        # the sanitized host build runs on CPU tensors, also on a machine with a GPU
        CUDA_VISIBLE_DEVICES="",
        SWAMP_CUDA_EMULATION_SANITIZE="address,undefined",
        # ASan's runtime must come first; libstdc++ too, so that ASan finds __cxa_throw
        # (python does not link it) and the ops' input errors can be thrown
        LD_PRELOAD=" ".join(runtimes),
        ASAN_OPTIONS="detect_leaks=0:exitcode=97",  # python's own allocations stay
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=98",
    )
    # -s: a sanitizer ends the child inside a test, where pytest's capture would swallow its report
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "not gpu",
                             *(f"tests/{name}" for name in KERNEL_TESTS)], cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=1800)
    report = result.stdout[-8000:] + result.stderr[-8000:]
    assert result.returncode == 0, report
    assert " passed" in result.stdout and " failed" not in result.stdout, report
