// Global / layerwise magnitude pruning: a multi-tensor radix select (one launch per pass,
// the tensors read in place through the table of multi_tensor.cuh, never concatenated).
//
// Keys: each candidate's float32 bit pattern (exact for float16/bfloat16) mapped to a
// uint32 whose order is the float order: |w| shifts the sign bit out; a score folds -0.0
// into +0.0, then flips negatives and sets the sign bit of non-negatives. A segment is every
// tensor (global) or one tensor (layerwise); each finds its k-th largest key, k = n - n_prune.
//
// - Passes: four 8-bit digits, most significant first. A pass adds per-block shared
//   histograms of the next digit over the keys inside the segment's bucket (the keys
//   sharing the digits fixed so far) into the segment's global histogram; pick_kernel (a
//   block per segment) then narrows the bucket to the digit holding the k-th largest key
//   and updates k, on the device. n_prune comes from n and `amount` there too (rint: half
//   to even). Each thread loads kItems elements of a tile before using any (ILP).
// - Compaction: once a bucket fits in the free part of the compact buffer, the next pass
//   over the tensors also copies its keys (with their chunk numbers) there; later passes
//   read only the buffer.
// - Early exit: a segment is done as soon as its bucket is to be kept whole (or n_prune is
//   0 or n); otherwise after four digits the bucket is one key value: the threshold.
// - Masks: keys above the bucket are kept; keys inside it are kept whole, or (ties at the
//   threshold) in global index order while their rank is below k. A tie's rank is the
//   exclusive scan over chunks (chunk order is global order) of per-chunk tie counts
//   (counted from the buffer when compacted) plus an in-block scan.
// Nothing waits for the device: the caller reads `status` (counts, NaN/Inf flags) once.
#include <cuda_fp16.h>
#include <cooperative_groups.h>

#include <climits>

#include "magnitude_prune.h"
#include "multi_tensor.cuh"

