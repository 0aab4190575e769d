// apply_masks_ kernel: zero the masked-out entries of many float tensors in ONE launch.
//
// It works on raw bits: a kept entry is left untouched (NaN payloads, -0.0 stay), a masked
// entry becomes +0.0 (all bits zero), bitwise like masked_fill_(~mask, 0). float16 and
// bfloat16 share the 2-byte path, so one launch covers every dtype of a call. Vectors that
// need no change are not written back (a mask mostly re-zeroes zeros).
#include "apply_masks.h"
#include "multi_tensor.cuh"

namespace swamp {
namespace {

constexpr int64_t kChunk = 16384;  // elements per chunk: a multiple of every vector width
constexpr int kThreads = 256;

// Masks x[0, len), the elements first .. first + len - 1 of a tensor; element e keeps its
// value iff mask[e % M]. Each thread takes N consecutive elements per step.
template <typename Bits, int N>
__device__ __forceinline__ void mask_range(Bits* x, const uint8_t* mask, int64_t M, int64_t first,
                                           int64_t len) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  int64_t i = static_cast<int64_t>(threadIdx.x) * N;
  if (i >= len) {
    return;
  }
  int64_t m = (first + i) % M;  // advanced by step % M with at most one wrap per step
  const int64_t m_step = step % M;
  for (; i < len; i += step) {
    AlignedVec<Bits, N> v = *reinterpret_cast<const AlignedVec<Bits, N>*>(x + i);
    const AlignedVec<uint8_t, N> keep = *reinterpret_cast<const AlignedVec<uint8_t, N>*>(mask + m);
    bool changed = false;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (keep.v[j] == 0 && v.v[j] != 0) {
        v.v[j] = 0;
        changed = true;
      }
    }
    if (changed) {
      *reinterpret_cast<AlignedVec<Bits, N>*>(x + i) = v;
    }
    m += m_step;
    if (m >= M) {
      m -= M;
    }
  }
}

// One chunk: 16-byte vectors where the tensor, the mask and the mask length allow, then
// single elements for the rest (the tail, or everything when unaligned).
template <typename Bits>
__device__ __forceinline__ void mask_chunk(const MaskEntry& e, int64_t start, int64_t len) {
  constexpr int N = 16 / sizeof(Bits);
  Bits* x = static_cast<Bits*>(e.data) + start;
  int64_t vector_len = 0;
  if (reinterpret_cast<uintptr_t>(e.data) % 16 == 0 && reinterpret_cast<uintptr_t>(e.mask) % N == 0 &&
      e.mask_numel % N == 0) {
    vector_len = len / N * N;
    mask_range<Bits, N>(x, e.mask, e.mask_numel, start, vector_len);
  }
  mask_range<Bits, 1>(x + vector_len, e.mask, e.mask_numel, start + vector_len, len - vector_len);
}

__global__ void __launch_bounds__(kThreads)
    apply_masks_kernel(const __grid_constant__ TensorTable<MaskEntry> table) {
  for_each_chunk(table, [](const MaskEntry& e, int64_t start, int64_t len) {
    if (e.elem_bytes == 4) {
      mask_chunk<uint32_t>(e, start, len);
    } else {
      mask_chunk<uint16_t>(e, start, len);
    }
  });
}

}  // namespace

cudaError_t launch_apply_masks(const std::vector<MaskEntry>& entries, int device, cudaStream_t stream) {
  return launch_multi_tensor(apply_masks_kernel, entries, kChunk, kThreads, device, stream);
}

}  // namespace swamp
