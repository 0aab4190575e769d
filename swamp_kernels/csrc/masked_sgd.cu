// masked_sgd_step_ kernel: torch.optim.SGD on grad * mask, then param *= mask, for many
// tensors in ONE launch per (param dtype, grad dtype) pair. Every operand is read and
// written once; a mask broadcast over P particles is read once per chunk and kept in
// registers for its P rows. Arithmetic runs in float32 registers; buffers are stored in
// the param dtype. Masked entries select (never multiply): a NaN grad there is dropped and
// the param ends at +0.0, while weight decay and momentum still act there, as in torch.
#include <type_traits>

#include "masked_sgd.h"
#include "multi_tensor.cuh"
#include "optional_mask.cuh"

namespace swamp {
namespace {

constexpr int64_t kChunk = 4096;  // entries per chunk of a row: a multiple of every vector width
constexpr int kThreads = 256;

// One entry's new param (float32) from its param and masked grad; `buffer` is read (unless
// `first_step`) and updated when momentum is on.
__device__ __forceinline__ float sgd_update(float param, float grad, float& buffer, bool first_step,
                                            const SgdOptions& s) {
  float d_p = s.maximize ? -grad : grad;
  if (s.use_weight_decay) {
    d_p = d_p + s.weight_decay * param;
  }
  if (s.use_momentum) {
    // buf * momentum rounded on its own, as torch's buf.mul_(momentum) (no FMA with the add).
    buffer = first_step ? d_p : __fmul_rn(buffer, s.momentum) + s.one_minus_dampening * d_p;
    d_p = s.nesterov ? d_p + s.momentum * buffer : buffer;
  }
  return param + s.neg_lr * d_p;
}

// Entries first .. first + len - 1 of every row; each thread takes N consecutive entries per
// step and updates them in all rows.
template <typename T, typename G, int N>
__device__ __forceinline__ void sgd_range(const SgdEntry& e, int64_t first, int64_t len, const SgdOptions& s) {
  T* param = global_ptr(static_cast<T*>(e.param)) + first;
  const G* grad = global_ptr(static_cast<const G*>(e.grad)) + first;
  T* buffer = s.use_momentum ? global_ptr(static_cast<T*>(e.momentum_buffer)) + first : nullptr;
  const bool read_buffer = s.use_momentum && !e.first_step;
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * N; i < len; i += step) {
    const AlignedVec<uint8_t, N> keep = load_keep<N>(e.mask, first + i);
    for (int64_t r = 0; r < e.rows; ++r) {
      const int64_t at = r * e.numel + i;
      AlignedVec<T, N> p = *reinterpret_cast<const AlignedVec<T, N>*>(param + at);
      const AlignedVec<G, N> g = *reinterpret_cast<const AlignedVec<G, N>*>(grad + at);
      AlignedVec<T, N> b;
      if (read_buffer) {
        b = *reinterpret_cast<const AlignedVec<T, N>*>(buffer + at);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const bool kept = keep.v[j] != 0;
        float buf = read_buffer ? to_float(b.v[j]) : 0.f;
        const float updated = sgd_update(to_float(p.v[j]), kept ? to_float(g.v[j]) : 0.f, buf, e.first_step, s);
        p.v[j] = from_float<T>(kept ? updated : 0.f);
        b.v[j] = from_float<T>(buf);
      }
      if (s.use_momentum) {
        *reinterpret_cast<AlignedVec<T, N>*>(buffer + at) = b;
      }
      *reinterpret_cast<AlignedVec<T, N>*>(param + at) = p;
    }
  }
}

// One chunk of a row: vectors of 16 bytes (of the wider dtype) where every operand and every
// row is aligned, then single entries for the rest (the tail, or everything when unaligned).
template <typename T, typename G>
__device__ __forceinline__ void sgd_chunk(const SgdEntry& e, int64_t start, int64_t len, const SgdOptions& s) {
  constexpr int N = 16 / (sizeof(T) > sizeof(G) ? sizeof(T) : sizeof(G));
  int64_t vector_len = 0;
  if (vector_aligned<T, N>(e.param) && vector_aligned<G, N>(e.grad) &&
      (!s.use_momentum || vector_aligned<T, N>(e.momentum_buffer)) &&
      (e.mask == nullptr || vector_aligned<uint8_t, N>(e.mask)) && (e.rows == 1 || e.numel % N == 0)) {
    vector_len = len / N * N;
    sgd_range<T, G, N>(e, start, vector_len, s);
  }
  sgd_range<T, G, 1>(e, start + vector_len, len - vector_len, s);
}

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads)
    masked_sgd_kernel(const __grid_constant__ TensorTable<SgdEntry> table, SgdOptions s) {
  for_each_chunk(table, [&](const SgdEntry& e, int64_t start, int64_t len) { sgd_chunk<T, G>(e, start, len, s); });
}

}  // namespace

cudaError_t launch_masked_sgd(const std::vector<SgdEntry>& entries, FloatType param_type, FloatType grad_type,
                              const SgdOptions& options, int device, cudaStream_t stream) {
  return dispatch_float(param_type, [&](auto param_tag) {
    using T = decltype(param_tag);
    if constexpr (std::is_same_v<T, float>) {  // float32 params take grads of every float dtype
      return dispatch_float(grad_type, [&](auto grad_tag) {
        using G = decltype(grad_tag);
        return launch_multi_tensor(masked_sgd_kernel<T, G>, entries, kChunk, kThreads, device, stream, options);
      });
    } else {
      if (grad_type != param_type) {
        return cudaErrorInvalidValue;
      }
      return launch_multi_tensor(masked_sgd_kernel<T, T>, entries, kChunk, kThreads, device, stream, options);
    }
  });
}

}  // namespace swamp
