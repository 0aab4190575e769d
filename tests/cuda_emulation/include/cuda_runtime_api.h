// Host emulation of the CUDA runtime API the sources of swamp_kernels._C call (tests only).
//
// Memory is the host's: "device" pointers are CPU pointers, streams are null and every call
// completes before it returns. Launch errors of the emulated kernels (emulated_device.h)
// are kept as the last error, with their description, as the runtime does.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <string>

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
using cudaStream_t = struct CUstream_st*;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace swamp_emu {

struct LastError {
  cudaError_t code = cudaSuccess;
  std::string message;
};

inline LastError& last_error() {
  static thread_local LastError error;
  return error;
}

// Multiprocessors of the emulated GPU: SWAMP_EMULATED_SMS, 4 unless set. Multi-tensor
// launches size their grid from it, so a few blocks each walk many chunks.
inline int multiprocessors() {
  const char* value = std::getenv("SWAMP_EMULATED_SMS");
  return value != nullptr ? std::atoi(value) : 4;
}

}  // namespace swamp_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t code = swamp_emu::last_error().code;
  swamp_emu::last_error().code = cudaSuccess;
  return code;
}

inline const char* cudaGetErrorString(cudaError_t code) {
  if (code == cudaSuccess) {
    return "no error";
  }
  if (code == cudaErrorInvalidValue) {
    return "invalid argument";
  }
  return swamp_emu::last_error().message.c_str();
}

inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) {
    return cudaErrorInvalidValue;
  }
  *value = swamp_emu::multiprocessors();
  return cudaSuccess;
}
