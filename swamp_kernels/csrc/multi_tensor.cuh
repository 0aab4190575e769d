// Multi-tensor launch plumbing for the kernels of swamp_kernels._C (nvcc only, no torch headers).
//
// One launch walks a whole list of tensors (never concatenated), like apex's
// multi_tensor_apply and torch's fused optimizers. An op family defines an Entry in its
// <family>.h: a plain struct of per-tensor operands (raw pointers, sizes) with an
// `int64_t numel` member (elements of the work domain). launch_multi_tensor() cuts every
// tensor into chunks of `chunk` elements, builds a TensorTable (entries + chunk map) and
// launches ONE kernel. The table travels inside the kernel arguments when it fits in
// 4 KiB, else in a small device buffer from torch's caching allocator (device_upload.h).
// The kernel declares its parameter
// `const __grid_constant__ TensorTable<Entry> table` (sm_70+), so reading the inline table
// never copies it to local memory, and walks its work with for_each_chunk(). Per-launch
// scalars follow the table as further kernel arguments. Kernels on float tensors of several
// dtypes compute in float32 (to_float / from_float) and are instantiated per dtype with
// dispatch_float().
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "device_upload.h"
#include "float_type.h"

// Returns the error of a CUDA runtime call from the enclosing function (launchers return
// cudaError_t; the torch binding turns it into an exception with C10_CUDA_CHECK).
#define SWAMP_CUDA_TRY(expr)                 \
  do {                                       \
    const cudaError_t swamp_error_ = (expr); \
    if (swamp_error_ != cudaSuccess) {       \
      return swamp_error_;                   \
    }                                        \
  } while (0)

