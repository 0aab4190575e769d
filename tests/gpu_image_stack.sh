#!/usr/bin/env bash
# The CPU test suite on the lent GPU machines' software stack, on a machine without a GPU:
# Python 3.12, torch 2.11 (cu130 wheel), triton 3.6, torchvision 0.26. Not part of `make test`
# (it downloads ~4 GB of wheels); run it by hand after changing the C++ sources or using a newer
# torch/triton API, so that the first command of a GPU session does not fail on the build.
#
#   bash tests/gpu_image_stack.sh [pytest args]     # default: the whole "not gpu" suite
#
# What it catches: binding code that needs C++20 (torch 2.11 builds extensions as C++17, 2.14 as
# C++20), torch or triton APIs newer than the image's, Python 3.12 differences. numpy stays below
# 2.4 here: triton 3.6's interpreter (TRITON_INTERPRET=1, CPU only; the GPU never runs it) fails
# on numpy 2.4+ with "only 0-dimensional arrays can be converted to Python scalars".
# Environment: PYTHON312 (a python3.12 binary), WORK (scratch; default /tmp/swamp-gpu-image-stack).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/swamp-gpu-image-stack}
if [ -z "${PYTHON312:-}" ]; then   # the first python3.12 that runs (a pyenv shim may be on PATH but not set up)
  for candidate in "$(command -v python3.12)" /root/.pyenv/versions/3.12*/bin/python3.12; do
    if [ -n "$candidate" ] && "$candidate" -c "" 2> /dev/null; then PYTHON312=$candidate; break; fi
  done
fi
: "${PYTHON312:?no working python3.12 found: set PYTHON312}"
VENV=$WORK/venv
mkdir -p "$WORK"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON312" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --no-cache-dir torch==2.11.0 triton==3.6.0 torchvision==0.26.0 "numpy<2.4" \
    pytest pytest-benchmark pytest-xdist pyyaml tqdm matplotlib scikit-learn ninja setuptools wheel
fi
# A copy of the working tree (tracked and untracked files, not ignored ones): the editable
# install builds swamp_kernels._C for Python 3.12 inside it, leaving the checkout alone.
rm -rf "$WORK/src" && mkdir -p "$WORK/src"
(cd "$REPO" && git ls-files -co --exclude-standard | tar -cf - -T -) | tar -xf - -C "$WORK/src"
cd "$WORK/src"
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 \
  "$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ $# -eq 0 ]; then set -- -q -m "not gpu" -n 2 tests; fi
exec "$VENV/bin/python" -m pytest -W "ignore::DeprecationWarning" "$@"
