// apply_masks_: the interface between its torch binding (apply_masks_op.cpp) and its kernel
// (apply_masks.cu). Plain C++: no torch or device code here.
#pragma once

#include <cstdint>
#include <vector>

#include <cuda_runtime_api.h>

namespace swamp {

struct MaskEntry {
  void* data;           // contiguous float32 / float16 / bfloat16 tensor
  const uint8_t* mask;  // contiguous bool mask of mask_numel entries
  int64_t numel;        // elements of data (> 0)
  int64_t mask_numel;   // numel, or numel / P for a mask broadcast over P particles
  int64_t elem_bytes;   // 4 or 2
};

// In one launch on `stream`: data[e] = 0 (all bits) wherever mask[e % mask_numel] is false,
// for every entry; other entries keep their bits.
cudaError_t launch_apply_masks(const std::vector<MaskEntry>& entries, int device, cudaStream_t stream);

}  // namespace swamp
