// Racecheck for the emulated CUDA kernels (tests only; the racecheck build of
// tests/cuda_emulation/__init__.py). The kernels are compiled with GCC's -fsanitize=thread,
// which calls a hook before every load and store; this file implements those hooks in place
// of ThreadSanitizer's runtime (it is not instrumented itself).
//
// Accesses to __shared__ memory (the swamp_emu_shared section of emulated_device.h) are checked
// per byte against the block's barrier intervals, as compute-sanitizer's racecheck does: two
// threads of a block touching the same byte between the same two barriers, at least one of
// them writing, is a hazard, except when both accesses are atomic. The first hazard fails the
// launch, naming the threads, the kind and the source line (addr2line). The emulated atomics
// are not instrumented; they report themselves (swamp_emu_racecheck_atomic).
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "emulated_device.h"

namespace swamp_emu {
namespace {

constexpr int kNone = -1;
constexpr int kSeveral = -2;

enum class Access { kRead, kWrite, kAtomic };

const char* name(Access access) {
  return access == Access::kRead ? "read" : access == Access::kWrite ? "write" : "atomic";
}

// Who last wrote, who read and who updated atomically a byte of shared memory, in which barrier
// interval of which block run; an entry of an older run is stale.
struct Cell {
  uint64_t run = 0;
  unsigned write_epoch = 0;
  unsigned read_epoch = 0;
  unsigned atomic_epoch = 0;
  int writer = kNone;
  int reader = kNone;   // kSeveral: more than one thread read it in read_epoch
  int updater = kNone;  // kSeveral: more than one thread updated it atomically in atomic_epoch
};

// Who has accessed a byte in interval `epoch` once `me` does too, given who had (`seen`, a
// thread or kSeveral, recorded in `seen_epoch`): `me` alone, or kSeveral.
int joined(unsigned seen_epoch, int seen, unsigned epoch, int me) {
  return seen_epoch != epoch || seen == me ? me : kSeveral;
}

std::vector<Cell>& cells() {
  static std::vector<Cell> shadow(static_cast<size_t>(__stop_swamp_emu_shared - __start_swamp_emu_shared));
  return shadow;
}

// "function at file:line" of the instruction before `return_address`, from addr2line.
std::string source_of(const void* return_address) {
  Dl_info info;
  if (dladdr(return_address, &info) == 0 || info.dli_fname == nullptr) {
    return "an unknown place";
  }
  const auto offset = reinterpret_cast<uintptr_t>(return_address) - reinterpret_cast<uintptr_t>(info.dli_fbase) - 1;
  char command[4096];
  std::snprintf(command, sizeof command, "addr2line -f -C -e '%s' 0x%lx 2>/dev/null", info.dli_fname,
                static_cast<unsigned long>(offset));
  std::string text;
  if (FILE* pipe = popen(command, "r")) {
    char line[1024];
    while (std::fgets(line, sizeof line, pipe) != nullptr) {
      text += text.empty() ? "" : " at ";
      text += std::string(line, std::strcspn(line, "\n"));
    }
    pclose(pipe);
  }
  return text.empty() ? std::string(info.dli_fname) + "+" + std::to_string(offset) : text;
}

std::string thread_name(int thread) {
  return thread == kSeveral ? std::string("other threads") : "thread " + std::to_string(thread);
}

void report(Block& b, const std::string& kind, int other, size_t offset, const void* return_address) {
  if (!b.error.empty()) {
    return;
  }
  std::ostringstream out;
  out << "shared-memory race (" << kind << "): thread " << b.current->index.x << " and " << thread_name(other)
      << " access byte " << offset << " of __shared__ memory between the same two barriers, in "
      << source_of(return_address);
  b.error = out.str();
}

void check(const void* address, size_t bytes, Access access, const void* return_address) {
  const char* p = static_cast<const char*>(address);
  if (p < __start_swamp_emu_shared || p >= __stop_swamp_emu_shared) {
    return;
  }
  Block* b = active_block();
  if (b == nullptr || b->current == nullptr) {
    return;
  }
  const int me = static_cast<int>(b->current->index.x);
  const unsigned now = b->epoch;
  const size_t first = static_cast<size_t>(p - __start_swamp_emu_shared);
  std::vector<Cell>& shadow = cells();
  for (size_t i = first; i < first + bytes && i < shadow.size(); ++i) {
    Cell& c = shadow[i];
    if (c.run != b->run) {
      c = Cell{};
      c.run = b->run;
    }
    // an earlier access of another thread in this interval that this one conflicts with:
    // any write; a read, unless this reads too; an atomic update, unless this is one too
    const char* earlier = nullptr;
    int other = kNone;
    if (c.write_epoch == now && c.writer != me) {
      earlier = "write";
      other = c.writer;
    } else if (access != Access::kRead && c.read_epoch == now && c.reader != me) {
      earlier = "read";
      other = c.reader;
    } else if (access != Access::kAtomic && c.atomic_epoch == now && c.updater != me) {
      earlier = "atomic";
      other = c.updater;
    }
    if (earlier != nullptr) {
      report(*b, std::string(name(access)) + " after " + earlier, other, i, return_address);
    }
    if (access == Access::kWrite) {
      c.writer = me;
      c.write_epoch = now;
    } else if (access == Access::kRead) {
      c.reader = joined(c.read_epoch, c.reader, now, me);
      c.read_epoch = now;
    } else {
      c.updater = joined(c.atomic_epoch, c.updater, now, me);
      c.atomic_epoch = now;
    }
  }
}

}  // namespace
}  // namespace swamp_emu

#define SWAMP_RACECHECK_HOOKS(bytes)                                                 \
  void __tsan_read##bytes(void* p) { SWAMP_RACECHECK(p, bytes, kRead); }              \
  void __tsan_write##bytes(void* p) { SWAMP_RACECHECK(p, bytes, kWrite); }            \
  void __tsan_unaligned_read##bytes(void* p) { SWAMP_RACECHECK(p, bytes, kRead); }    \
  void __tsan_unaligned_write##bytes(void* p) { SWAMP_RACECHECK(p, bytes, kWrite); }

// __builtin_return_address must be taken in the hook itself: the instrumented code's address.
#define SWAMP_RACECHECK(p, bytes, access) \
  swamp_emu::check(p, bytes, swamp_emu::Access::access, __builtin_return_address(0))

extern "C" {
SWAMP_RACECHECK_HOOKS(1)
SWAMP_RACECHECK_HOOKS(2)
SWAMP_RACECHECK_HOOKS(4)
SWAMP_RACECHECK_HOOKS(8)
SWAMP_RACECHECK_HOOKS(16)
void __tsan_read_range(void* p, size_t bytes) { SWAMP_RACECHECK(p, bytes, kRead); }
void __tsan_write_range(void* p, size_t bytes) { SWAMP_RACECHECK(p, bytes, kWrite); }
void swamp_emu_racecheck_atomic(const void* p, size_t bytes, const void* call_site) {
  swamp_emu::check(p, bytes, swamp_emu::Access::kAtomic, call_site);
}
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
// libstdc++'s reference counts in the emulation's own code (not shared memory)
int __tsan_atomic32_fetch_add(volatile int* a, int v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
}
