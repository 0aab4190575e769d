// Host emulation of the cooperative groups swamp_kernels._C uses (tests only): coalesced
// groups of a warp, their ranks and shuffles (emulated_device.h decides who is coalesced).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emulated_device.h"

namespace cooperative_groups {

class coalesced_group {
 public:
  explicit coalesced_group(unsigned lanes) : lanes_(lanes) {}

  unsigned long long size() const { return static_cast<unsigned long long>(__builtin_popcount(lanes_)); }

  unsigned long long thread_rank() const {
    const int lane = swamp_emu::lane_of(swamp_emu::current_thread());
    return static_cast<unsigned long long>(__builtin_popcount(lanes_ & ((1u << lane) - 1u)));
  }

  // The value of the group member of rank `rank`.
  template <typename T>
  T shfl(T value, unsigned rank, const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shfl takes values of 8 bytes at most");
    int source = 0;
    for (unsigned seen = 0; source < 32; ++source) {
      if ((lanes_ >> source & 1u) && seen++ == rank) {
        break;
      }
    }
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    bits = swamp_emu::warp_op(swamp_emu::WarpOp::kShuffle, lanes_, bits, source, file, line);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
  }

 private:
  unsigned lanes_;
};

inline coalesced_group coalesced_threads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return coalesced_group(static_cast<unsigned>(swamp_emu::warp_op(swamp_emu::WarpOp::kCoalesce, 0, 0, 0, file, line)));
}

}  // namespace cooperative_groups
