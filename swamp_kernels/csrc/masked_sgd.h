// masked_sgd_step_: the interface between its torch binding (masked_sgd_op.cpp) and its kernel
// (masked_sgd.cu). Plain C++: no torch or device code here.
#pragma once

#include <cstdint>
#include <vector>

#include <cuda_runtime_api.h>

#include "float_type.h"

namespace swamp {

// One parameter seen as `rows` rows of `numel` entries, the mask (if any) covering one row:
// rows = P for a mask of `shape` over a [P, *shape] parameter, else 1.
struct SgdEntry {
  void* param;            // contiguous rows x numel
  const void* grad;       // likewise, in the grad dtype
  void* momentum_buffer;  // likewise, in the param dtype; nullptr without momentum
  const uint8_t* mask;    // contiguous numel bools, or nullptr: nothing masked
  int64_t numel;          // entries of one row (> 0): the chunked work domain
  int64_t rows;
  bool first_step;        // the buffer is new: written, never read
};

// torch.optim.SGD's hyperparameters as the kernel's float32 operands, derived on the host in
// double precision as torch derives its alphas: -lr, 1 - dampening.
struct SgdOptions {
  float neg_lr;
  float momentum;
  float one_minus_dampening;
  float weight_decay;
  bool nesterov;
  bool maximize;
  bool use_momentum;      // momentum != 0
  bool use_weight_decay;  // weight_decay != 0
};

// In one launch on `stream`, for every entry (all `param_type` params and buffers, `grad_type`
// grads; the two differ only for float32 params): one torch.optim.SGD step in float32 on
// d_p = mask ? grad : 0 (a buffer on its first step starts as d_p), then param = mask ? param : 0.
cudaError_t launch_masked_sgd(const std::vector<SgdEntry>& entries, FloatType param_type, FloatType grad_type,
                              const SgdOptions& options, int device, cudaStream_t stream);

}  // namespace swamp
