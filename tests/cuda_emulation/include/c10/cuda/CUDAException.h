// Host emulation of C10_CUDA_CHECK (tests only): a failed call throws with its description.
#pragma once

#include <c10/util/Exception.h>

#include "cuda_runtime_api.h"

#define C10_CUDA_CHECK(expr)                                                        \
  do {                                                                              \
    const cudaError_t swamp_emu_error_ = (expr);                                    \
    TORCH_CHECK(swamp_emu_error_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(swamp_emu_error_)); \
  } while (0)
