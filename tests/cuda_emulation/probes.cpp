// Kernels probing the emulated device model (tests/test_cuda_emulation.py); plain C entry
// points over int arrays, each returning the launch's error code and message.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdio>

namespace cg = cooperative_groups;

namespace {

// out[t] = ballot of odd lanes, out[n + t] = the lanes of t's warp sharing t's value t % 3.
__global__ void warp_votes(int* out, int n) {
  const int t = threadIdx.x;
  out[t] = static_cast<int>(__ballot_sync(0xffffffffu, t & 1));
  out[n + t] = static_cast<int>(__match_any_sync(0xffffffffu, static_cast<unsigned>(t % 3)));
}

// Lanes with t % 4 == 1 form a coalesced group: out = [rank, size, rank 0's thread index]
// for them, -1 for the others.
__global__ void coalesced(int* out) {
  const int t = threadIdx.x;
  out[3 * t] = out[3 * t + 1] = out[3 * t + 2] = -1;
  if (t % 4 == 1) {
    const cg::coalesced_group group = cg::coalesced_threads();
    out[3 * t] = static_cast<int>(group.thread_rank());
    out[3 * t + 1] = static_cast<int>(group.size());
    out[3 * t + 2] = group.shfl(t, 0);
  }
}

// Shared memory is one per block: thread 0 writes, all read after the barrier; then the
// block's count of even threads and whether any thread index equals `needle`.
__global__ void block_sync(int* out, int needle) {
  __shared__ int seen;
  const int t = threadIdx.x;
  if (t == 0) {
    seen = 100 + static_cast<int>(blockIdx.x);
  }
  __syncthreads();
  const int count = __syncthreads_count(t % 2 == 0);
  const int any = __syncthreads_or(t == needle);
  if (t == 0) {
    out[3 * blockIdx.x] = seen;
    out[3 * blockIdx.x + 1] = count;
    out[3 * blockIdx.x + 2] = any;
  }
}

// Thread 0 publishes a value that the others read without the barrier they need.
__global__ void missing_barrier(int* out) {
  __shared__ int value;
  if (threadIdx.x == 0) {
    value = 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    value = 42;
  }
  out[threadIdx.x] = value;
}

// Every thread adds 1 to a shared counter atomically; thread 0 reads it after a barrier.
__global__ void atomic_count(int* out) {
  __shared__ int count;
  if (threadIdx.x == 0) {
    count = 0;
  }
  __syncthreads();
  atomicAdd(&count, 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    out[blockIdx.x] = count;
  }
}

// Thread 0 of every block adds 1 to out[0]: atomically, or (racy) by a plain read and write,
// which nothing orders between blocks.
__global__ void global_counter(int* out, int racy) {
  if (threadIdx.x == 0) {
    if (racy) {
      out[0] += 1;
    } else {
      atomicAdd(&out[0], 1);
    }
  }
}

// Reads shared memory before any write: out[block] = what the block found there.
__global__ void unwritten_shared(int* out) {
  __shared__ int found;
  if (threadIdx.x == 0) {
    out[blockIdx.x] = found;
    found = 0;
  }
}

// Threads of the upper half of the block skip the barrier: a deadlock on a GPU.
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < blockDim.x / 2) {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Lane 0 leaves before the others vote with a full mask.
__global__ void vote_after_exit(int* out) {
  if (threadIdx.x == 0) {
    return;
  }
  out[threadIdx.x] = static_cast<int>(__ballot_sync(0xffffffffu, 1));
}

thread_local char message[512];

int finish() {
  const cudaError_t error = cudaGetLastError();
  std::snprintf(message, sizeof message, "%s", cudaGetErrorString(error));
  return static_cast<int>(error);
}

}  // namespace

extern "C" {

const char* probe_message() { return message; }

int probe_warp_votes(int* out, int threads) {
  swamp_emu::launch(warp_votes, 1, threads)(out, threads);
  return finish();
}

int probe_coalesced(int* out, int threads) {
  swamp_emu::launch(coalesced, 1, threads)(out);
  return finish();
}

int probe_block_sync(int* out, int blocks, int threads, int needle) {
  swamp_emu::launch(block_sync, blocks, threads)(out, needle);
  return finish();
}

int probe_missing_barrier(int* out, int threads) {
  swamp_emu::launch(missing_barrier, 1, threads)(out);
  return finish();
}

int probe_atomic_count(int* out, int blocks, int threads) {
  swamp_emu::launch(atomic_count, blocks, threads)(out);
  return finish();
}

int probe_global_counter(int* out, int blocks, int racy) {
  swamp_emu::launch(global_counter, blocks, 32)(out, racy);
  return finish();
}

int probe_unwritten_shared(int* out, int blocks) {
  swamp_emu::launch(unwritten_shared, blocks, 32)(out);
  return finish();
}

int probe_divergent_barrier(int* out, int threads) {
  swamp_emu::launch(divergent_barrier, 1, threads)(out);
  return finish();
}

int probe_vote_after_exit(int* out, int threads) {
  swamp_emu::launch(vote_after_exit, 1, threads)(out);
  return finish();
}

}  // extern "C"
