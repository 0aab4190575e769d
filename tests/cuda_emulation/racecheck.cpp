// Racecheck for the emulated CUDA kernels (tests only; the racecheck build of
// tests/cuda_emulation/__init__.py). The kernels are compiled with GCC's -fsanitize=thread,
// which calls a hook before every load and store; this file implements those hooks in place
// of ThreadSanitizer's runtime (it is not instrumented itself).
//
// Every byte a kernel thread touches is checked for a race: two accesses of which at least one
// is a plain write, or one plain and one atomic, that nothing orders. Threads of one block are
// ordered by barriers only (warp votes and shuffles exchange registers, not memory order);
// blocks of one launch by nothing; launches run in stream order.
// So a race is two such accesses by threads of one block between the same two barriers
// (__shared__ memory, the swamp_emu_shared section of emulated_device.h, and global memory,
// as compute-sanitizer's racecheck checks shared memory), or by two blocks of one launch
// (global memory). The first race fails the launch, naming both threads, the kind and both
// source lines (addr2line). The emulated atomics are not instrumented; they report themselves
// (swamp_emu_racecheck_atomic). The emulation's own memory is not checked: the fiber stacks
// (each thread's own), the block's thread table and the block.
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <sstream>
#include <string>
#include <unordered_map>
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

// Who accessed a byte in one way last: a block (or kSeveral blocks) and, within that block,
// a thread (or kSeveral) in barrier interval `epoch`.
struct Last {
  int block = kNone;
  int thread = kNone;
  unsigned epoch = 0;
  const void* site = nullptr;  // the return address of the last such access's hook

  // Whether an access by `thread` of `block` in `now` may run at the same time as these.
  bool concurrent_with(int block_, int thread_, unsigned now) const {
    return block != kNone && (block != block_ || (epoch == now && thread != thread_));
  }

  void add(int block_, int thread_, unsigned now, const void* site_) {
    site = site_;
    if (block != kNone && block != block_) {
      block = kSeveral;
    } else {
      thread = block == block_ && epoch == now && thread != thread_ ? kSeveral : thread_;
      block = block_;
      epoch = now;
    }
  }
};

// The accesses to one byte in one scope (a block run for shared memory, a launch for global
// memory); an entry of an older scope is stale.
struct Cell {
  uint64_t scope = 0;
  Last write, read, atomic;
};

std::vector<Cell>& shared_cells() {
  static std::vector<Cell> shadow(static_cast<size_t>(__stop_swamp_emu_shared - __start_swamp_emu_shared));
  return shadow;
}

// The cell of global byte `at`, in shadow pages allocated as they are first touched.
Cell& global_cell(uintptr_t at) {
  constexpr uintptr_t kPage = 4096;
  static std::unordered_map<uintptr_t, std::unique_ptr<Cell[]>> pages;
  static uintptr_t last_page = ~uintptr_t{0};  // kernels mostly touch one page after another
  static Cell* last = nullptr;
  if (at / kPage != last_page) {
    std::unique_ptr<Cell[]>& page = pages[at / kPage];
    if (!page) {
      page.reset(new Cell[kPage]);
    }
    last_page = at / kPage;
    last = page.get();
  }
  return last[at % kPage];
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

std::string who(const Last& last) {
  if (last.block == kSeveral) {
    return "threads of other blocks";
  }
  const std::string block = " of block " + std::to_string(last.block);
  return last.thread == kSeveral ? "other threads" + block : "thread " + std::to_string(last.thread) + block;
}

// One access of a kernel thread: who (block, thread), when (barrier interval), how, from where.
struct Accessor {
  int block;
  int thread;
  unsigned epoch;
  Access access;
  const void* site;
};

// The byte at `position`: an offset into __shared__ memory, or a global address.
std::string describe(bool shared, uintptr_t position) {
  std::ostringstream out;
  if (shared) {
    out << "byte " << position << " of __shared__ memory";
  } else {
    out << "global memory at 0x" << std::hex << position;
  }
  return out.str();
}

void check_byte(Cell& c, uint64_t scope, const Accessor& a, bool shared, uintptr_t position, Block& b) {
  if (c.scope != scope) {
    c = Cell{};
    c.scope = scope;
  }
  // the earlier accesses this one races with: any write; a read, unless this reads too; an
  // atomic update, unless this is one too
  const Last* earlier = nullptr;
  const char* kind = nullptr;
  if (c.write.concurrent_with(a.block, a.thread, a.epoch)) {
    earlier = &c.write;
    kind = "write";
  } else if (a.access != Access::kRead && c.read.concurrent_with(a.block, a.thread, a.epoch)) {
    earlier = &c.read;
    kind = "read";
  } else if (a.access != Access::kAtomic && c.atomic.concurrent_with(a.block, a.thread, a.epoch)) {
    earlier = &c.atomic;
    kind = "atomic";
  }
  if (earlier != nullptr && b.error.empty()) {
    std::ostringstream out;
    out << "race (" << name(a.access) << " after " << kind << "): thread " << a.thread << " of block " << a.block
        << " and " << who(*earlier) << " access " << describe(shared, position) << " unordered, in "
        << source_of(a.site) << "; the " << kind << " (the last one) in " << source_of(earlier->site);
    b.error = out.str();
  }
  Last& mine = a.access == Access::kWrite ? c.write : a.access == Access::kRead ? c.read : c.atomic;
  mine.add(a.block, a.thread, a.epoch, a.site);
}

// Whether `p` is the emulation's own memory: the fiber stacks, the thread table, the block.
bool emulation_memory(const char* p, const Block& b) {
  const auto* threads = reinterpret_cast<const char*>(b.threads.data());
  const auto* block = reinterpret_cast<const char*>(&b);
  return fiber_stacks().hold(p) || (p >= threads && p < threads + b.threads.size() * sizeof(Thread)) ||
         (p >= block && p < block + sizeof(Block));
}

void check(const void* address, size_t bytes, Access access, const void* return_address) {
  static thread_local bool busy = false;  // the emulation's inline functions may be instrumented
  Block* b = active_block();
  if (busy || b == nullptr || b->current == nullptr) {
    return;
  }
  busy = true;
  const Accessor a{static_cast<int>(b->index.x + b->grid.x * (b->index.y + b->grid.y * b->index.z)),
                   static_cast<int>(b->current->index.x), b->epoch, access, return_address};
  const char* p = static_cast<const char*>(address);
  if (p >= __start_swamp_emu_shared && p < __stop_swamp_emu_shared) {
    std::vector<Cell>& shadow = shared_cells();
    const size_t first = static_cast<size_t>(p - __start_swamp_emu_shared);
    for (size_t i = first; i < first + bytes && i < shadow.size(); ++i) {
      check_byte(shadow[i], b->run, a, true, i, *b);
    }
  } else if (!emulation_memory(p, *b)) {
    for (size_t i = 0; i < bytes; ++i) {
      const auto at = reinterpret_cast<uintptr_t>(p + i);
      check_byte(global_cell(at), b->launch, a, false, at, *b);
    }
  }
  busy = false;
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
