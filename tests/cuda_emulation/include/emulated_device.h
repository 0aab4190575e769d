// Host emulation of the CUDA execution model, for testing the kernels of swamp_kernels._C on
// a machine without a GPU (tests only; see tests/cuda_emulation/__init__.py).
//
// A launch runs its blocks one after another; the threads of a block are fibers on the calling
// OS thread, each running until it finishes or waits at a synchronising intrinsic, in a
// shuffled order after every synchronisation. When no thread can run, the scheduler completes what can complete:
//   - a warp op with a mask (__ballot_sync, __match_any_sync, a group's shfl) once every lane
//     of the mask waits at the same op with the same mask;
//   - cooperative_groups::coalesced_threads() for the lanes of a warp waiting at one call site
//     (on the device: the lanes that took the same branch together);
//   - __syncthreads / __syncthreads_count / __syncthreads_or once every thread waits at one.
// Anything else is a deadlock or undefined on the device (a barrier some threads skip, a mask
// naming a lane that exited or waits elsewhere): the launch fails with a description of where each
// thread waits, returned by cudaGetLastError(). __shared__ variables are function statics
// (blocks never run at the same time) in one section, filled with a garbage byte before every
// block, as the device leaves them: a read before the block's first write gives garbage.
// Atomics are plain read-modify-writes, atomic because fibers switch only at synchronising
// intrinsics. Instrumented builds (tests/test_cuda_sanitizers.py) show more: AddressSanitizer
// (told of every fiber switch) memory errors, racecheck.cpp races between threads and blocks.
// What this cannot show: timing and the device's memory model (visibility without fences).
#pragma once

#include <sanitizer/asan_interface.h>  // no-ops unless built with -fsanitize=address
#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <cmath>   // the device's math functions are global (rint, ...)
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_runtime_api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)
#if defined(__SANITIZE_ADDRESS__)
#define __shared__ static  // AddressSanitizer guards globals only outside named sections
#else
#define __shared__ static __attribute__((section("swamp_emu_shared")))
#endif
#define __builtin_assume(condition) ((void)0)
#define __isGlobal(pointer) true

#define threadIdx (::swamp_emu::current_thread().index)
#define blockIdx (::swamp_emu::current_block().index)
#define blockDim (::swamp_emu::current_block().dim)
#define gridDim (::swamp_emu::current_block().grid)

namespace swamp_emu {

enum class Wait { kRunnable, kBarrier, kWarp, kDone };
enum class Barrier { kSync, kCount, kOr };
enum class WarpOp { kBallot, kMatchAny, kShuffle, kCoalesce };

inline const char* name(Barrier kind) {
  return kind == Barrier::kSync ? "__syncthreads" : kind == Barrier::kCount ? "__syncthreads_count" : "__syncthreads_or";
}

inline const char* name(WarpOp op) {
  switch (op) {
    case WarpOp::kBallot:
      return "__ballot_sync";
    case WarpOp::kMatchAny:
      return "__match_any_sync";
    case WarpOp::kShuffle:
      return "coalesced_group::shfl";
    default:
      return "coalesced_threads";
  }
}

// The stack a fiber runs on, for AddressSanitizer; a start clears the poison that an earlier
// fiber's frames left there.
struct FiberStack {
  const void* stack = nullptr;
  size_t bytes = 0;

  void use(char* base, size_t size) {
    stack = base;
    bytes = size;
    ASAN_UNPOISON_MEMORY_REGION(base, size);
  }
};

// A saved execution context. On x86-64 a switch saves the callee-saved registers and the
// floating-point control words on the stack and swaps stack pointers (~25 ns); elsewhere it is
// ucontext's swapcontext (~600 ns: it also saves the signal mask, a system call).
#if defined(__x86_64__)
struct Fiber : FiberStack {
  void* sp = nullptr;

