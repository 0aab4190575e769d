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
#include <cstdint>
#include <initializer_list>
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

// No two non-empty tensors of the lists `written` ({argument name, tensors} of `op`, written in
// place) share memory: their updates would race. A contiguous tensor covers numel * itemsize bytes
// from its start; any other tensor (refused later as not contiguous) just its first element.
inline void check_distinct(const char* op,
                           std::initializer_list<std::pair<const char*, at::TensorList>> written) {
  struct Span {
    uintptr_t start, end;
    const char* name;
    size_t index;
  };
  std::vector<Span> spans;
  for (const auto& [name, tensors] : written) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i];
      if (t.defined() && t.numel() > 0) {
        const auto start = reinterpret_cast<uintptr_t>(t.const_data_ptr());
        const int64_t elements = t.is_contiguous() ? t.numel() : 1;
        spans.push_back({start, start + static_cast<uintptr_t>(elements) * t.element_size(), name, i});
      }
    }
  }
  std::stable_sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.start != b.start ? a.start < b.start : a.end > b.end;
  });
  const Span* reach = nullptr;  // the span reaching furthest so far
  for (const Span& span : spans) {
    if (reach != nullptr && span.start < reach->end) {
      const bool same = span.start == reach->start && span.end == reach->end;
      TORCH_CHECK_VALUE(false, op, ": ", span.name, "[", span.index, "] ", same ? "is" : "overlaps", " the memory of ",
                        reach->name, "[", reach->index, "]; tensors written in place must not share memory");
    }
    if (reach == nullptr || span.end > reach->end) {
      reach = &span;
    }
  }
}

}  // namespace swamp