namespace swamp {

// Kernel parameters may take 4 KiB on every CUDA version and GPU we support.
constexpr size_t kKernelParamBytes = 4096;
constexpr size_t kTableHeaderBytes = 64;

// Chunk map: tensor t owns the launch's chunks [chunk_end[t-1], chunk_end[t]); chunk c covers
// elements [(c - chunk_end[t-1]) * chunk, ...) of tensor t, `chunk` of them at most.
template <typename Entry>
struct TensorTable {
  static constexpr int kInline =
      (kKernelParamBytes - kTableHeaderBytes) / (sizeof(Entry) + sizeof(int64_t));
  Entry inline_entries[kInline];
  int64_t inline_chunk_end[kInline];
  const Entry* entries;      // device copy when the table exceeds kInline tensors, else nullptr
  const int64_t* chunk_end;  // likewise
  int64_t num_chunks;
  int64_t chunk;             // elements per chunk
  int num_tensors;
};

// Runs body(entry, start, len) for every chunk of this block: elements [start, start + len)
// of the tensor described by `entry`. Blocks stride over the chunks (grid <= chunks).
template <typename Entry, typename Body>
__device__ __forceinline__ void for_each_chunk(const TensorTable<Entry>& table, Body&& body) {
  const Entry* entries = table.entries != nullptr ? table.entries : table.inline_entries;
  const int64_t* chunk_end = table.chunk_end != nullptr ? table.chunk_end : table.inline_chunk_end;
  for (int64_t c = blockIdx.x; c < table.num_chunks; c += gridDim.x) {
    int lo = 0;  // the first tensor whose chunk_end exceeds c
    int hi = table.num_tensors - 1;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (chunk_end[mid] > c) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    const Entry& entry = entries[lo];
    const int64_t start = (c - (lo == 0 ? 0 : chunk_end[lo - 1])) * table.chunk;
    const int64_t left = entry.numel - start;
    body(entry, start, left < table.chunk ? left : table.chunk);
  }
}

// N elements of T moved as one aligned memory transaction (16 bytes at most).
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

// float32 values of float / half / bfloat16 elements and back (round to nearest even).
// Intrinsics, not casts: torch's build defines __CUDA_NO_HALF_CONVERSIONS__.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Returns f(T{}) for the C++ element type T of `type` (float, __half or __nv_bfloat16):
// host code instantiates a kernel per dtype, e.g.
//   dispatch_float(type, [&](auto tag) { using T = decltype(tag); return launch<T>(...); });
template <typename F>
cudaError_t dispatch_float(FloatType type, F&& f) {
  switch (type) {
    case FloatType::kFloat32:
      return f(float{});
    case FloatType::kFloat16:
      return f(__half{});
    case FloatType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// `p` (never null) with the promise that it points to global memory: accesses through it
// compile to ld/st.global rather than generic ones, which the table's pointers would get.
template <typename T>
__device__ __forceinline__ T* global_ptr(T* p) {
  __builtin_assume(__isGlobal(p));
  return p;
}

// True when `p` may be read as AlignedVec<T, N> (one aligned vector load).
template <typename T, int N>
__host__ __device__ __forceinline__ bool vector_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(AlignedVec<T, N>) == 0;
}

template <typename T>
struct NonDeduced {
  using type = T;
};

// Cuts the tensors described by `entries` into chunks of `chunk` elements and runs
// kernel<<<grid, threads, 0, stream>>>(table, args...) once on `device` (the current device;
// `stream` must be its current stream, where a table too large to go inline is uploaded),
// grid = min(chunks, blocks that fit on the GPU at once). Nothing runs when all are empty.
// The per-launch scalars `args` share the kernel parameter space with the table: a few words.
template <typename Entry, typename... Args>
cudaError_t launch_multi_tensor(void (*kernel)(TensorTable<Entry>, Args...), const std::vector<Entry>& entries,
                                int64_t chunk, int threads, int device, cudaStream_t stream,
                                typename NonDeduced<Args>::type... args) {
  using Table = TensorTable<Entry>;
  static_assert(sizeof(Table) + (sizeof(Args) + ... + 0) <= kKernelParamBytes,
                "TensorTable and scalar arguments exceed the kernel parameter limit");
  static_assert(alignof(Entry) <= alignof(int64_t), "Entry must not need more than 8-byte alignment");
  const size_t n = entries.size();
  if (chunk <= 0 || threads <= 0 || n > static_cast<size_t>(INT32_MAX)) {
    return cudaErrorInvalidValue;
  }
  std::vector<int64_t> chunk_end(n);
  int64_t num_chunks = 0;
  for (size_t t = 0; t < n; ++t) {
    num_chunks += (entries[t].numel + chunk - 1) / chunk;
    chunk_end[t] = num_chunks;
  }
  if (num_chunks == 0) {
    return cudaSuccess;
  }
  int sms = 0;
  int blocks_per_sm = 0;
  SWAMP_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  SWAMP_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, threads, 0));
  const int64_t resident = std::max<int64_t>(1, static_cast<int64_t>(sms) * blocks_per_sm);
  const auto grid = static_cast<unsigned>(std::min(num_chunks, resident));

  Table table{};
  table.num_chunks = num_chunks;
  table.chunk = chunk;
  table.num_tensors = static_cast<int>(n);
  DeviceUpload device_table;  // alive until the launch is queued
  if (n <= static_cast<size_t>(Table::kInline)) {
    std::memcpy(table.inline_entries, entries.data(), n * sizeof(Entry));
    std::memcpy(table.inline_chunk_end, chunk_end.data(), n * sizeof(int64_t));
  } else {
    // One upload: the entries, then (8-byte aligned) the chunk ends.
    const size_t entry_bytes = (n * sizeof(Entry) + 7) / 8 * 8;
    std::vector<char> bytes(entry_bytes + n * sizeof(int64_t));
    std::memcpy(bytes.data(), entries.data(), n * sizeof(Entry));
    std::memcpy(bytes.data() + entry_bytes, chunk_end.data(), n * sizeof(int64_t));
    device_table = upload_to_current_device(bytes.data(), bytes.size());
    const char* d = static_cast<const char*>(device_table.ptr);
    table.entries = reinterpret_cast<const Entry*>(d);
    table.chunk_end = reinterpret_cast<const int64_t*>(d + entry_bytes);
  }
  kernel<<<grid, threads, 0, stream>>>(table, args...);
  return cudaGetLastError();
}

}  // namespace swamp
