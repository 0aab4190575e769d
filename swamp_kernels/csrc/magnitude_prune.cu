// Global / layerwise magnitude pruning: a multi-tensor radix select that reads the tensors
// about twice (the tensors read in place through the table of multi_tensor.cuh, never
// concatenated).
//
// Keys: each candidate's float32 bit pattern (exact for float16/bfloat16) mapped to a
// uint32 whose order is the float order: |w| shifts the sign bit out (so a 12-bit first
// digit is the 8 exponent bits and 4 mantissa bits: buckets of 1/16 octave); a score folds
// -0.0 into +0.0, then flips negatives and sets the sign bit of non-negatives. A segment is
// every tensor (global) or one tensor (layerwise); each finds its k-th largest key,
// k = n - n_prune (n_prune from n and `amount` on the device: rint, half to even).
//
// - Digits: 12, 10, 10 bits, most significant first. A digit pass adds per-block shared
//   histograms (4096 / 1024 bins, one shared atomic per distinct digit of a warp) of the
//   next digit over the keys of the segment's bucket [lo, hi] into its global histogram;
//   pick_kernel then narrows the bucket to the digit holding the k-th largest key, updates
//   k and sets the segment's next mode, on the device.
// - Gathering: pass 0 leaves typically 1-3% of normal weights in the bucket of a 20%
//   quantile, so a buffer region of n_s / 16 keys per segment (at least min(n_s, 4096))
//   holds it. The next pass over the tensors then writes the final mask of every element
//   outside the bucket (above: kept; below or not a candidate: pruned), writes 0 for the
//   bucket's keys and copies them with their positions to the buffer (staged in shared
//   memory: one global atomic per chunk). Later digits, the tie counts and the final write
//   read only the buffer.
// - Early exits: a bucket to be kept or pruned whole is emptied (hi < lo: keep the keys
//   above hi); the next pass over the tensors (or the final kernel) writes those masks.
// - Ties at the final key are kept in global index order while their rank is below k. The
//   rank is the segment's ties in earlier chunks (exclusive scan of per-chunk tie counts;
//   chunk order is global order) plus an in-chunk rank. Only one chunk of a gathered
//   segment straddles k: its block ranks its ties by re-reading that chunk; the other
//   gathered ties are kept or pruned with their chunk. A bucket that never fits the buffer
//   (heavy ties, all-equal keys) is ranked over the tensors.
//
// Bytes per element (keys of b bytes, masks of m = 0 or 1 byte, output 1 byte; floor
// b + m + 1): typical inputs read keys + masks twice (pass 0, gathering pass 1) and write
// the masks once: 2(b + m) + 1, plus ~12 bytes per gathered key (1-3% of elements) a few
// times. float32 unmasked: 9 / 5 = 1.8x the floor (was ~3.5x). Heavy ties: up to five
// reads. Launches per call, fixed: the context store (which zeroes the state), 3 x (digit
// pass + pick), tie counts, their scan and the final kernel = 10; buffer work rides in the
// launches over the tensors. Nothing waits for the device: the caller reads `status` (counts,
// NaN/Inf flags) once.
#include <cuda_fp16.h>
#include <cooperative_groups.h>

#include "magnitude_prune.h"
#include "multi_tensor.cuh"