namespace swamp {
namespace {

namespace cg = cooperative_groups;

constexpr int64_t kChunk = 16384;                 // elements per chunk of a pass over the tensors
constexpr int kThreads = 256;                     // threads per block (a multiple of 32)
constexpr int kItems = 4;                         // elements per thread per tile, loaded up front
constexpr int64_t kTile = int64_t{kThreads} * kItems;
constexpr int kBins = 256;                        // 8-bit digits
constexpr int kScanThreads = 1024;                // the single block scanning the chunk tie counts
constexpr int64_t kCompactCapacity = int64_t{1} << 21;  // compact-buffer keys, shared by segments
constexpr int kBufferBlocks = 256;                // blocks over the compact buffer, shared by segments
constexpr long long kAll = LLONG_MAX;             // quota: every key of the bucket is kept

// Search state of a segment.
enum Mode : int { kScan = 0, kGather = 1, kCompact = 2, kDone = 3 };

struct SegmentState {
  unsigned long long hist[kBins];  // counts of the next digit inside the bucket (zeroed by pick)
  unsigned long long buf_count;    // keys gathered into the segment's buffer region so far
  long long buf_begin;             // the region: buf_key/buf_chunk[buf_begin, + buf_size)
  long long buf_size;
  long long keep;                  // keys still to keep inside the bucket
  long long quota;                 // kDone: bucket keys kept: kAll, or the first `quota` by index
  unsigned prefix;                 // the bucket: keys whose top 8 * depth bits equal prefix
  int depth;
  int mode;
  int need_rank;                   // kDone with 0 < quota < bucket size: ties ranked by index
  int compacted;                   // the final bucket's keys are all in the buffer region
};

struct Context {
  SegmentState* seg;
  long long* status;               // [segments] candidate counts, then [tensors] NaN/Inf flags
  unsigned long long* ties;        // per chunk: tie count, then its exclusive scan
  unsigned* buf_key;
  unsigned* buf_chunk;
  long long buf_capacity;
  unsigned long long buf_used;     // buffer keys handed out to segments (at most capacity)
  long long num_chunks;
  double amount;
  int num_segments;
  int amount_is_count;
  int signed_keys;
  int layerwise;
};

struct PruneEntry {
  const void* keys;
  const uint8_t* mask;
  uint8_t* out;
  int64_t numel;
  Context* ctx;
  int64_t first_chunk;  // the launch-wide number of this tensor's first chunk
  int32_t tensor;       // index in the caller's list
  int32_t dtype;
};

// ------------------------------------------------------------------ element helpers
__device__ __forceinline__ uint32_t float32_bits(const PruneEntry& e, int64_t i) {
  if (e.dtype == kPruneFloat32) {
    return static_cast<const uint32_t*>(e.keys)[i];
  }
  const unsigned short h = static_cast<const unsigned short*>(e.keys)[i];
  if (e.dtype == kPruneFloat16) {
    return __float_as_uint(__half2float(__ushort_as_half(h)));
  }
  return static_cast<uint32_t>(h) << 16;  // bfloat16: the top half of a float32
}

__device__ __forceinline__ bool is_nonfinite(uint32_t bits) {
  return (bits & 0x7f800000u) == 0x7f800000u;
}

__device__ __forceinline__ uint32_t order_key(uint32_t bits, bool signed_keys) {
  if (!signed_keys) {
    return bits << 1;  // |w|: the sign bit dropped, so the first digit holds 8 exponent bits
  }
  if (bits == 0x80000000u) {
    bits = 0;
  }
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ bool is_candidate(const PruneEntry& e, int64_t i) {
  return e.mask == nullptr || e.mask[i] != 0;
}

// The bucket of `key` after `depth` digits (0 for every key at depth 0).
__device__ __forceinline__ uint32_t bucket_of(uint32_t key, int depth) {
  return depth == 0 ? 0u : key >> (32 - 8 * depth);
}

__device__ __forceinline__ uint32_t digit_of(uint32_t key, int depth) {
  return (key >> (24 - 8 * depth)) & (kBins - 1);
}

__device__ __forceinline__ SegmentState& segment_of(const PruneEntry& e) {
  return e.ctx->seg[e.ctx->layerwise ? e.tensor : 0];
}

// This thread's elements of the tile at chunk offset `base`: item j is element
// base + j * kThreads + threadIdx.x, so item j of the block is a run in index order.
// All loads are issued before any is used; non-candidates read as bits 0.
struct Items {
  uint32_t bits[kItems];
  bool candidate[kItems];
};

__device__ __forceinline__ int64_t item_offset(int64_t base, int j) {
  return base + j * kThreads + threadIdx.x;
}

__device__ __forceinline__ Items load_items(const PruneEntry& e, int64_t start, int64_t len, int64_t base) {
  Items items;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t local = item_offset(base, j);
    items.candidate[j] = local < len && is_candidate(e, start + local);
  }
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    items.bits[j] = items.candidate[j] ? float32_bits(e, start + item_offset(base, j)) : 0u;
  }
  return items;
}

// ------------------------------------------------------------------- histograms
// Adds 1 to hist[digit] for every lane with `counted`, one shared atomic per distinct digit
// of the warp. All 32 lanes must call it.
__device__ __forceinline__ void count_digit(unsigned* hist, bool counted, uint32_t digit) {
  const uint32_t value = counted ? digit : kBins;
  const unsigned peers = __match_any_sync(0xffffffffu, value);
  if (counted && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) {
    atomicAdd(&hist[digit], static_cast<unsigned>(__popc(peers)));
  }
}

// Adds the block's shared histogram into st's (if any) and zeroes it. Block-uniform.
__device__ __forceinline__ void flush_histogram(unsigned* hist, SegmentState* st) {
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
    if (st != nullptr && hist[b] != 0) {
      atomicAdd(&st->hist[b], static_cast<unsigned long long>(hist[b]));
    }
    hist[b] = 0;
  }
  __syncthreads();
}

