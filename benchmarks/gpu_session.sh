#!/usr/bin/env bash
# One batch for a lent GPU machine (its own image: system python3 with torch, triton, no network):
# build the extension, run the GPU tests, then the benchmarks. Logs and results go under $OUT.
# Afterwards, here: `python -m benchmarks.collect FILES...` with every call's $OUT/results/*.json
# (merges them into benchmarks/results/; copying would keep only the last call's cases), then
# `make bench-render`, and `python -m benchmarks.auto_order benchmarks/results/<gpu>.json` for the
# AUTO_ORDER of swamp_kernels/_dispatch.py (each op's faster backend first).
# The `host` column (extra.host_ms) is the call's host time: near the time, the op is host-bound.
#
# The lent machine: 30 minutes of device time per session, a cold start (a minute or more) and
# a fresh build on every call that finds no warm machine, warm only 30 s after a call (so send
# the next call at once), 10 minutes per call, at most 8 files back from $OUT (this script
# writes at most 8 per call). Three full calls, most needed first, one process per part (a
# kernel fault loses only its part):
#   1. PARTS="build tests memcheck" TESTS_TIMEOUT_S=400 MEMCHECK_TIMEOUT_S=120
#   2. PARTS="build bench" BENCH_ARGS="--ops prune,swa,average,sgd,masks"
#   3. PARTS="build bench" BENCH_ARGS="--ops resnet50,particles,linear,conv"
#   then, if time is left: BENCH_ARGS="--ops resnet50 --compile" (minutes of compilation).
# The machine gets a copy of the tree without .git: pass SWAMP_COMMIT=<the output here of
#   echo $(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD || echo -dirty)>
# so the results name their commit.
# An op far from its floor: the time includes the host's per-call work (Python checks, table
# uploads) wherever the GPU waits for it. Separate the two with the profiler of the image, one
# op per run (the first matching launches are profiled; --kill stops the program after them):
#   ncu -k regex:'swa_update' -c 4 --kill yes --section SpeedOfLight \
#       python3 -m benchmarks.run --ops swa --backends cuda --quick --out /tmp/ncu-bench
# (kernel time and DRAM throughput per kernel; compare with the table's time).
set -uo pipefail
export PYTHONUNBUFFERED=1   # logs of a call stopped at its limit keep their last lines
OUT=${OUT:-/tmp/swamp-gpu}
mkdir -p "$OUT/results"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -z "${CUDA_HOME:-}" ]; then   # the toolkit: /usr/local/cuda, else the one of nvcc on PATH
    if [ -d /usr/local/cuda ]; then CUDA_HOME=/usr/local/cuda
    elif command -v nvcc > /dev/null; then CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
    fi
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
CALL_LIMIT_S=${CALL_LIMIT_S:-590}   # the device call's limit, less a margin for the summary
left_s() { local s=$(( CALL_LIMIT_S - SECONDS )); echo $(( s > 10 ? s : 10 )); }   # (timeout 0: none)
{ python3 -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)'
  nvidia-smi; } > "$OUT/machine.txt" 2>&1
head -1 "$OUT/machine.txt"
failed=0   # the exit status: 1 when tests, memcheck or benchmarks failed
# PARTS picks steps (default all): a session whose 10-minute calls cannot hold everything splits
# them over calls as the header says.
PARTS=${PARTS:-build tests memcheck bench}
for part in $PARTS; do
    case $part in
    build)
        start=$(date +%s)
        # a failed build loses only the cuda backend: tests and benchmarks run on Triton and torch
        if ! python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
            echo "build FAILED (CUDA_HOME=$CUDA_HOME); going on without the cuda backend"; tail -40 "$OUT/build.log"
            failed=1   # the cuda tests, memcheck and benchmarks then skip: no success
            SWAMP_NO_CUDA_EXT=1 python3 -m pip install --no-deps --no-build-isolation -e . >> "$OUT/build.log" 2>&1
        fi
        echo "build: $(( $(date +%s) - start )) s" ;;
    tests)
        # every test on CUDA tensors (conftest marks them gpu); stopped before the call's limit
        # (TESTS_TIMEOUT_S) so the log comes back; PYTEST_ARGS narrows the files for a second call.
        # With pytest-xdist (the GPU image has it), PYTEST_WORKERS processes share the GPU and
        # compile Triton kernels in parallel; an idle worker takes tests queued on a busy one
        # (worksteal, xdist >= 3.2; else load), so test_prune.py's hundreds of GPU cases
        # spread over all workers.
        # -v: a run stopped at its limit still names every test that ended (the summary never
        # comes); a test stuck longer than TEST_TIMEOUT_S fails alone (pytest-timeout).
        workers="" per_test=""
        if python3 -c 'import xdist' 2> /dev/null; then
            workers="-n ${PYTEST_WORKERS:-8} --dist load"
            if python3 -c 'from xdist.scheduler import WorkStealingScheduling' 2> /dev/null; then
                workers="-n ${PYTEST_WORKERS:-8} --dist worksteal"
            fi
        fi
        if python3 -c 'import pytest_timeout' 2> /dev/null; then
            per_test="--timeout ${TEST_TIMEOUT_S:-240}"
        fi
        timeout "${TESTS_TIMEOUT_S:-$(left_s)}" python3 -m pytest -v -rfE -m gpu -p no:cacheprovider --durations=20 \
            $workers $per_test ${PYTEST_ARGS:-tests} > "$OUT/gpu_tests.log" 2>&1
        rc=$?; echo "gpu tests rc=$rc"; [ $rc -eq 0 ] || failed=1
        grep -E "FAILED|ERROR" "$OUT/gpu_tests.log" | head -40; tail -30 "$OUT/gpu_tests.log" ;;
    memcheck)
        # compute-sanitizer on the CUDA prune's GPU tests; torch's caching allocator off, so an
        # access past a tensor is outside any allocation
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${MEMCHECK_TIMEOUT_S:-$(left_s)}" \
            compute-sanitizer --tool memcheck --error-exitcode 99 \
            python3 -m pytest -v -x -m gpu -p no:cacheprovider ${MEMCHECK_ARGS:-tests/test_cuda_prune.py} \
            > "$OUT/memcheck.log" 2>&1
        rc=$?; echo "memcheck rc=$rc (99: an error found)"; [ $rc -eq 0 ] || failed=1
        grep -E "ERROR SUMMARY|Invalid|FAILED" "$OUT/memcheck.log" | head -20; tail -15 "$OUT/memcheck.log" ;;
    bench)
        # stopped before the call's limit (BENCH_TIMEOUT_S); every finished case is already saved
        timeout "${BENCH_TIMEOUT_S:-$(left_s)}" python3 -m benchmarks.run --out "$OUT/results" ${BENCH_ARGS:-} \
            > "$OUT/bench.log" 2>&1
        rc=$?; echo "bench rc=$rc"; [ $rc -eq 0 ] || failed=1
        grep -E "FAILED" "$OUT/bench.log" | head -20; tail -40 "$OUT/bench.log"
        for results in "$OUT"/results/*.json; do   # each op's faster backend, where both ran (else it says so)
            [ -e "$results" ] || continue
            python3 -m benchmarks.auto_order "$results" > "$OUT/auto_order.txt" 2>&1
            cat "$OUT/auto_order.txt"
        done ;;
    *)
        echo "unknown part $part (build, tests, memcheck, bench)"; exit 2 ;;
    esac
done
exit $failed
