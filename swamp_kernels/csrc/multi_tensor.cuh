// Multi-tensor launch plumbing for the kernels of swamp_kernels._C (nvcc only, no torch headers).
//
// One launch walks a whole list of tensors (never concatenated), like apex's
// multi_tensor_apply and torch's fused optimizers. An op family defines an Entry in its
// <family>.h: a plain struct of per-tensor operands (raw pointers, sizes) with an
// `int64_t numel` member (elements of the work domain). launch_multi_tensor() cuts every
// tensor into chunks of `chunk` elements, builds a TensorTable (entries + chunk map) and
// launches ONE kernel. The table travels inside the kernel arguments when it fits in
// 4 KiB, else in a small stream-ordered device buffer. The kernel declares its parameter
// `const __grid_constant__ TensorTable<Entry> table` (sm_70+), so reading the inline table
// never copies it to local memory, and walks its work with for_each_chunk().
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <cuda_runtime.h>

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

// Device memory from cudaMallocAsync, freed in stream order (after queued work) on scope exit.
struct StreamOrderedBuffer {
  void* ptr = nullptr;
  cudaStream_t stream = nullptr;
  StreamOrderedBuffer() = default;
  StreamOrderedBuffer(const StreamOrderedBuffer&) = delete;
  StreamOrderedBuffer& operator=(const StreamOrderedBuffer&) = delete;
  ~StreamOrderedBuffer() {
    if (ptr != nullptr) {
      cudaFreeAsync(ptr, stream);
    }
  }
};

// Cuts the tensors described by `entries` into chunks of `chunk` elements and runs
// kernel<<<grid, threads, 0, stream>>>(table) once on `device` (the current device),
// grid = min(chunks, blocks that fit on the GPU at once). Nothing runs when all are empty.
template <typename Entry>
cudaError_t launch_multi_tensor(void (*kernel)(TensorTable<Entry>), const std::vector<Entry>& entries,
                                int64_t chunk, int threads, int device, cudaStream_t stream) {
  using Table = TensorTable<Entry>;
  static_assert(sizeof(Table) <= kKernelParamBytes, "TensorTable exceeds the kernel parameter limit");
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
  StreamOrderedBuffer device_table;
  if (n <= static_cast<size_t>(Table::kInline)) {
    std::memcpy(table.inline_entries, entries.data(), n * sizeof(Entry));
    std::memcpy(table.inline_chunk_end, chunk_end.data(), n * sizeof(int64_t));
  } else {
    // A pageable-to-device cudaMemcpyAsync has staged its source when it returns, so the
    // host vectors may go before the copy lands.
    const size_t entry_bytes = (n * sizeof(Entry) + 7) / 8 * 8;
    device_table.stream = stream;
    SWAMP_CUDA_TRY(cudaMallocAsync(&device_table.ptr, entry_bytes + n * sizeof(int64_t), stream));
    char* d = static_cast<char*>(device_table.ptr);
    SWAMP_CUDA_TRY(cudaMemcpyAsync(d, entries.data(), n * sizeof(Entry), cudaMemcpyHostToDevice, stream));
    SWAMP_CUDA_TRY(cudaMemcpyAsync(d + entry_bytes, chunk_end.data(), n * sizeof(int64_t),
                                   cudaMemcpyHostToDevice, stream));
    table.entries = reinterpret_cast<const Entry*>(d);
    table.chunk_end = reinterpret_cast<const int64_t*>(d + entry_bytes);
  }
  kernel<<<grid, threads, 0, stream>>>(table);
  return cudaGetLastError();
}

}  // namespace swamp