// One pass over the tensors for every segment still scanning: the histogram of its next
// digit inside its bucket; in gather mode also the bucket's keys into the buffer. The first
// pass (depth 0) also flags tensors with a NaN/Inf candidate.
__global__ void __launch_bounds__(kThreads)
    histogram_kernel(const __grid_constant__ TensorTable<PruneEntry> table) {
  __shared__ unsigned hist[kBins];
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
    hist[b] = 0;
  }
  __syncthreads();
  SegmentState* pending = nullptr;  // the segment whose counts `hist` holds
  for_each_chunk(table, [&](const PruneEntry& e, int64_t start, int64_t len) {
    const Context& ctx = *e.ctx;
    SegmentState& st = segment_of(e);
    const int mode = st.mode;
    if (mode != kScan && mode != kGather) {
      return;
    }
    if (&st != pending) {
      flush_histogram(hist, pending);
      pending = &st;
    }
    const int depth = st.depth;
    const uint32_t prefix = st.prefix;
    const unsigned chunk = static_cast<unsigned>(e.first_chunk + start / kChunk);
    bool nonfinite = false;
    for (int64_t base = 0; base < len; base += kTile) {
      const Items items = load_items(e, start, len, base);
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        nonfinite |= items.candidate[j] && is_nonfinite(items.bits[j]);
        const uint32_t key = order_key(items.bits[j], ctx.signed_keys != 0);
        const bool in_bucket = items.candidate[j] && bucket_of(key, depth) == prefix;
        count_digit(hist, in_bucket, digit_of(key, depth));
        if (mode == kGather && in_bucket) {
          const cg::coalesced_group group = cg::coalesced_threads();
          unsigned long long slot = 0;
          if (group.thread_rank() == 0) {
            slot = atomicAdd(&st.buf_count, static_cast<unsigned long long>(group.size()));
          }
          slot = group.shfl(slot, 0) + group.thread_rank();
          if (slot < static_cast<unsigned long long>(st.buf_size)) {
            ctx.buf_key[st.buf_begin + slot] = key;
            ctx.buf_chunk[st.buf_begin + slot] = chunk;
          }
        }
      }
    }
    if (depth == 0 && __syncthreads_or(nonfinite) && threadIdx.x == 0) {
      ctx.status[ctx.num_segments + e.tensor] = 1;
    }
  });
  flush_histogram(hist, pending);
}

// The same histogram for every segment whose bucket lies in the compact buffer.
// Grid: (blocks per segment, segments), segments strided over gridDim.y.
__global__ void __launch_bounds__(kThreads) buffer_histogram_kernel(Context* ctx) {
  __shared__ unsigned hist[kBins];
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
    hist[b] = 0;
  }
  __syncthreads();
  for (int s = blockIdx.y; s < ctx->num_segments; s += gridDim.y) {
    SegmentState& st = ctx->seg[s];
    if (st.mode != kCompact) {
      continue;
    }
    const int depth = st.depth;
    const uint32_t prefix = st.prefix;
    const long long count = static_cast<long long>(st.buf_count);
    const unsigned* keys = ctx->buf_key + st.buf_begin;
    for (long long base = static_cast<long long>(blockIdx.x) * blockDim.x; base < count;
         base += static_cast<long long>(gridDim.x) * blockDim.x) {
      const long long i = base + threadIdx.x;
      const uint32_t key = i < count ? keys[i] : 0u;
      count_digit(hist, i < count && bucket_of(key, depth) == prefix, digit_of(key, depth));
    }
    flush_histogram(hist, &st);
  }
}

// ---------------------------------------------------------------------------- scans
// Inclusive prefix sum over the block, in place in shared `scan` (Hillis-Steele): thread
// t < kN (all kN threads of the block take part) stores `value` at scan[t], and on return
// scan[t] holds the values of threads 0 .. t. Block-uniform; ends synchronised.
template <int kN>
__device__ __forceinline__ void block_inclusive_scan(unsigned long long* scan, int t, unsigned long long value) {
  scan[t] = value;
  __syncthreads();
  for (int offset = 1; offset < kN; offset <<= 1) {
    const unsigned long long add = t >= offset ? scan[t - offset] : 0ull;
    __syncthreads();
    scan[t] += add;
    __syncthreads();
  }
}

