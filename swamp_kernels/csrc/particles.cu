// swa_update_ kernel (particle_average is its n_averaged == 0 case): the masked mean over the
// P particles of many [P, *shape] tensors folded into their running averages, ONE launch per
// (particle dtype, average dtype) pair and one pass over memory: each particle entry is read
// once, the average read (unless n_averaged == 0) and written once. Sums run in float32, in
// particle order; masked entries are written as +0.0 whatever the particles hold there.
#include "multi_tensor.cuh"
#include "optional_mask.cuh"
#include "particles.h"

namespace swamp {
namespace {

constexpr int64_t kChunk = 4096;  // entries per chunk: a multiple of every vector width
constexpr int kThreads = 256;

struct AverageScalars {
  int64_t particles;
  float particles_f;  // P as float: the mean is sum / P, as in the reference
  float divisor;      // n_averaged + 1
  bool copy;          // n_averaged == 0: the old average is not read
};

// Entries first .. first + len - 1 of one tensor; each thread takes N consecutive entries per step.
template <typename P, typename O, int N>
__device__ __forceinline__ void average_range(const AverageEntry& e, int64_t first, int64_t len,
                                              const AverageScalars& s) {
  const P* params = global_ptr(static_cast<const P*>(e.params)) + first;
  O* out = global_ptr(static_cast<O*>(e.out)) + first;
  const int64_t step = static_cast<int64_t>(blockDim.x) * N;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * N; i < len; i += step) {
    // The independent loads first (mask, old average, then the particles four at a time), so
    // they are in flight together; the sums still add the particles in order.
    const AlignedVec<uint8_t, N> keep = load_keep<N>(e.mask, first + i);
    AlignedVec<O, N> average;
    if (!s.copy) {
      average = *reinterpret_cast<const AlignedVec<O, N>*>(out + i);
    }
    float total[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      total[j] = 0.f;
    }
    constexpr int kBatch = 4;
    int64_t p = 0;
    for (; p + kBatch <= s.particles; p += kBatch) {
      AlignedVec<P, N> x[kBatch];
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        x[q] = *reinterpret_cast<const AlignedVec<P, N>*>(params + (p + q) * e.numel + i);
      }
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
#pragma unroll
        for (int j = 0; j < N; ++j) {
          total[j] += to_float(x[q].v[j]);
        }
      }
    }
    for (; p < s.particles; ++p) {
      const AlignedVec<P, N> x = *reinterpret_cast<const AlignedVec<P, N>*>(params + p * e.numel + i);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        total[j] += to_float(x.v[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float mean = total[j] / s.particles_f;
      if (!s.copy) {
        const float current = to_float(average.v[j]);
        mean = current + (mean - current) / s.divisor;
      }
      average.v[j] = from_float<O>(keep.v[j] != 0 ? mean : 0.f);
    }
    *reinterpret_cast<AlignedVec<O, N>*>(out + i) = average;
  }
}

// One chunk: vectors of 16 bytes (of the wider dtype) where every operand and every particle
// slice is aligned, then single entries for the rest (the tail, or everything when unaligned).
template <typename P, typename O>
__device__ __forceinline__ void average_chunk(const AverageEntry& e, int64_t start, int64_t len,
                                              const AverageScalars& s) {
  constexpr int N = 16 / (sizeof(P) > sizeof(O) ? sizeof(P) : sizeof(O));
  int64_t vector_len = 0;
  if (vector_aligned<P, N>(e.params) && vector_aligned<O, N>(e.out) &&
      (e.mask == nullptr || vector_aligned<uint8_t, N>(e.mask)) && (s.particles == 1 || e.numel % N == 0)) {
    vector_len = len / N * N;
    average_range<P, O, N>(e, start, vector_len, s);
  }
  average_range<P, O, 1>(e, start + vector_len, len - vector_len, s);
}

template <typename P, typename O>
__global__ void __launch_bounds__(kThreads)
    swa_update_kernel(const __grid_constant__ TensorTable<AverageEntry> table, AverageScalars s) {
  for_each_chunk(table, [&](const AverageEntry& entry, int64_t start, int64_t len) {
    const AverageEntry e = entry;  // in registers: the stores cannot force reloads of the table
    average_chunk<P, O>(e, start, len, s);
  });
}

}  // namespace

cudaError_t launch_swa_update(const std::vector<AverageEntry>& entries, FloatType param_type,
                              FloatType out_type, int64_t particles, int64_t n_averaged, int device,
                              cudaStream_t stream) {
  if (particles <= 0 || n_averaged < 0) {
    return cudaErrorInvalidValue;
  }
  const AverageScalars s{particles, static_cast<float>(particles), static_cast<float>(n_averaged + 1),
                         n_averaged == 0};
  return dispatch_float(param_type, [&](auto param_tag) {
    return dispatch_float(out_type, [&](auto out_tag) {
      using P = decltype(param_tag);
      using O = decltype(out_tag);
      return launch_multi_tensor(swa_update_kernel<P, O>, entries, kChunk, kThreads, device, stream, s);
    });
  });
}

}  // namespace swamp
