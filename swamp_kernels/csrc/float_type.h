// Element types of the float tensors the kernels of swamp_kernels._C read and write, named
// without torch or CUDA headers: a <family>_op.cpp maps each tensor's dtype to one
// (float_type() in tensor_checks.h), its <family>.cu picks the kernel instantiation for it
// (dispatch_float() in multi_tensor.cuh).
#pragma once

#include <cstdint>

namespace swamp {

enum class FloatType : int8_t { kFloat32, kFloat16, kBFloat16 };

}  // namespace swamp
