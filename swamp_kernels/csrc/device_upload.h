// Host bytes copied to the current CUDA device for a kernel to read (a multi-tensor table
// too large for the kernel arguments). Declared without torch headers, for nvcc-compiled code.
#pragma once

#include <cstddef>
#include <memory>

namespace swamp {

// `ptr` holds a device copy of the bytes, queued on the current stream. Memory comes from
// torch's caching allocators (pinned host staging, device block): no driver allocation and no
// host sync per call, and it counts against torch's memory like any tensor. Stream-ordered:
// `owner` may be dropped as soon as the kernels that read `ptr` are queued on that stream.
struct DeviceUpload {
  const void* ptr = nullptr;
  std::shared_ptr<void> owner;
};

DeviceUpload upload_to_current_device(const void* bytes, size_t size);

}  // namespace swamp
