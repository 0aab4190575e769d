// Host emulation of device_upload.cpp (tests only): the "device" copy is a host copy.
#include "device_upload.h"

#include <cstring>

namespace swamp {

DeviceUpload upload_to_current_device(const void* bytes, size_t size) {
  std::shared_ptr<char[]> copy(new char[size]);
  std::memcpy(copy.get(), bytes, size);
  return {copy.get(), copy};
}

}  // namespace swamp