// ------------------------------------------------------------------------ selection
// Blocks of kBins threads, segments strided over the blocks: n and k on the first pass,
// then the digit holding the k-th largest key of the bucket, and the segment's next mode.
__global__ void __launch_bounds__(kBins) pick_kernel(Context* ctx) {
  __shared__ unsigned long long scan[kBins];
  __shared__ long long shared_keep;
  __shared__ int shared_active;
  const int t = threadIdx.x;
  const uint32_t digit = kBins - 1 - t;  // thread t holds the t-th largest digit
  for (int s = blockIdx.x; s < ctx->num_segments; s += gridDim.x) {
    SegmentState& st = ctx->seg[s];
    const int mode = st.mode;
    if (mode == kDone) {
      continue;
    }
    const unsigned long long h = st.hist[digit];
    st.hist[digit] = 0;
    block_inclusive_scan<kBins>(scan, t, h);
    const unsigned long long inclusive = scan[t];  // keys with a digit >= this thread's
    if (t == 0) {
      long long keep = st.keep;
      int active = 1;
      if (st.depth == 0) {
        const long long n = static_cast<long long>(scan[kBins - 1]);
        ctx->status[s] = n;
        const long long n_prune = ctx->amount_is_count
                                      ? min(static_cast<long long>(ctx->amount), n)
                                      : static_cast<long long>(rint(ctx->amount * static_cast<double>(n)));
        keep = n - n_prune;
        if (keep == 0 || keep == n) {  // all candidates pruned / all kept
          st.mode = kDone;
          st.quota = keep == 0 ? 0 : kAll;
          active = 0;
        }
      }
      shared_keep = keep;
      shared_active = active;
    }
    __syncthreads();
    const long long keep = shared_keep;
    const long long exclusive = static_cast<long long>(inclusive - h);
    if (shared_active && exclusive < keep && keep <= static_cast<long long>(inclusive)) {
      const long long left = keep - exclusive;
      const int depth = st.depth + 1;
      st.prefix = (st.prefix << 8) | digit;
      st.depth = depth;
      st.keep = left;
      if (left == static_cast<long long>(h)) {
        st.mode = kDone;
        st.quota = kAll;
      } else if (depth == 4) {
        st.mode = kDone;
        st.quota = left;
        st.need_rank = 1;
      } else if (mode == kGather) {
        st.mode = kCompact;
      } else if (mode == kScan && static_cast<long long>(h) <= ctx->buf_capacity) {
        // First come, first served: a region that does not fit leaves the segment scanning
        // (and takes nothing, so later, smaller regions may still fit).
        const auto capacity = static_cast<unsigned long long>(ctx->buf_capacity);
        unsigned long long begin = *static_cast<volatile unsigned long long*>(&ctx->buf_used);
        while (begin + h <= capacity) {
          const unsigned long long seen = atomicCAS(&ctx->buf_used, begin, begin + h);
          if (seen == begin) {
            st.mode = kGather;
            st.compacted = 1;
            st.buf_begin = static_cast<long long>(begin);
            st.buf_size = static_cast<long long>(h);
            break;
          }
          begin = seen;
        }
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------- ties
// Per chunk of a segment with ranked ties that were not compacted: how many ties it holds.
__global__ void __launch_bounds__(kThreads) tie_count_kernel(const __grid_constant__ TensorTable<PruneEntry> table) {
  for_each_chunk(table, [&](const PruneEntry& e, int64_t start, int64_t len) {
    const Context& ctx = *e.ctx;
    const SegmentState& st = segment_of(e);
    if (!st.need_rank || st.compacted) {
      return;
    }
    const uint32_t threshold = st.prefix;
    unsigned long long count = 0;
    for (int64_t base = 0; base < len; base += kTile) {
      const Items items = load_items(e, start, len, base);
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const bool tie = items.candidate[j] && order_key(items.bits[j], ctx.signed_keys != 0) == threshold;
        count += static_cast<unsigned long long>(__syncthreads_count(tie));
      }
    }
    if (threadIdx.x == 0) {
      ctx.ties[e.first_chunk + start / kChunk] = count;
    }
  });
}

// The same counts from the compact buffer, for segments whose ties all lie there.
__global__ void __launch_bounds__(kThreads) buffer_tie_count_kernel(Context* ctx) {
  for (int s = blockIdx.y; s < ctx->num_segments; s += gridDim.y) {
    const SegmentState& st = ctx->seg[s];
    if (!st.need_rank || !st.compacted) {
      continue;
    }
    const long long count = static_cast<long long>(st.buf_count);
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
      if (ctx->buf_key[st.buf_begin + i] == st.prefix) {
        atomicAdd(&ctx->ties[ctx->buf_chunk[st.buf_begin + i]], 1ull);
      }
    }
  }
}

// One block: ties[c] becomes the number of ties in chunks before c.
__global__ void __launch_bounds__(kScanThreads) scan_ties_kernel(Context* ctx) {
  __shared__ unsigned long long sums[kScanThreads];
  const int t = threadIdx.x;
  const long long chunks = ctx->num_chunks;
  const long long per_thread = (chunks + kScanThreads - 1) / kScanThreads;
  const long long lo = min(chunks, t * per_thread);
  const long long hi = min(chunks, lo + per_thread);
  unsigned long long sum = 0;
  for (long long c = lo; c < hi; ++c) {
    sum += ctx->ties[c];
  }
  block_inclusive_scan<kScanThreads>(sums, t, sum);
  unsigned long long before = sums[t] - sum;
  for (long long c = lo; c < hi; ++c) {
    const unsigned long long count = ctx->ties[c];
    ctx->ties[c] = before;
    before += count;
  }
}

// --------------------------------------------------------------------------- masks
// out = candidate and (key above the bucket, or inside it and within the quota by rank).
__global__ void __launch_bounds__(kThreads) write_masks_kernel(const __grid_constant__ TensorTable<PruneEntry> table) {
  constexpr int kWarps = kThreads / 32;
  __shared__ unsigned warp_ties[kWarps];
  for_each_chunk(table, [&](const PruneEntry& e, int64_t start, int64_t len) {
    const Context& ctx = *e.ctx;
    const SegmentState& st = segment_of(e);
    const int depth = st.depth;
    const uint32_t prefix = st.prefix;
    const long long quota = st.quota;
    const bool ranked = st.need_rank != 0;
    long long rank = 0;  // ties of the segment before this tile
    if (ranked) {
      const int64_t segment_first_chunk = ctx.layerwise ? e.first_chunk : 0;
      rank = static_cast<long long>(ctx.ties[e.first_chunk + start / kChunk] - ctx.ties[segment_first_chunk]);
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    for (int64_t base = 0; base < len; base += kTile) {
      const Items items = load_items(e, start, len, base);
#pragma unroll
      for (int j = 0; j < kItems; ++j) {  // item j of the block: the next kThreads elements
        const uint32_t bucket = bucket_of(order_key(items.bits[j], ctx.signed_keys != 0), depth);
        bool keep = items.candidate[j] && bucket > prefix;
        const bool tie = items.candidate[j] && bucket == prefix;
        if (ranked) {
          const unsigned ballot = __ballot_sync(0xffffffffu, tie);
          if (lane == 0) {
            warp_ties[warp] = __popc(ballot);
          }
          __syncthreads();
          long long before = rank + __popc(ballot & ((1u << lane) - 1u));
          for (int w = 0; w < kWarps; ++w) {
            before += w < warp ? warp_ties[w] : 0u;
            rank += warp_ties[w];
          }
          __syncthreads();
          keep = keep || (tie && before < quota);
        } else {
          keep = keep || (tie && quota != 0);
        }
        const int64_t local = item_offset(base, j);
        if (local < len) {
          e.out[start + local] = keep ? 1 : 0;
        }
      }
    }
  });
}

__global__ void store_context_kernel(Context value, Context* ctx) { *ctx = value; }

// ---------------------------------------------------------------------------- host
size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

struct Layout {
  int64_t num_chunks = 0;
  int64_t capacity = 0;
  int segments = 0;
  size_t seg = 0, ties = 0, buf_key = 0, buf_chunk = 0, bytes = 0;  // byte offsets, total
};

Layout plan(const std::vector<PruneTensor>& tensors, bool layerwise) {
  Layout l;
  int64_t total = 0;
  for (const PruneTensor& t : tensors) {
    l.num_chunks += (t.numel + kChunk - 1) / kChunk;
    total += t.numel;
  }
  l.capacity = std::min(kCompactCapacity, total);
  l.segments = layerwise ? static_cast<int>(tensors.size()) : 1;
  l.seg = align_up(sizeof(Context));
  l.ties = l.seg + align_up(sizeof(SegmentState) * l.segments);
  l.buf_key = l.ties + align_up(sizeof(unsigned long long) * l.num_chunks);
  l.buf_chunk = l.buf_key + align_up(sizeof(unsigned) * l.capacity);
  l.bytes = l.buf_chunk + align_up(sizeof(unsigned) * l.capacity);
  return l;
}

}  // namespace

size_t magnitude_prune_workspace_bytes(const std::vector<PruneTensor>& tensors, bool layerwise) {
  return plan(tensors, layerwise).bytes;
}

cudaError_t launch_magnitude_prune(const std::vector<PruneTensor>& tensors, const PruneParams& params,
                                   void* workspace, int64_t* status, int device, cudaStream_t stream) {
  if (tensors.size() > static_cast<size_t>(INT32_MAX)) {
    return cudaErrorInvalidValue;
  }
  const Layout l = plan(tensors, params.layerwise);
  char* ws = static_cast<char*>(workspace);
  auto* ctx = reinterpret_cast<Context*>(ws);
  Context value{};
  value.seg = reinterpret_cast<SegmentState*>(ws + l.seg);
  value.status = reinterpret_cast<long long*>(status);
  value.ties = reinterpret_cast<unsigned long long*>(ws + l.ties);
  value.buf_key = reinterpret_cast<unsigned*>(ws + l.buf_key);
  value.buf_chunk = reinterpret_cast<unsigned*>(ws + l.buf_chunk);
  value.buf_capacity = l.capacity;
  value.num_chunks = l.num_chunks;
  value.amount = params.amount;
  value.num_segments = l.segments;
  value.amount_is_count = params.amount_is_count;
  value.signed_keys = params.signed_keys;
  value.layerwise = params.layerwise;

  std::vector<PruneEntry> entries;
  entries.reserve(tensors.size());
  int64_t first_chunk = 0;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const PruneTensor& x = tensors[t];
    if (x.numel > 0) {
      entries.push_back({x.keys, x.mask, x.out, x.numel, ctx, first_chunk, static_cast<int32_t>(t), x.dtype});
      first_chunk += (x.numel + kChunk - 1) / kChunk;
    }
  }

  // Search states and tie counts start at zero (kScan, depth 0); status too.
  SWAMP_CUDA_TRY(cudaMemsetAsync(ws + l.seg, 0, l.buf_key - l.seg, stream));
  SWAMP_CUDA_TRY(cudaMemsetAsync(status, 0, sizeof(int64_t) * (l.segments + tensors.size()), stream));
  store_context_kernel<<<1, 1, 0, stream>>>(value, ctx);
  SWAMP_CUDA_TRY(cudaGetLastError());

  const dim3 buffer_grid(std::max(1, kBufferBlocks / l.segments), std::min(l.segments, 65535));
  for (int depth = 0; depth < 4; ++depth) {
    SWAMP_CUDA_TRY(launch_multi_tensor(histogram_kernel, entries, kChunk, kThreads, device, stream));
    if (depth >= 2) {  // a bucket gathered in pass depth - 1 is read from the buffer from here on
      buffer_histogram_kernel<<<buffer_grid, kThreads, 0, stream>>>(ctx);
      SWAMP_CUDA_TRY(cudaGetLastError());
    }
    pick_kernel<<<std::min(l.segments, 65535), kBins, 0, stream>>>(ctx);
    SWAMP_CUDA_TRY(cudaGetLastError());
  }
  SWAMP_CUDA_TRY(launch_multi_tensor(tie_count_kernel, entries, kChunk, kThreads, device, stream));
  buffer_tie_count_kernel<<<buffer_grid, kThreads, 0, stream>>>(ctx);
  SWAMP_CUDA_TRY(cudaGetLastError());
  if (l.num_chunks > 0) {
    scan_ties_kernel<<<1, kScanThreads, 0, stream>>>(ctx);
    SWAMP_CUDA_TRY(cudaGetLastError());
  }
  return launch_multi_tensor(write_masks_kernel, entries, kChunk, kThreads, device, stream);
}

}  // namespace swamp
