// Masks that a tensor of a multi-tensor launch may lack (nvcc only, no torch headers): an
// Entry holds `const uint8_t* mask`, nullptr when nothing is masked.
#pragma once

#include <cstdint>

#include "multi_tensor.cuh"

namespace swamp {

// The N mask bytes at mask[at, at + N) as one aligned vector load (the caller checks
// vector_aligned<uint8_t, N>(mask) for N > 1); all 1 (kept) when `mask` is nullptr.
template <int N>
__device__ __forceinline__ AlignedVec<uint8_t, N> load_keep(const uint8_t* mask, int64_t at) {
  AlignedVec<uint8_t, N> keep;
  if (mask != nullptr) {
    keep = *reinterpret_cast<const AlignedVec<uint8_t, N>*>(global_ptr(mask) + at);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      keep.v[j] = 1;
    }
  }
  return keep;
}

}  // namespace swamp
