// Host emulation of cuda_runtime.h (tests only): the runtime API and the device model.
#pragma once

#include "cuda_runtime_api.h"
#include "emulated_device.h"

// Every emulated kernel fits once per multiprocessor.
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = 1;
  return cudaSuccess;
}