namespace swamp {
namespace {

namespace cg = cooperative_groups;

constexpr int64_t kChunk = 16384;        // elements per chunk of a pass over the tensors
constexpr int kThreads = 256;            // threads per block (a multiple of 32)
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;                // elements per thread per tile, loaded up front
constexpr int64_t kTile = int64_t{kThreads} * kItems;
constexpr int kPasses = 3;               // digits: 12, 10, 10 bits
constexpr int kMaxBins = 4096;
constexpr int kStage = 2048;             // gathered keys staged per block (>= kTile)
constexpr int kPickThreads = 256;        // kMaxBins / kPickThreads bins per thread of the pick
constexpr int kScanThreads = 1024;       // the single block scanning the chunk tie counts
constexpr long long kBufferDivisor = 16;
constexpr long long kBufferMin = 4096;
constexpr long long kInitWords = 64 * kThreads;  // words zeroed per block of the first launch
static_assert(kStage >= kTile && kMaxBins % kPickThreads == 0, "stage or pick sizes");

__host__ __device__ constexpr int digit_shift(int pass) { return pass == 0 ? 20 : pass == 1 ? 10 : 0; }
__host__ __device__ constexpr int digit_bins(int pass) { return pass == 0 ? 4096 : 1024; }

// Buffer keys of a segment of `numel` elements: numel / 16, at least min(numel, 4096).
__host__ __device__ constexpr long long buffer_capacity(long long numel) {
  return numel / kBufferDivisor > kBufferMin ? numel / kBufferDivisor : (numel < kBufferMin ? numel : kBufferMin);
}

// What a segment does next.
enum Mode : int {
  kScan = 0,      // bucket in the tensors; the next pass narrows it
  kGather = 1,    // the next pass over the tensors writes the masks and gathers the bucket
  kWrite = 2,     // bucket decided (empty) before gathering; masks not yet written
  kCompact = 3,   // bucket in the buffer, the other masks written
  kCompactDone = 4,  // as kCompact, bucket decided (empty)
  kFinished = 5,  // masks written
};

struct SegmentState {
  unsigned long long hist[kMaxBins];  // counts of the next digit inside the bucket (zeroed by pick)
  unsigned long long numel;           // elements of the segment's tensors (pass 0)
  unsigned long long buf_begin;       // buffer region: buf_key/buf_pos[buf_begin, + buf_count)
  unsigned long long buf_count;
  long long first_chunk;              // launch-wide number of the segment's first chunk
  long long lo, hi;                   // bucket: keys in [lo, hi]; hi < lo: empty, keys > hi kept
  long long keep;                     // keys still to keep inside the bucket
  int mode;
};

struct Context {
  SegmentState* seg;
  long long* status;               // [segments] candidate counts, then [tensors] NaN/Inf flags
  unsigned long long* ties;        // [chunks + 1]: per chunk tie count, then its exclusive scan
  uint8_t** chunk_out;             // per chunk of a gathering segment: its first mask byte
  unsigned* buf_key;
  unsigned long long* buf_pos;     // launch-wide chunk * kChunk + offset in the chunk
  unsigned long long buf_used;     // buffer keys handed out to segments
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
  int64_t first_chunk;  // the launch-wide number of this tensor's first chunk
  int32_t tensor;       // index in the caller's list
  int32_t dtype;
};

// ------------------------------------------------------------------ element helpers
// The float32 bit pattern of a key loaded as `raw` (its own bits for float32, the low 16 bits
// for float16/bfloat16).
__device__ __forceinline__ uint32_t float32_bits(int32_t dtype, uint32_t raw) {
  if (dtype == kPruneFloat32) {
    return raw;
  }
  if (dtype == kPruneFloat16) {
    return __float_as_uint(__half2float(__ushort_as_half(static_cast<unsigned short>(raw))));
  }
  return raw << 16;  // bfloat16: the top half of a float32
}

__device__ __forceinline__ bool is_nonfinite(uint32_t bits) {
  return (bits & 0x7f800000u) == 0x7f800000u;
}

__device__ __forceinline__ uint32_t order_key(uint32_t bits, bool signed_keys) {
  if (!signed_keys) {
    return bits << 1;  // |w|: the sign bit dropped
  }
  if (bits == 0x80000000u) {
    bits = 0;
  }
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ bool in_range(uint32_t key, long long lo, long long hi) {
  return lo <= static_cast<long long>(key) && static_cast<long long>(key) <= hi;
}

__device__ __forceinline__ SegmentState& segment_of(const Context& ctx, const PruneEntry& e) {
  return ctx.seg[ctx.layerwise ? e.tensor : 0];
}

__device__ __forceinline__ long long chunk_of(const PruneEntry& e, int64_t start) {
  return e.first_chunk + start / kChunk;
}

// This thread's elements of the tile at chunk offset `base`: item j is element
// base + j * kThreads + threadIdx.x, so item j of the block is a run in index order.
// All loads (masks and keys, independent of each other) are issued before any is used;
// non-candidates read as bits 0.
struct Items {
  uint32_t bits[kItems];
  bool candidate[kItems];
};

__device__ __forceinline__ int64_t item_offset(int64_t base, int j) {
  return base + j * kThreads + threadIdx.x;
}

__device__ __forceinline__ Items load_items(const PruneEntry& e, int64_t start, int64_t len, int64_t base) {
  // One branch per operand (uniform over the block) around all kItems loads, every use after
  // both: the loads are in flight together instead of one DRAM round trip per element.
  uint32_t mask[kItems];
  uint32_t raw[kItems];
  if (e.mask != nullptr) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t local = item_offset(base, j);
      mask[j] = local < len ? e.mask[start + local] : 0u;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      mask[j] = item_offset(base, j) < len ? 1u : 0u;
    }
  }
  if (e.dtype == kPruneFloat32) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t local = item_offset(base, j);
      raw[j] = local < len ? static_cast<const uint32_t*>(e.keys)[start + local] : 0u;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t local = item_offset(base, j);
      raw[j] = local < len ? static_cast<const unsigned short*>(e.keys)[start + local] : 0u;
    }
  }
  Items items;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    items.candidate[j] = mask[j] != 0;
    items.bits[j] = items.candidate[j] ? float32_bits(e.dtype, raw[j]) : 0u;
  }
  return items;
}

