// Host emulation of the float16 type and conversions of cuda_fp16.h (tests only): IEEE
// binary16 through the compiler's _Float16, rounding to nearest even as the device does.
#pragma once

#include <cstring>

struct __half {
  unsigned short __x;
};

inline float __half2float(__half h) {
  _Float16 value;
  std::memcpy(&value, &h.__x, sizeof value);
  return static_cast<float>(value);
}

inline __half __float2half_rn(float x) {
  const auto value = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.__x, &value, sizeof value);
  return h;
}

inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
