"""Timing: median wall time of a callable, the device copy bandwidth, and the bandwidth floor.

On CUDA every run is bracketed by CUDA events after warm-up, with the L2 cache flushed before
each run (so repeated runs do not read their inputs from L2). The flush *reads* a buffer
larger than L2: writing it (``zero_``, as triton.testing.do_bench does) would leave up to
L2-size dirty lines whose write-back lands inside the next timed run, about 17 µs on an H100,
a third of the floor of a ResNet-50 prune. On the CPU (smoke runs only) ``time.perf_counter``
replaces the events.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

L2_FLUSH_BYTES = 256 * 2**20   # larger than the L2 of any current NVIDIA GPU
COPY_BYTES = 2**30             # source size of the copy-bandwidth measurement


_FLUSH_BUFFERS: dict[torch.device, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    if device not in _FLUSH_BUFFERS:
        _FLUSH_BUFFERS[device] = torch.zeros(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    return _FLUSH_BUFFERS[device]


def _cuda_runs_ms(fn: Callable[[], object], device: torch.device, runs: int) -> list[float]:
    flush = _flush_buffer(device)
    sink = torch.empty((), dtype=torch.int32, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(runs)]
    for start, end in events:
        torch.amax(flush, out=sink)   # reads the buffer: L2 ends holding clean lines only
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def _cpu_runs_ms(fn: Callable[[], object], runs: int, before: Callable[[], object] = lambda: None) -> list[float]:
    """Wall milliseconds of ``runs`` calls of ``fn``, each after an untimed ``before()``."""
    times = []
    for _ in range(runs):
        before()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def time_ms(fn: Callable[[], object], device: torch.device, *, budget_ms: float = 1000.0,
            warmup: int = 2, min_runs: int = 3, max_runs: int = 200) -> float:
    """Median milliseconds of one ``fn()`` call on ``device``.

    One first call compiles, autotunes and allocates; then up to ``warmup`` runs (later ones
    skipped once one takes ``budget_ms``), the last of which sets how many timed runs fill
    about ``budget_ms``, clamped to ``[min_runs, max_runs]``. (Sizing the runs from the first
    call would give a kernel that JIT-compiles ``min_runs`` runs.)
    """
    def runs_ms(n: int) -> list[float]:
        return _cuda_runs_ms(fn, device, n) if device.type == "cuda" else _cpu_runs_ms(fn, n)

    runs_ms(1)
    last_warmup = runs_ms(1)[0]
    for _ in range(warmup - 1):
        if last_warmup >= budget_ms:
            break
        last_warmup = runs_ms(1)[0]
    runs = min(max(int(budget_ms / max(last_warmup, 1e-3)), min_runs), max_runs)
    return statistics.median(runs_ms(runs))


def host_ms(fn: Callable[[], object], device: torch.device, runs: int = 21) -> float:
    """Median milliseconds the host spends in one ``fn()`` call, the device idle before each:
    the Python, checks and launches, not the kernels (on CUDA the call returns once they are
    queued). When it nears :func:`time_ms`, the op is host-bound: the device waits for it."""
    def idle_device():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = _cpu_runs_ms(fn, runs, before=idle_device)
    idle_device()
    return statistics.median(times)


def _spin_up(fn: Callable[[], object], device: torch.device, seconds: float) -> None:
    """Run ``fn`` for about ``seconds`` so an idle GPU's clocks rise to their loaded speed."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        fn()
        torch.cuda.synchronize(device)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = COPY_BYTES, spin_up_s: float = 1.0, **timing) -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes), counting the read and the write; on
    CUDA after ``spin_up_s`` seconds of copies (an idle GPU clocks down, which would read low
    and make every time/floor look better than it is)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        _spin_up(lambda: dst.copy_(src), device, spin_up_s)
    ms = time_ms(lambda: dst.copy_(src), device, **timing)
    return 2 * src.numel() * src.element_size() / (ms * 1e6)


def floor_ms(nbytes: int, bandwidth_gbs: float) -> float:
    """Milliseconds needed to move ``nbytes`` at ``bandwidth_gbs``: the kernel's lower bound."""
    return nbytes / (bandwidth_gbs * 1e6)