// -------------------------------------------------------------- block primitives
// Adds 1 to hist[digit] for every lane with `counted`, one shared atomic per distinct digit
// of the warp. All 32 lanes must call it.
__device__ __forceinline__ void count_digit(unsigned* hist, bool counted, uint32_t digit) {
  const uint32_t value = counted ? digit : kMaxBins;
  const unsigned peers = __match_any_sync(0xffffffffu, value);
  if (counted && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) {
    atomicAdd(&hist[digit], static_cast<unsigned>(__popc(peers)));
  }
}

// Adds the first `bins` counts of the block's shared histogram into st's (if any) and
// zeroes them. Block-uniform.
__device__ __forceinline__ void flush_histogram(unsigned* hist, int bins, SegmentState* st) {
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += kThreads) {
    if (st != nullptr && hist[b] != 0) {
      atomicAdd(&st->hist[b], static_cast<unsigned long long>(hist[b]));
    }
    hist[b] = 0;
  }
  __syncthreads();
}

// The number of threads before this one (in thread order) with `flag`, and in `total` the
// block's count. Block-uniform; warp_counts: kWarps shared words.
__device__ __forceinline__ unsigned block_rank(bool flag, unsigned* warp_counts, unsigned& total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) {
    warp_counts[warp] = __popc(ballot);
  }
  __syncthreads();
  unsigned before = __popc(ballot & ((1u << lane) - 1u));
  total = 0;
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? warp_counts[w] : 0u;
    total += warp_counts[w];
  }
  __syncthreads();
  return before;
}

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

// ------------------------------------------------------------------- gathering
// Bucket keys on their way to a segment's buffer region, in shared memory.
struct Stage {
  unsigned key[kStage];
  unsigned long long pos[kStage];
  unsigned fill;        // staged entries
  unsigned count;       // entries being flushed, at base
  unsigned long long base;
};

// Moves the staged entries to st's buffer region (one global atomic). Block-uniform.
__device__ __forceinline__ void flush_stage(Stage& stage, SegmentState& st, const Context& ctx) {
  __syncthreads();
  if (threadIdx.x == 0) {
    stage.count = stage.fill;
    stage.base = st.buf_begin + atomicAdd(&st.buf_count, static_cast<unsigned long long>(stage.fill));
    stage.fill = 0;
  }
  __syncthreads();
  for (unsigned i = threadIdx.x; i < stage.count; i += kThreads) {
    ctx.buf_key[stage.base + i] = stage.key[i];
    ctx.buf_pos[stage.base + i] = stage.pos[i];
  }
  __syncthreads();
}