  // Prepares the fiber to run entry() (which must never return) on [base, base + size).
  void start(char* base, size_t size, void (*entry)()) {
    use(base, size);
    auto top = reinterpret_cast<uintptr_t>(base + size) & ~uintptr_t{15};
    void** frame = reinterpret_cast<void**>(top);
    *--frame = nullptr;                           // entry's return address: never used
    *--frame = reinterpret_cast<void*>(entry);    // where the first switch returns to
    for (int i = 0; i < 6; ++i) {
      *--frame = nullptr;                         // rbp, rbx, r12-r15
    }
    uint32_t control[2];
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
    std::memcpy(--frame, control, sizeof control);
    sp = frame;
  }
};

// Saves the running context into *from and resumes `to`.
__attribute__((naked)) inline void switch_stacks(void** /*from*/, void* /*to*/) {
  asm volatile(
      "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "subq $8, %rsp\n\tstmxcsr (%rsp)\n\tfnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\tfldcw 4(%rsp)\n\taddq $8, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret");
}

inline void switch_context(Fiber& from, Fiber& to) { switch_stacks(&from.sp, to.sp); }
#else
struct Fiber : FiberStack {
  ucontext_t context;

  void start(char* base, size_t size, void (*entry)()) {
    use(base, size);
    getcontext(&context);
    context.uc_stack.ss_sp = base;
    context.uc_stack.ss_size = size;
    context.uc_link = nullptr;
    makecontext(&context, entry, 0);
  }
};

inline void switch_context(Fiber& from, Fiber& to) { swapcontext(&from.context, &to.context); }
#endif

// Resumes `to`; returns when a switch resumes `from` (never, when `from_exits`). AddressSanitizer
// (tests/test_cuda_sanitizers.py) is told of every switch, so it knows which stack runs.
inline void switch_fiber(Fiber& from, Fiber& to, bool from_exits = false) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(from_exits ? nullptr : &fake_stack, to.stack, to.bytes);
  switch_context(from, to);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  (void)from_exits;
  switch_context(from, to);
#endif
}

struct Thread {
  Fiber fiber;
  dim3 index;
  Wait wait = Wait::kRunnable;
  Barrier barrier = Barrier::kSync;  // at a barrier: which, and this thread's predicate
  bool predicate = false;
  WarpOp op = WarpOp::kBallot;       // at a warp op: which, over which lanes, with what
  unsigned mask = 0;
  uint64_t value = 0;                // ballot predicate, match value, shuffled value
  int source = 0;                    // shuffle: the lane read
  const char* file = "";             // the call site
  int line = 0;
  uint64_t result = 0;               // what the barrier or warp op returns
};

struct Block {
  dim3 index, dim, grid;
  std::vector<Thread> threads;
  Fiber scheduler;
  Thread* current = nullptr;
  std::function<void()> body;  // the kernel call every thread makes
  std::string error;
  uint64_t launch = 0;  // which launch this is, process-wide (racecheck.cpp)
  uint64_t run = 0;     // which block run this is, process-wide (racecheck.cpp)
  unsigned epoch = 1;   // 1 + the barriers completed in this run (racecheck.cpp)
};

inline Block*& active_block() {
  static Block* block = nullptr;
  return block;
}

inline Block& current_block() { return *active_block(); }
inline Thread& current_thread() { return *active_block()->current; }
inline int lane_of(const Thread& t) { return static_cast<int>(t.index.x & 31u); }

// Fiber stacks with a guard page below each, so an overflow faults instead of corrupting a
// neighbour. One region, grown to the largest block seen.
class Stacks {
 public:
#if defined(__SANITIZE_ADDRESS__)
  static constexpr size_t kBytes = size_t{256} << 10;  // instrumented frames are larger
#else
  static constexpr size_t kBytes = size_t{64} << 10;
#endif

  char* get(int threads) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    if (threads > count_) {
      if (base_ != nullptr) {
        munmap(base_, count_ * (kBytes + page));
      }
      const size_t bytes = threads * (kBytes + page);
      void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (base == MAP_FAILED) {
        throw std::bad_alloc();
      }
      base_ = static_cast<char*>(base);
      bytes_ = bytes;
      count_ = threads;
      for (int i = 0; i < threads; ++i) {
        mprotect(base_ + i * (kBytes + page), page, PROT_NONE);
      }
    }
    return base_;
  }

  static char* stack(char* base, int i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return base + i * (kBytes + page) + page;
  }

  bool hold(const void* address) const {
    const auto* p = static_cast<const char*>(address);
    return p >= base_ && p < base_ + bytes_;
  }

 private:
  char* base_ = nullptr;
  size_t bytes_ = 0;
  int count_ = 0;
};

// The stacks every launch uses (launches never overlap).
inline Stacks& fiber_stacks() {
  static Stacks stacks;
  return stacks;
}

