#include "device_upload.h"

#include <cstring>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>

namespace swamp {

DeviceUpload upload_to_current_device(const void* bytes, size_t size) {
  at::Tensor host = at::empty({static_cast<int64_t>(size)},
                              at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), bytes, size);
  // A non-blocking copy from pinned memory records its use, so the staging block is not
  // reused before the copy lands.
  auto device = std::make_shared<at::Tensor>(
      host.to(at::Device(at::kCUDA, c10::cuda::current_device()), /*non_blocking=*/true));
  return {device->data_ptr(), device};
}

}  // namespace swamp
