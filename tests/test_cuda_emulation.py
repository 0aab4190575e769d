"""The host emulation of the CUDA device model (tests/cuda_emulation), on probe kernels: warp
votes, coalesced groups and block barriers give the device's results, threads run in shuffled
orders (a missing barrier shows), shared memory starts as garbage in every block, and the bugs that hang a GPU (a barrier some threads skip, a
warp vote naming an exited lane) fail the launch with a message instead. The emulated CUDA backend itself runs under every backend test."""
from __future__ import annotations

import ctypes
import re
import subprocess

import pytest

from cuda_emulation import BUILD, HERE, HOST_FLAGS, RACECHECK_FLAGS

LAUNCH_FAILURE = 719  # cudaErrorLaunchFailure


COMPILE = ["c++", "-std=c++17", "-O1", "-fPIC", *HOST_FLAGS, f"-I{HERE / 'include'}"]


def _load(library):
    lib = ctypes.CDLL(str(library))
    lib.probe_message.restype = ctypes.c_char_p
    return lib


@pytest.fixture(scope="module")
def probes():
    BUILD.mkdir(parents=True, exist_ok=True)
    library = BUILD / "probes.so"
    subprocess.run([*COMPILE, "-shared", str(HERE / "probes.cpp"), "-o", str(library)], check=True)
    return _load(library)


@pytest.fixture(scope="module")
def racechecked_probes():
    """The probes built as the racecheck build builds kernels: instrumented by -fsanitize=thread,
    with racecheck.cpp's hooks (uninstrumented) linked in instead of ThreadSanitizer's runtime."""
    BUILD.mkdir(parents=True, exist_ok=True)
    objects = [BUILD / "probes-racecheck.o", BUILD / "racecheck.o"]
    subprocess.run([*COMPILE, *RACECHECK_FLAGS, "-c", str(HERE / "probes.cpp"), "-o", str(objects[0])], check=True)
    subprocess.run([*COMPILE, "-c", str(HERE / "racecheck.cpp"), "-o", str(objects[1])], check=True)
    library = BUILD / "probes-racecheck.so"
    subprocess.run(["c++", "-shared", *map(str, objects), "-o", str(library)], check=True)
    return _load(library)


def ints(n: int):
    return (ctypes.c_int * n)(*([-7] * n))


def run(probes, name: str, out, *args) -> tuple[int, str]:
    code = getattr(probes, f"probe_{name}")(out, *args)
    return code, probes.probe_message().decode()


@pytest.mark.parametrize("threads", [32, 64])
def test_ballot_and_match_any_per_warp(probes, threads):
    out = ints(2 * threads)
    assert run(probes, "warp_votes", out, threads) == (0, "no error")
    for t in range(threads):
        base = t - t % 32
        assert out[t] & 0xFFFFFFFF == sum(1 << lane for lane in range(32) if lane & 1)
        assert out[threads + t] & 0xFFFFFFFF == sum(1 << lane for lane in range(32) if (base + lane) % 3 == t % 3)


def test_a_full_mask_vote_in_a_partial_warp_fails_the_launch(probes):
    code, message = run(probes, "warp_votes", ints(80), 40)
    assert code == LAUNCH_FAILURE and "lane 8 of the mask has exited or does not exist" in message


def test_coalesced_group_holds_the_lanes_of_the_branch(probes):
    threads = 64
    out = ints(3 * threads)
    assert run(probes, "coalesced", out, threads) == (0, "no error")
    for t in range(threads):
        row = list(out[3 * t:3 * t + 3])
        if t % 4 == 1:
            assert row == [(t % 32) // 4, 8, t - t % 32 + 1]
        else:
            assert row == [-1, -1, -1]


def test_block_barriers_share_memory_count_and_or(probes):
    blocks, threads = 3, 96
    out = ints(3 * blocks)
    assert run(probes, "block_sync", out, blocks, threads, 95) == (0, "no error")
    assert list(out) == [100, 48, 1, 101, 48, 1, 102, 48, 1]
    assert run(probes, "block_sync", out, blocks, threads, 96) == (0, "no error")
    assert list(out)[2::3] == [0, 0, 0]


def test_threads_run_in_shuffled_orders_so_a_missing_barrier_shows(probes):
    out = ints(64)
    assert run(probes, "missing_barrier", out, 64) == (0, "no error")
    seen = list(out)
    assert seen[0] == 42 and 0 in seen and seen.count(42) > 1, seen   # some read before the write


def test_every_block_finds_garbage_in_shared_memory(probes):
    """As on the device, not zeros nor what the block before wrote: a kernel that reads shared
    memory before writing it computes garbage here too."""
    out = ints(4)
    assert run(probes, "unwritten_shared", out, 4) == (0, "no error")
    assert 0 not in list(out) and len(set(out)) == 4, list(out)


def test_a_barrier_some_threads_skip_fails_the_launch(probes):
    code, message = run(probes, "divergent_barrier", ints(64), 64)
    assert code == LAUNCH_FAILURE
    assert "deadlock: 32 threads exited without reaching the barrier that thread 0: __syncthreads" in message


def test_a_vote_naming_an_exited_lane_fails_the_launch(probes):
    code, message = run(probes, "vote_after_exit", ints(32), 32)
    assert code == LAUNCH_FAILURE
    assert "__ballot_sync" in message and "lane 0 of the mask has exited" in message


def test_racecheck_reports_threads_sharing_memory_between_barriers(racechecked_probes):
    code, message = run(racechecked_probes, "missing_barrier", ints(64), 64)
    assert code == LAUNCH_FAILURE
    # thread 0 writes what the others read between the same two barriers (which comes first
    # depends on the shuffled order)
    assert re.search(r"race \((read after write|write after read)\): thread \d+ of block 0 and", message), message
    assert "thread 0 " in message and "of __shared__ memory" in message, message
    assert "missing_barrier" in message and "probes.cpp:" in message, message   # the function and line


def test_racecheck_accepts_barrier_ordered_and_atomic_sharing(racechecked_probes):
    out = ints(9)
    assert run(racechecked_probes, "block_sync", out, 3, 96, 95) == (0, "no error")
    assert list(out) == [100, 48, 1, 101, 48, 1, 102, 48, 1]
    out = ints(2)
    assert run(racechecked_probes, "atomic_count", out, 2, 64) == (0, "no error")
    assert list(out) == [64, 64]


def test_racecheck_reports_blocks_sharing_global_memory(racechecked_probes):
    out = (ctypes.c_int * 1)(0)
    assert run(racechecked_probes, "global_counter", out, 3, 0) == (0, "no error") and out[0] == 3
    code, message = run(racechecked_probes, "global_counter", out, 3, 1)
    assert code == LAUNCH_FAILURE
    assert "race (read after write): thread 0 of block 1 and thread 0 of block 0 access global memory" in message
    assert "global_counter" in message, message