// A fiber's whole life: the kernel call, then back to the scheduler for good.
inline void run_thread() {
  Block& b = current_block();
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler.stack, &b.scheduler.bytes);  // the launching stack
#endif
  try {
    b.body();
  } catch (const std::exception& error) {
    if (b.error.empty()) {
      b.error = error.what();
    }
  }
  Thread& t = *b.current;
  t.wait = Wait::kDone;
  switch_fiber(t.fiber, b.scheduler, /*from_exits=*/true);
  __builtin_unreachable();
}

// Parks the current thread until the scheduler completes its barrier or warp op.
inline uint64_t wait_at(Wait wait) {
  Thread& t = current_thread();
  t.wait = wait;
  switch_fiber(t.fiber, current_block().scheduler);
  return t.result;
}

inline int barrier(Barrier kind, bool predicate) {
  Thread& t = current_thread();
  t.barrier = kind;
  t.predicate = predicate;
  return static_cast<int>(wait_at(Wait::kBarrier));
}

inline uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int source, const char* file, int line) {
  Thread& t = current_thread();
  t.op = op;
  t.mask = mask;
  t.value = value;
  t.source = source;
  t.file = file;
  t.line = line;
  return wait_at(Wait::kWarp);
}

inline std::string where(const Thread& t) {
  std::ostringstream out;
  out << "thread " << t.index.x << ": ";
  if (t.wait == Wait::kBarrier) {
    out << name(t.barrier);
  } else {
    out << name(t.op) << " (mask 0x" << std::hex << t.mask << std::dec << ") at " << t.file << ":" << t.line;
  }
  return out.str();
}

inline void release(Thread& t, uint64_t result) {
  t.result = result;
  t.wait = Wait::kRunnable;
}

// Completes the warp ops that can complete (see the top of this file); false if none can
// (or an op is invalid: b.error says why).
inline bool resolve_warps(Block& b) {
  bool progressed = false;
  const int n = static_cast<int>(b.threads.size());
  for (int first = 0; first < n; first += 32) {
    Thread* warp = &b.threads[first];
    const int lanes = n - first < 32 ? n - first : 32;
    for (int l = 0; l < lanes; ++l) {
      Thread& t = warp[l];
      if (t.wait != Wait::kWarp) {
        continue;
      }
      if (t.op == WarpOp::kCoalesce) {
        unsigned group = 0;
        for (int o = 0; o < lanes; ++o) {
          const Thread& u = warp[o];
          if (u.wait == Wait::kWarp && u.op == WarpOp::kCoalesce && u.line == t.line &&
              std::strcmp(u.file, t.file) == 0) {
            group |= 1u << o;
          }
        }
        for (int o = 0; o < lanes; ++o) {
          if (group >> o & 1u) {
            release(warp[o], group);
          }
        }
        progressed = true;
        continue;
      }
      if (!(t.mask >> l & 1u)) {
        b.error = where(t) + ": the calling lane is not in the mask";
        return false;
      }
      bool ready = true;
      for (int o = 0; o < 32 && ready; ++o) {
        if (!(t.mask >> o & 1u)) {
          continue;
        }
        if (o >= lanes || warp[o].wait == Wait::kDone) {
          b.error = where(t) + ": lane " + std::to_string(o) + " of the mask has exited or does not exist";
          return false;
        }
        const Thread& u = warp[o];
        ready = u.wait == Wait::kWarp && u.op == t.op && u.mask == t.mask;
      }
      if (!ready) {
        continue;
      }
      if (t.op == WarpOp::kShuffle && !(t.mask >> t.source & 1u)) {
        b.error = where(t) + ": shuffles from lane " + std::to_string(t.source) + ", outside the group";
        return false;
      }
      uint64_t ballot = 0;
      for (int o = 0; o < 32; ++o) {
        if ((t.mask >> o & 1u) && warp[o].value != 0) {
          ballot |= uint64_t{1} << o;
        }
      }
      const uint64_t shuffled = warp[t.source].value;
      uint64_t results[32] = {};
      for (int o = 0; o < 32; ++o) {
        if (!(t.mask >> o & 1u)) {
          continue;
        }
        if (t.op == WarpOp::kBallot) {
          results[o] = ballot;
        } else if (t.op == WarpOp::kShuffle) {
          results[o] = shuffled;
        } else {
          for (int p = 0; p < 32; ++p) {
            if ((t.mask >> p & 1u) && warp[p].value == warp[o].value) {
              results[o] |= uint64_t{1} << p;
            }
          }
        }
      }
      for (int o = 0; o < 32; ++o) {
        if (t.mask >> o & 1u) {
          release(warp[o], results[o]);
        }
      }
      progressed = true;
    }
  }
  return progressed;
}

