// global/layerwise magnitude pruning: the interface between its torch binding
// (magnitude_prune_op.cpp) and its kernels (magnitude_prune.cu). Plain C++: no torch or
// device code here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <cuda_runtime_api.h>

namespace swamp {

// How a key tensor's elements are stored.
enum PruneDtype : int32_t { kPruneFloat32 = 0, kPruneFloat16 = 1, kPruneBFloat16 = 2 };

struct PruneTensor {
  const void* keys;     // contiguous weights (ranked by |w|) or scores (ranked by value)
  const uint8_t* mask;  // contiguous bool candidates, or nullptr: every entry is a candidate
  uint8_t* out;         // contiguous bool result, written in full
  int64_t numel;
  PruneDtype dtype;
};

struct PruneParams {
  double amount;         // a fraction in [0, 1], or a count when amount_is_count
  bool amount_is_count;  // prune min(amount, n) candidates; else round-half-even(amount * n)
  bool signed_keys;      // scores: rank by value; else rank by magnitude
  bool layerwise;        // one selection per tensor; else one over all tensors
};

// Bytes of device scratch that launch_magnitude_prune needs for these tensors.
size_t magnitude_prune_workspace_bytes(const std::vector<PruneTensor>& tensors, bool layerwise);

// Writes every out[] mask on `stream`: of each segment's n candidates (one segment, or one
// per tensor when layerwise) it keeps the n - n_prune largest keys, ties at the threshold
// kept in global index order. status (int64, segments + tensors entries) receives each
// segment's n, then per tensor 1 if a candidate is NaN/Inf, else 0. No host synchronisation.
cudaError_t launch_magnitude_prune(const std::vector<PruneTensor>& tensors, const PruneParams& params,
                                   void* workspace, int64_t* status, int device, cudaStream_t stream);

}  // namespace swamp
