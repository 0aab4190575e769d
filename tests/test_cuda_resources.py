"""Every CUDA kernel of swamp_kernels._C compiles for the architectures we ship (sm_80, sm_90)
without register spills, reported per kernel by ptxas (``nvcc -Xptxas -v``; no GPU needed).

A spill turns register traffic into local-memory traffic in the hot loop of a memory-bound
kernel; a tile or stage size raised past what a thread block can hold shows up here first.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from test_cuda_extension import _toolkit_home

CSRC = Path(__file__).resolve().parents[1] / "swamp_kernels" / "csrc"
SOURCES = sorted(CSRC.glob("*.cu"))
_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def ptxas_report(source: Path, arch: int) -> dict[str, dict[str, int]]:
    """{kernel: {"registers", "spill_stores", "spill_loads"}} of ``source`` compiled for sm_``arch``."""
    home = _toolkit_home()
    if home is None:
        pytest.skip("no CUDA toolkit: no nvcc under CUDA_HOME or /usr/local/cuda")
    result = subprocess.run([f"{home}/bin/nvcc", "-std=c++17", f"-arch=sm_{arch}", "-O3", "-Xptxas", "-v",
                             "-c", str(source), "-o", "/dev/null"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report, kernel = {}, None
    for line in result.stderr.splitlines():
        if match := _ENTRY.search(line):
            kernel = match.group(1)
            report[kernel] = {}
        elif kernel and (match := _SPILLS.search(line)):
            report[kernel].update(spill_stores=int(match.group(1)), spill_loads=int(match.group(2)))
        elif kernel and (match := _REGISTERS.search(line)):
            report[kernel]["registers"] = int(match.group(1))
    return report


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_kernels_compile_without_spills(source, arch):
    report = ptxas_report(source, arch)
    assert report, f"ptxas reported no kernel for {source.name}"
    spilling = {k: r for k, r in report.items() if r.get("spill_stores") or r.get("spill_loads")}
    assert not spilling, f"{source.name} spills registers on sm_{arch}: {spilling}"
    assert all("registers" in r for r in report.values()), report