// Completes a barrier every thread waits at; false if there is none. A barrier that threads
// which have exited never reached is an error: CUDA allows barriers in conditional code only
// when the whole block takes the same branch.
inline bool resolve_barrier(Block& b) {
  int waiting = 0;
  int exited = 0;
  uint64_t count = 0;
  const Thread* first = nullptr;
  for (const Thread& t : b.threads) {
    if (t.wait == Wait::kDone) {
      ++exited;
      continue;
    }
    if (t.wait != Wait::kBarrier) {
      return false;
    }
    if (first == nullptr) {
      first = &t;
    } else if (t.barrier != first->barrier) {
      b.error = "threads wait at different barriers: " + where(*first) + ", " + where(t);
      return false;
    }
    ++waiting;
    count += t.predicate ? 1 : 0;
  }
  if (waiting == 0) {
    return false;
  }
  if (exited > 0) {
    b.error = "deadlock: " + std::to_string(exited) + " threads exited without reaching the barrier that " +
              where(*first) + " and " + std::to_string(waiting - 1) + " others wait at";
    return false;
  }
  const uint64_t result = first->barrier == Barrier::kOr ? (count > 0 ? 1 : 0) : count;
  for (Thread& t : b.threads) {
    if (t.wait == Wait::kBarrier) {
      release(t, result);
    }
  }
  ++b.epoch;
  return true;
}

inline std::string describe_deadlock(const Block& b) {
  std::string text = "deadlock: no thread can go on;";
  int shown = 0;
  for (const Thread& t : b.threads) {
    if (t.wait != Wait::kDone && shown++ < 8) {
      text += " " + where(t) + ";";
    }
  }
  return text;
}

// The __shared__ variables of every kernel (the linker names the section's ends).
extern "C" char __start_swamp_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_swamp_emu_shared[] __attribute__((weak, visibility("hidden")));

// Shared memory as a new block finds it: a different garbage byte everywhere for every block.
inline void fill_shared_memory() {
  static unsigned char garbage = 0x5b;
  garbage = static_cast<unsigned char>(garbage * 13 + 101);
  if (__start_swamp_emu_shared != nullptr) {
    std::memset(__start_swamp_emu_shared, garbage, __stop_swamp_emu_shared - __start_swamp_emu_shared);
  }
}

// Runs every thread of block b.index to the end; b.error says why not.
inline void run_block(Block& b, char* stacks) {
  static uint64_t runs = 0;
  b.run = ++runs;
  b.epoch = 1;
  fill_shared_memory();
  for (size_t i = 0; i < b.threads.size(); ++i) {
    Thread& t = b.threads[i];
    t = Thread{};
    t.index = dim3(static_cast<unsigned>(i));
    t.fiber.start(Stacks::stack(stacks, static_cast<int>(i)), Stacks::kBytes, run_thread);
  }
  // Threads run in a new pseudo-random order after every synchronisation (seeded by the block
  // index, so runs repeat): code that needs a barrier it lacks (a read of shared memory before
  // another thread's write) sees the write missing in some order, as on the device.
  std::vector<Thread*> order;
  for (Thread& t : b.threads) {
    order.push_back(&t);
  }
  uint64_t state = 0x9e3779b97f4a7c15ull ^ (b.index.x + 65536ull * (b.index.y + 65536ull * b.index.z));
  while (b.error.empty()) {
    for (size_t i = order.size(); i > 1; --i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      std::swap(order[i - 1], order[(state >> 33) % i]);
    }
    bool alive = false;
    for (Thread* runnable : order) {
      Thread& t = *runnable;
      if (t.wait == Wait::kRunnable) {
        b.current = &t;
        switch_fiber(b.scheduler, t.fiber);
        b.current = nullptr;  // the scheduler runs: no thread's accesses
        if (!b.error.empty()) {
          return;
        }
      }
      alive = alive || t.wait != Wait::kDone;
    }
    if (!alive) {
      return;
    }
    if (!resolve_warps(b) && b.error.empty() && !resolve_barrier(b) && b.error.empty()) {
      b.error = describe_deadlock(b);
    }
  }
}