// Stages `key` at launch-wide position `pos`; one shared atomic per warp.
__device__ __forceinline__ void stage_key(Stage& stage, uint32_t key, unsigned long long pos) {
  const cg::coalesced_group group = cg::coalesced_threads();
  unsigned slot = 0;
  if (group.thread_rank() == 0) {
    slot = atomicAdd(&stage.fill, static_cast<unsigned>(group.size()));
  }
  slot = group.shfl(slot, 0) + static_cast<unsigned>(group.thread_rank());
  stage.key[slot] = key;
  stage.pos[slot] = pos;
}

// ------------------------------------------------------------------- digit passes
// Digit pass `pass` for every segment: over the tensors, the histogram of the digit inside
// the bucket (kScan, kGather), the masks (kGather, kWrite) and the bucket's keys copied to
// the buffer (kGather); over the buffer, the histogram for kCompact segments. Pass 0 also
// flags tensors with a NaN/Inf candidate and records each segment's size and first chunk.
__global__ void __launch_bounds__(kThreads)
    digit_pass_kernel(const __grid_constant__ TensorTable<PruneEntry> table, Context* ctx_ptr, int pass) {
  __shared__ unsigned hist[kMaxBins];
  __shared__ Stage stage;
  const Context& ctx = *ctx_ptr;
  const bool signed_keys = ctx.signed_keys != 0;  // read once: mask stores may alias ctx
  const int shift = digit_shift(pass);
  const int bins = digit_bins(pass);
  for (int b = threadIdx.x; b < kMaxBins; b += kThreads) {
    hist[b] = 0;
  }
  if (threadIdx.x == 0) {
    stage.fill = 0;
  }
  __syncthreads();
  SegmentState* pending = nullptr;  // the segment whose counts `hist` holds
  for_each_chunk(table, [&](const PruneEntry& entry, int64_t start, int64_t len) {
    const PruneEntry e = entry;  // in registers: the mask stores cannot force reloads of the table
    SegmentState& st = segment_of(ctx, e);
    const int mode = st.mode;
    if (mode != kScan && mode != kGather && mode != kWrite) {
      return;
    }
    if (pass == 0 && start == 0 && threadIdx.x == 0) {
      atomicAdd(&st.numel, static_cast<unsigned long long>(e.numel));
      if (ctx.layerwise) {
        st.first_chunk = e.first_chunk;
      }
    }
    if (mode != kWrite && &st != pending) {
      flush_histogram(hist, bins, pending);
      pending = &st;
    }
    const long long lo = st.lo;
    const long long hi = st.hi;
    const long long chunk = chunk_of(e, start);
    if (mode == kGather && threadIdx.x == 0) {
      ctx.chunk_out[chunk] = e.out + start;
    }
    bool nonfinite = false;
    for (int64_t base = 0; base < len; base += kTile) {
      if (mode == kGather) {  // room for a whole tile
        __syncthreads();
        if (__syncthreads_or(threadIdx.x == 0 && stage.fill > kStage - kTile)) {
          flush_stage(stage, st, ctx);
        }
      }
      const Items items = load_items(e, start, len, base);
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const bool candidate = items.candidate[j];
        const uint32_t key = order_key(items.bits[j], signed_keys);
        const bool in_bucket = candidate && (pass == 0 || in_range(key, lo, hi));
        if (mode != kWrite) {
          count_digit(hist, in_bucket, (key >> shift) & static_cast<uint32_t>(bins - 1));
        }
        const int64_t local = item_offset(base, j);
        if (mode != kScan && local < len) {
          e.out[start + local] = candidate && static_cast<long long>(key) > hi ? 1 : 0;
        }
        if (mode == kGather && in_bucket) {
          stage_key(stage, key, static_cast<unsigned long long>(chunk * kChunk + local));
        }
        nonfinite |= candidate && is_nonfinite(items.bits[j]);
      }
    }
    if (mode == kGather) {
      flush_stage(stage, st, ctx);
    }
    if (pass == 0 && __syncthreads_or(nonfinite) && threadIdx.x == 0) {
      ctx.status[ctx.num_segments + e.tensor] = 1;
    }
  });
  flush_histogram(hist, bins, pending);
  for (int s = 0; s < ctx.num_segments; ++s) {  // buckets gathered in an earlier pass
    SegmentState& st = ctx.seg[s];
    const long long count = static_cast<long long>(st.buf_count);
    if (st.mode != kCompact || static_cast<long long>(blockIdx.x) * kThreads >= count) {
      continue;
    }
    const long long lo = st.lo;
    const long long hi = st.hi;
    const unsigned* keys = ctx.buf_key + st.buf_begin;
    for (long long base = static_cast<long long>(blockIdx.x) * kThreads; base < count;
         base += static_cast<long long>(gridDim.x) * kThreads) {
      const long long i = base + threadIdx.x;
      const uint32_t key = i < count ? keys[i] : 0u;
      count_digit(hist, i < count && in_range(key, lo, hi), (key >> shift) & static_cast<uint32_t>(bins - 1));
    }
    flush_histogram(hist, bins, &st);
  }
}

