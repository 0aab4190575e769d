# Two commands do all the set-up: `make demo` and `make test` (each runs `make venv` first).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The GPU image's triton, installed aside for the sm_90 compile check (tests/test_triton_aot.py).
GPU_IMAGE_TRITON := 3.6.0
CSRC   := $(wildcard swamp_kernels/csrc/*.cpp swamp_kernels/csrc/*.cu swamp_kernels/csrc/*.cuh swamp_kernels/csrc/*.h)
# The CUDA extension is compiled wherever a toolkit is found, also without a GPU.
export CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))

.PHONY: venv test demo bench bench-render gpu-test clean

venv: $(STAMP)

# --no-cache-dir: the CUDA wheels take ~5 GB; pip's cached copy of them would double what a
# fresh install needs on disk (the last CI run failed with ENOSPC inside pip).
$(STAMP): Makefile requirements-dev.txt pyproject.toml setup.py $(CSRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-cache-dir --no-deps --upgrade --target $(VENV)/triton-gpu-image triton==$(GPU_IMAGE_TRITON)
	$(PY) -m pip install --quiet --no-cache-dir --no-deps --no-build-isolation -e .
	touch $@

test: venv
	$(PY) -m pytest -q -m "not gpu" tests

demo: venv
	$(PY) -m swamp.demo

gpu-test: venv
	$(PY) -m pytest -q -m gpu tests

bench: venv
	$(PY) -m benchmarks.run

bench-render: venv
	$(PY) -m benchmarks.render

clean:
	rm -rf build $(VENV) swamp_kernels/_C*.so *.egg-info
