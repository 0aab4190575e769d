// Input checks shared by the torch bindings (<family>_op.cpp) of swamp_kernels._C.
//
// The Python ops validate first (swamp_kernels/_validate.py); these checks guard direct
// torch.ops.swamp_kernels calls and the kernels' assumptions. Errors name the op, the
// argument and the tensor index, e.g. "apply_masks_: masks[3] has dtype Float; expected Bool".
#pragma once

#include <cstddef>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "float_type.h"

namespace swamp {

// `t` (argument `name`[i] of `op`) is a contiguous tensor on `device`.
inline void check_dense_on(const char* op, const char* name, size_t i, const at::Tensor& t,
                           c10::Device device) {
  TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
}

// `t` is float32, float16 or bfloat16.
inline void check_float(const char* op, const char* name, size_t i, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name, "[", i,
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
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, "[", i, "] has shape ", t.sizes(), "; expected ", sizes,
              " like ", like_name, "[", i, "]");
}

// masks[i] is bool with the shape of like[i] or, for P stacked particles, of like[i][0].
inline void check_mask(const char* op, size_t i, const at::Tensor& mask, const char* like_name,
                       const at::Tensor& like) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": masks[", i, "] has dtype ", mask.scalar_type(),
              "; expected bool");
  const bool per_particle = like.dim() > 0 && mask.sizes() == like.sizes().slice(1);
  TORCH_CHECK(mask.sizes() == like.sizes() || per_particle, op, ": masks[", i, "] has shape ",
              mask.sizes(), "; expected ", like.sizes(), " like ", like_name, "[", i,
              "] or that shape without its leading particle dim");
}

}  // namespace swamp