// ------------------------------------------------------------------------ selection
// Blocks of kPickThreads threads, segments strided over the blocks: after pass `pass`, n and
// k (first pass), then the digit holding the k-th largest key of the bucket, the new bucket
// and k, and the segment's next mode (see Mode). Invariant: the bucket holds >= k keys.
__global__ void __launch_bounds__(kPickThreads) pick_kernel(Context* ctx, int pass) {
  constexpr int kMaxPer = kMaxBins / kPickThreads;
  __shared__ unsigned long long scan[kPickThreads];
  __shared__ long long shared_wanted;
  const int t = threadIdx.x;
  const int shift = digit_shift(pass);
  const int bins = digit_bins(pass);
  const int per = bins / kPickThreads;  // thread t holds digits bins-1-t*per down to bins-per-t*per
  for (int s = blockIdx.x; s < ctx->num_segments; s += gridDim.x) {
    SegmentState& st = ctx->seg[s];
    const int mode = st.mode;
    const long long old_lo = st.lo;
    const long long old_hi = pass == 0 ? 0xffffffffll : st.hi;
    __syncthreads();  // every thread has read the state before it changes
    if (mode == kWrite) {  // the pass just done wrote the masks
      if (t == 0) {
        st.mode = kFinished;
      }
      continue;
    }
    if (mode != kScan && mode != kGather && mode != kCompact) {
      continue;
    }
    unsigned long long counts[kMaxPer];
    unsigned long long sum = 0;
#pragma unroll
    for (int i = 0; i < kMaxPer; ++i) {
      counts[i] = 0;
      if (i < per) {
        const int digit = bins - 1 - (t * per + i);
        counts[i] = st.hist[digit];
        st.hist[digit] = 0;
        sum += counts[i];
      }
    }
    block_inclusive_scan<kPickThreads>(scan, t, sum);
    if (t == 0) {
      long long wanted = st.keep;
      if (pass == 0) {
        const long long n = static_cast<long long>(scan[kPickThreads - 1]);
        ctx->status[s] = n;
        const long long n_prune = ctx->amount_is_count
                                      ? min(static_cast<long long>(ctx->amount), n)
                                      : static_cast<long long>(rint(ctx->amount * static_cast<double>(n)));
        wanted = n - n_prune;
      }
      shared_wanted = wanted;
    }
    __syncthreads();
    const long long wanted = shared_wanted;
    const bool gathered = mode != kScan;
    const int decided = gathered ? kCompactDone : kWrite;
    if (wanted == 0 && t == 0) {  // none of the bucket kept
      st.lo = old_hi + 1;
      st.hi = old_hi;
      st.keep = 0;
      st.mode = decided;
    }
    long long above = static_cast<long long>(scan[t] - sum);  // keys with a larger digit
#pragma unroll
    for (int i = 0; i < kMaxPer; ++i) {
      const long long in_digit = static_cast<long long>(counts[i]);
      if (i < per && above < wanted && wanted <= above + in_digit) {
        const long long left = wanted - above;
        const long long lo = old_lo + (static_cast<long long>(bins - 1 - (t * per + i)) << shift);
        st.lo = lo;
        st.keep = left;
        if (left == in_digit) {  // all of the new bucket kept
          st.hi = lo - 1;
          st.mode = decided;
        } else {
          st.hi = lo + (1ll << shift) - 1;
          if (gathered) {
            st.mode = kCompact;
          } else if (pass + 1 < kPasses && in_digit <= buffer_capacity(static_cast<long long>(st.numel))) {
            // Regions sum to at most the buffer: each segment takes one, within its capacity.
            st.buf_begin = atomicAdd(&ctx->buf_used, static_cast<unsigned long long>(in_digit));
            st.mode = kGather;
          } else {
            st.mode = kScan;
          }
        }
      }
      above += i < per ? in_digit : 0;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------- ties
// The segment's ties in chunks before `chunk`, and in `count` the chunk's own.
__device__ __forceinline__ long long ties_before(const Context& ctx, const SegmentState& st, long long chunk,
                                                 long long& count) {
  count = static_cast<long long>(ctx.ties[chunk + 1] - ctx.ties[chunk]);
  return static_cast<long long>(ctx.ties[chunk] - ctx.ties[st.first_chunk]);
}

// Per chunk, the keys of the final bucket of segments still searching: counted over the
// tensors (kScan) or from the buffer (kCompact).
__global__ void __launch_bounds__(kThreads)
    tie_count_kernel(const __grid_constant__ TensorTable<PruneEntry> table, Context* ctx_ptr) {
  const Context& ctx = *ctx_ptr;
  const bool signed_keys = ctx.signed_keys != 0;
  for_each_chunk(table, [&](const PruneEntry& entry, int64_t start, int64_t len) {
    const PruneEntry e = entry;  // in registers: the mask stores cannot force reloads of the table
    const SegmentState& st = segment_of(ctx, e);
    if (st.mode != kScan) {
      return;
    }
    const long long lo = st.lo;
    const long long hi = st.hi;
    unsigned long long count = 0;
    for (int64_t base = 0; base < len; base += kTile) {
      const Items items = load_items(e, start, len, base);
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const bool tie = items.candidate[j] && in_range(order_key(items.bits[j], signed_keys), lo, hi);
        count += static_cast<unsigned long long>(__syncthreads_count(tie));
      }
    }
    if (threadIdx.x == 0) {
      ctx.ties[chunk_of(e, start)] = count;
    }
  });
  for (int s = 0; s < ctx.num_segments; ++s) {
    const SegmentState& st = ctx.seg[s];
    const long long count = static_cast<long long>(st.buf_count);
    if (st.mode != kCompact) {
      continue;
    }
    for (long long base = static_cast<long long>(blockIdx.x) * kThreads; base < count;
         base += static_cast<long long>(gridDim.x) * kThreads) {
      const long long i = base + threadIdx.x;
      const bool tie = i < count && in_range(ctx.buf_key[st.buf_begin + i], st.lo, st.hi);
      const unsigned long long chunk = tie ? ctx.buf_pos[st.buf_begin + i] / kChunk : ~0ull;
      const unsigned peers = __match_any_sync(0xffffffffu, chunk);
      if (tie && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) {
        atomicAdd(&ctx.ties[chunk], static_cast<unsigned long long>(__popc(peers)));
      }
    }
  }
}

// One block: ties[c] becomes the number of ties in chunks before c, for c <= chunks.
__global__ void __launch_bounds__(kScanThreads) scan_ties_kernel(Context* ctx) {
  __shared__ unsigned long long sums[kScanThreads];
  const int t = threadIdx.x;
  const long long entries = ctx->num_chunks + 1;
  const long long per_thread = (entries + kScanThreads - 1) / kScanThreads;
  const long long lo = min(entries, t * per_thread);
  const long long hi = min(entries, lo + per_thread);
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
// Writes the chunk's masks: candidate and (key > hi, or a tie, key in [lo, hi], of rank
// below `quota`), ties ranked in index order from `rank`. ties_only: only ties are written
// (the other masks are final). Block-uniform.
__device__ __forceinline__ void write_ranked(const Context& ctx, const PruneEntry& e, int64_t start, int64_t len,
                                             const SegmentState& st, long long rank, bool ties_only,
                                             unsigned* warp_counts) {
  const long long lo = st.lo;
  const long long hi = st.hi;
  const long long quota = st.keep;
  const bool ranked = lo <= hi;
  const bool signed_keys = ctx.signed_keys != 0;
  for (int64_t base = 0; base < len; base += kTile) {
    const Items items = load_items(e, start, len, base);
#pragma unroll
    for (int j = 0; j < kItems; ++j) {  // item j of the block: the next kThreads elements
      const uint32_t key = order_key(items.bits[j], signed_keys);
      const bool tie = items.candidate[j] && in_range(key, lo, hi);
      bool keep = items.candidate[j] && static_cast<long long>(key) > hi;
      if (ranked) {
        unsigned total = 0;
        const long long tie_rank = rank + block_rank(tie, warp_counts, total);
        keep = keep || (tie && tie_rank < quota);
        rank += total;
      }
      const int64_t local = item_offset(base, j);
      if (local < len && (!ties_only || tie)) {
        e.out[start + local] = keep ? 1 : 0;
      }
    }
  }
}

// The masks not written yet: whole chunks of segments still in the tensors (kScan: ranked;
// kWrite), the ties of the one chunk straddling k of a kCompact segment, and the kept keys
// of the gathered buckets (their masks hold 0).
__global__ void __launch_bounds__(kThreads)
    finish_kernel(const __grid_constant__ TensorTable<PruneEntry> table, Context* ctx_ptr) {
  __shared__ unsigned warp_counts[kWarps];
  const Context& ctx = *ctx_ptr;
  for_each_chunk(table, [&](const PruneEntry& entry, int64_t start, int64_t len) {
    const PruneEntry e = entry;  // in registers: the mask stores cannot force reloads of the table
    const SegmentState& st = segment_of(ctx, e);
    const int mode = st.mode;
    if (mode == kWrite) {
      write_ranked(ctx, e, start, len, st, 0, false, warp_counts);
    } else if (mode == kScan || mode == kCompact) {
      long long count = 0;
      const long long before = ties_before(ctx, st, chunk_of(e, start), count);
      if (mode == kScan) {
        write_ranked(ctx, e, start, len, st, before, false, warp_counts);
      } else if (before < st.keep && st.keep < before + count) {
        write_ranked(ctx, e, start, len, st, before, true, warp_counts);
      }
    }
  });
  for (int s = 0; s < ctx.num_segments; ++s) {
    const SegmentState& st = ctx.seg[s];
    if (st.mode != kCompact && st.mode != kCompactDone) {
      continue;
    }
    const long long count = static_cast<long long>(st.buf_count);
    for (long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x; i < count;
         i += static_cast<long long>(gridDim.x) * kThreads) {
      const long long key = ctx.buf_key[st.buf_begin + i];
      const unsigned long long pos = ctx.buf_pos[st.buf_begin + i];
      bool keep = key > st.hi;
      if (!keep && key >= st.lo) {  // a tie: kept with its chunk when all of the chunk's ties are
        long long ties = 0;
        keep = ties_before(ctx, st, static_cast<long long>(pos / kChunk), ties) + ties <= st.keep;
      }
      if (keep) {
        ctx.chunk_out[pos / kChunk][pos % kChunk] = 1;
      }
    }
  }
}

// The call's first launch: zeroes the search states and tie counts (`words` 8-byte words from
// `zero`) and the status, and stores the context.
__global__ void init_kernel(Context value, Context* ctx, unsigned long long* zero, long long words,
                            long long status_words) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < words + status_words;
       i += stride) {
    if (i < words) {
      zero[i] = 0;
    } else {
      value.status[i - words] = 0;
    }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    *ctx = value;
  }
}

// ---------------------------------------------------------------------------- host
size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

struct Layout {
  int64_t num_chunks = 0;
  int64_t capacity = 0;
  int segments = 0;
  size_t seg = 0, ties = 0, chunk_out = 0, buf_key = 0, buf_pos = 0, bytes = 0;  // byte offsets, total
};

Layout plan(const std::vector<PruneTensor>& tensors, bool layerwise) {
  Layout l;
  int64_t total = 0;
  for (const PruneTensor& t : tensors) {
    l.num_chunks += (t.numel + kChunk - 1) / kChunk;
    total += t.numel;
    l.capacity += layerwise ? buffer_capacity(t.numel) : 0;
  }
  l.capacity = layerwise ? l.capacity : buffer_capacity(total);
  l.segments = layerwise ? static_cast<int>(tensors.size()) : 1;
  l.seg = align_up(sizeof(Context));
  l.ties = l.seg + align_up(sizeof(SegmentState) * l.segments);
  l.chunk_out = l.ties + align_up(sizeof(unsigned long long) * (l.num_chunks + 1));
  l.buf_key = l.chunk_out + align_up(sizeof(uint8_t*) * l.num_chunks);
  l.buf_pos = l.buf_key + align_up(sizeof(unsigned) * l.capacity);
  l.bytes = l.buf_pos + align_up(sizeof(unsigned long long) * l.capacity);
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
  value.chunk_out = reinterpret_cast<uint8_t**>(ws + l.chunk_out);
  value.buf_key = reinterpret_cast<unsigned*>(ws + l.buf_key);
  value.buf_pos = reinterpret_cast<unsigned long long*>(ws + l.buf_pos);
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
      entries.push_back({x.keys, x.mask, x.out, x.numel, first_chunk, static_cast<int32_t>(t), x.dtype});
      first_chunk += (x.numel + kChunk - 1) / kChunk;
    }
  }

  // Search states (kScan, empty histograms) and tie counts start at zero; status too.
  const long long words = static_cast<long long>((l.chunk_out - l.seg) / sizeof(unsigned long long));
  const long long status_words = l.segments + static_cast<long long>(tensors.size());
  const int init_blocks = static_cast<int>(std::min<long long>((words + status_words) / kInitWords + 1, 1024));
  init_kernel<<<init_blocks, kThreads, 0, stream>>>(value, ctx, reinterpret_cast<unsigned long long*>(ws + l.seg),
                                                    words, status_words);
  SWAMP_CUDA_TRY(cudaGetLastError());
  const int pick_blocks = std::min(l.segments, 65535);
  for (int pass = 0; pass < kPasses; ++pass) {
    SWAMP_CUDA_TRY(launch_multi_tensor(digit_pass_kernel, entries, kChunk, kThreads, device, stream, ctx, pass));
    pick_kernel<<<pick_blocks, kPickThreads, 0, stream>>>(ctx, pass);
    SWAMP_CUDA_TRY(cudaGetLastError());
  }
  SWAMP_CUDA_TRY(launch_multi_tensor(tie_count_kernel, entries, kChunk, kThreads, device, stream, ctx));
  scan_ties_kernel<<<1, kScanThreads, 0, stream>>>(ctx);
  SWAMP_CUDA_TRY(cudaGetLastError());
  return launch_multi_tensor(finish_kernel, entries, kChunk, kThreads, device, stream, ctx);
}

}  // namespace swamp
