// swa_update_ (particle_average is its n_averaged == 0 case): the interface between its torch
// binding (particles_op.cpp) and its kernel (particles.cu). Plain C++: no torch or device code here.
#pragma once

#include <cstdint>
#include <vector>

#include <cuda_runtime_api.h>

#include "float_type.h"

namespace swamp {

struct AverageEntry {
  const void* params;   // contiguous [P, numel] particles
  void* out;            // contiguous numel entries (the running average)
  const uint8_t* mask;  // contiguous numel bools, or nullptr: nothing masked
  int64_t numel;        // entries of one particle (> 0)
};

// In one launch on `stream`, for every entry (all of them `param_type` particles and
// `out_type` outputs): out = mean_p(params) when n_averaged == 0 (out is not read), else
// out += (mean_p(params) - out) / (n_averaged + 1); in float32, then out = 0 where masked.
cudaError_t launch_swa_update(const std::vector<AverageEntry>& entries, FloatType param_type,
                              FloatType out_type, int64_t particles, int64_t n_averaged, int device,
                              cudaStream_t stream);

}  // namespace swamp
