#!/usr/bin/env bash
# One batch for a lent GPU machine (its own image: system python3 with torch, triton, no network):
# build the extension, run the GPU tests, then the benchmarks. Logs and results go under $OUT.
# Afterwards, here: `python -m benchmarks.collect FILES...` with every call's $OUT/results/*.json
# (merges them into benchmarks/results/; copying would keep only the last call's cases), then
# `make bench-render`, and `python -m benchmarks.auto_order benchmarks/results/<gpu>.json` for the
# AUTO_ORDER of swamp_kernels/_dispatch.py (each op's faster backend first).
# The `host` column (extra.host_ms) is the call's host time: near the time, the op is host-bound.
#
# A session's device time is short and each call stops at 10 minutes, so split by PARTS/BENCH_ARGS,
# most needed first, one process per group (a kernel fault then loses only its group):
#   PARTS="build tests"
#   PARTS="build bench" BENCH_ARGS="--ops prune,swa,average,sgd,masks"
#   PARTS="build bench" BENCH_ARGS="--ops resnet50,particles,linear"
#   PARTS="build bench" BENCH_ARGS="--ops conv"
#   PARTS="build bench" BENCH_ARGS="--ops resnet50 --compile", then "--ops particles --compile"
#     (each compiles its models: minutes; together they would not fit one call)
# The machine gets a copy of the tree without .git: pass SWAMP_COMMIT=<hash of HEAD here> so
# the results name their commit.
# An op far from its floor: the time includes the host's per-call work (Python checks, table
# uploads) wherever the GPU waits for it. Separate the two with the profiler of the image, e.g.
#   ncu -k regex:'digit_pass|swa_update|masked_sgd' -c 12 --section SpeedOfLight \
#       python3 -m benchmarks.run --ops prune,swa,sgd --backends cuda --quick --out /tmp/ncu-bench
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
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)' \
    | tee "$OUT/versions.txt"
# PARTS picks steps (default all): a session whose 10-minute calls cannot hold everything runs
# PARTS="build tests" in one call and PARTS="build bench" BENCH_ARGS="--ops ..." in the next.
PARTS=${PARTS:-build tests bench}
for part in $PARTS; do
    case $part in
    build)
        start=$(date +%s)
        # a failed build loses only the cuda backend: tests and benchmarks run on Triton and torch
        if ! python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
            echo "build FAILED (CUDA_HOME=$CUDA_HOME); going on without the cuda backend"; tail -40 "$OUT/build.log"
            SWAMP_NO_CUDA_EXT=1 python3 -m pip install --no-deps --no-build-isolation -e . >> "$OUT/build.log" 2>&1
        fi
        echo "build: $(( $(date +%s) - start )) s" ;;
    tests)
        # every test on CUDA tensors (conftest marks them gpu); stopped before the call's limit
        # (TESTS_TIMEOUT_S) so the log comes back; PYTEST_ARGS narrows the files for a second call.
        # With pytest-xdist (the GPU image has it), PYTEST_WORKERS processes share the GPU and
        # compile Triton kernels in parallel, one test file each at a time.
        workers=""
        if python3 -c 'import xdist' 2> /dev/null; then
            workers="-n ${PYTEST_WORKERS:-8} --dist loadfile"
        fi
        timeout "${TESTS_TIMEOUT_S:-$(left_s)}" python3 -m pytest -q -m gpu -p no:cacheprovider --durations=20 \
            $workers ${PYTEST_ARGS:-tests} > "$OUT/gpu_tests.log" 2>&1
        echo "gpu tests rc=$?"; grep -E "FAILED|ERROR" "$OUT/gpu_tests.log" | head -40; tail -30 "$OUT/gpu_tests.log" ;;
    bench)
        # stopped before the call's limit (BENCH_TIMEOUT_S); every finished case is already saved
        timeout "${BENCH_TIMEOUT_S:-$(left_s)}" python3 -m benchmarks.run --out "$OUT/results" ${BENCH_ARGS:-} \
            > "$OUT/bench.log" 2>&1
        echo "bench rc=$?"; grep -E "FAILED" "$OUT/bench.log" | head -20; tail -40 "$OUT/bench.log"
        for results in "$OUT"/results/*.json; do   # each op's faster backend, where both ran
            [ -e "$results" ] && python3 -m benchmarks.auto_order "$results" | tee "$OUT/auto_order.txt"
        done ;;
    *)
        echo "unknown part $part (build, tests, bench)"; exit 2 ;;
    esac
done
