// Input checks shared by the torch bindings (<family>_op.cpp) of swamp_kernels._C.
//
// Every check runs before any kernel is queued. Errors name the op, the argument and the tensor
// index, e.g. "apply_masks_: masks[3] has dtype Float; expected bool", and are Python ValueError
// (TypeError for dtypes), never RuntimeError: the Python ops call the elementwise ops on their
// caller's lists unvalidated and, on such an error, validate (precise errors, swamp_kernels/
// _validate.py) and take the general path (non-contiguous operands); swamp_kernels/cuda.py.
#pragma once

#include <algorithm>
#include <cstddef>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "float_type.h"

namespace swamp {

// `t` (argument `name`[i] of `op`) is a contiguous tensor on `device`.
inline void check_dense_on(const char* op, const char* name, size_t i, const at::Tensor& t,
                           c10::Device device) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), ", expected ", device);
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
}

// `t` is float32, float16 or bfloat16.
inline void check_float(const char* op, const char* name, size_t i, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name, "[", i,
                   "] has dtype ", dtype, "; expected float32, float16 or bfloat16");
}

// The kernels' name for the dtype of `t` (argument `name`[i] of `op`), which must be float32,
// float16 or bfloat16.
inline FloatType float_type(const char* op, const char* name, size_t i, const at::Tensor& t) {
  check_float(op, name, i, t);
  switch (t.scalar_type()) {
    case at::kHalf:
      return FloatType::kFloat16;
    case at::kBFloat16:
      return FloatType::kBFloat16;
    default:
      return FloatType::kFloat32;
  }
}

// `t` (argument `name`[i] of `op`) has shape `sizes`, that of `like_name`[i].
inline void check_shape(const char* op, const char* name, size_t i, const at::Tensor& t, at::IntArrayRef sizes,
                        const char* like_name) {
  TORCH_CHECK_VALUE(t.sizes() == sizes, op, ": ", name, "[", i, "] has shape ", t.sizes(), "; expected ", sizes,
                    " like ", like_name, "[", i, "]");
}

// masks[i] is bool with the shape of like[i] or, for P stacked particles, of like[i][0].
inline void check_mask(const char* op, size_t i, const at::Tensor& mask, const char* like_name,
                       const at::Tensor& like) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, op, ": masks[", i, "] has dtype ", mask.scalar_type(),
                   "; expected bool");
  const bool per_particle = like.dim() > 0 && mask.sizes() == like.sizes().slice(1);
  TORCH_CHECK_VALUE(mask.sizes() == like.sizes() || per_particle, op, ": masks[", i, "] has shape ",
                    mask.sizes(), "; expected ", like.sizes(), " like ", like_name, "[", i,
                    "] or that shape without its leading particle dim");
}

// No two non-empty tensors of `tensors` (argument `name` of `op`, written in place) start at the
// same address: their updates would race.
inline void check_distinct(const char* op, const char* name, at::TensorList tensors) {
  std::vector<std::pair<const void*, size_t>> starts;  // (address, index)
  starts.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].numel() > 0) {
      starts.emplace_back(tensors[i].const_data_ptr(), i);
    }
  }
  std::sort(starts.begin(), starts.end());
  for (size_t k = 1; k < starts.size(); ++k) {
    TORCH_CHECK_VALUE(starts[k].first != starts[k - 1].first, op, ": ", name, "[", starts[k].second,
                      "] is the memory of ", name, "[", starts[k - 1].second,
                      "]; tensors written in place must not share memory");
  }
}

}  // namespace swamp