// Numbers the launches of every kernel in the process (a static of Launch would count per kernel).
inline uint64_t next_launch() {
  static uint64_t launches = 0;
  return ++launches;
}

// kernel<<<grid, block, shared, stream>>>(args...) as launch(kernel, grid, block, shared, stream)(args...).
template <typename... Params>
class Launch {
 public:
  Launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared)
      : kernel_(kernel), grid_(grid), block_(block), shared_(shared) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    LastError& last = last_error();
    if (block_.x == 0 || block_.x > 1024 || block_.y != 1 || block_.z != 1 || grid_.x == 0 || grid_.y == 0 ||
        grid_.z == 0 || shared_ != 0) {
      last = {cudaErrorInvalidValue, "emulated launch: unsupported configuration (1-D blocks of at most "
                                     "1024 threads, no dynamic shared memory)"};
      return;
    }
    const std::tuple<std::decay_t<Args>...> copied(std::forward<Args>(args)...);
    Block b;
    b.launch = next_launch();
    b.dim = block_;
    b.grid = grid_;
    b.threads.resize(block_.x);
    b.body = [&] { std::apply(kernel_, copied); };
    active_block() = &b;
    char* region = fiber_stacks().get(static_cast<int>(block_.x));
    for (unsigned z = 0; z < grid_.z && b.error.empty(); ++z) {
      for (unsigned y = 0; y < grid_.y && b.error.empty(); ++y) {
        for (unsigned x = 0; x < grid_.x && b.error.empty(); ++x) {
          b.index = dim3(x, y, z);
          run_block(b, region);
        }
      }
    }
    active_block() = nullptr;
    if (!b.error.empty()) {
      std::ostringstream message;
      message << "emulated kernel failed in block (" << b.index.x << ", " << b.index.y << ", " << b.index.z
              << "): " << b.error;
      last = {cudaErrorLaunchFailure, message.str()};
    }
  }

 private:
  void (*kernel_)(Params...);
  dim3 grid_, block_;
  size_t shared_;
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared = 0,
                         cudaStream_t = nullptr) {
  return Launch<Params...>(kernel, grid, block, shared);
}

}  // namespace swamp_emu

// ------------------------------------------------------------------------ intrinsics
inline void __syncthreads() { swamp_emu::barrier(swamp_emu::Barrier::kSync, false); }
inline int __syncthreads_count(int predicate) { return swamp_emu::barrier(swamp_emu::Barrier::kCount, predicate != 0); }
inline int __syncthreads_or(int predicate) { return swamp_emu::barrier(swamp_emu::Barrier::kOr, predicate != 0); }

inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(swamp_emu::warp_op(swamp_emu::WarpOp::kBallot, mask, predicate != 0, 0, file, line));
}

template <typename T>
unsigned __match_any_sync(unsigned mask, T value, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(std::is_integral_v<T> && sizeof(T) <= 8, "__match_any_sync takes 32- or 64-bit integers");
  return static_cast<unsigned>(
      swamp_emu::warp_op(swamp_emu::WarpOp::kMatchAny, mask, static_cast<uint64_t>(value), 0, file, line));
}

// Atomics tell the racecheck build (racecheck.cpp) of their accesses themselves: threads may
// update a word atomically at the same time, but not also read or write it plainly.
#if defined(__SANITIZE_THREAD__)
extern "C" void swamp_emu_racecheck_atomic(const void* address, size_t bytes, const void* call_site);
#define SWAMP_EMU_ATOMIC(address) \
  swamp_emu_racecheck_atomic(address, sizeof(*(address)), __builtin_return_address(0))
#else
#define SWAMP_EMU_ATOMIC(address) ((void)0)
#endif

template <typename T, typename U>
__attribute__((no_sanitize_thread)) T atomicAdd(T* address, U value) {
  static_assert(std::is_same_v<T, U>, "atomicAdd: the value has the address's type");
  SWAMP_EMU_ATOMIC(address);
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename T>
__attribute__((no_sanitize_thread)) T atomicCAS(T* address, T compare, T value) {
  SWAMP_EMU_ATOMIC(address);
  const T old = *address;
  if (old == compare) {
    *address = value;
  }
  return old;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __fmul_rn(float a, float b) { return a * b; }

inline unsigned __float_as_uint(float x) {
  unsigned bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}
