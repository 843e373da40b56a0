// The Hopper prefill kernel's source of work: which (item, kv head) units a CTA runs, from its
// grid position or, for a persistent grid, from a device counter (prefill_hopper.cuh).
#ifndef ATTND_KERNELS_CUDA_PREFILL_PREFILL_WORK_QUEUE_CUH_
#define ATTND_KERNELS_CUDA_PREFILL_PREFILL_WORK_QUEUE_CUH_

#include <cstdint>

#include "kernels/cuda/common/wgmma.cuh"
#include "kernels/cuda/prefill/prefill_params.cuh"

namespace attnd::kernels::cuda::detail {

// Barrier 2: the producer warpgroup's 128 threads.
__device__ __forceinline__ void ProducerSync() { asm volatile("bar.sync 2, 128;\n" ::: "memory"); }

// A unit of work: one item of the plan for one kv head. item == num_items: no more.
struct WorkUnit {
  int item, kvh;
};

// Which units a CTA runs. Without p.work_counters: kv head blockIdx.x, items blockIdx.y,
// + gridDim.y, ... (a CTA per item; the hardware dispatches them in plan order, longest first).
// With them: a persistent grid takes units w = item * kv_heads + kvh in that order from a device
// counter, the same greedy schedule without a CTA's launch and start per unit, and the
// producer loads the next unit's keys while the consumers finish the last. The producer's thread
// 0 takes the units and passes them to the consumers through a two-entry ring.
struct WorkQueue {
  const PrefillParams& p;
  uint32_t full, empty, units;  // shared memory: entry e's barriers at + 8 e, its unit at + 4 e
  int num_items;

  __device__ WorkUnit Decode(int w) const {
    const int total = num_items * p.num_kv_heads;
    if (w >= total) return {num_items, 0};
    return {w / p.num_kv_heads, w % p.num_kv_heads};
  }
  __device__ WorkUnit Static(int n) const {
    const int item = static_cast<int>(blockIdx.y + n * gridDim.y);
    return {min(item, num_items), static_cast<int>(blockIdx.x)};
  }
  // The producer warpgroup's n-th unit (all 128 threads).
  __device__ WorkUnit ProducerNext(int n) const {
    if (p.work_counters == nullptr) return Static(n);
    const int e = n & 1;
    if (threadIdx.x == 0) {
      MbarWait(empty + 8 * e, ((n >> 1) & 1) ^ 1);
      const int w = atomicAdd(p.work_counters, 1);
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(units + 4 * e), "r"(w) : "memory");
      MbarArriveIf(full + 8 * e, true);  // releases the entry to the consumers
    }
    __syncwarp();    // warp 0 whole again: the named barrier is aligned (bar.sync)
    ProducerSync();  // the entry is written
    int w;
    asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(w) : "r"(units + 4 * e) : "memory");
    return Decode(w);
  }
  // A consumer thread's n-th unit.
  __device__ WorkUnit ConsumerNext(int n) const {
    if (p.work_counters == nullptr) return Static(n);
    const int e = n & 1;
    MbarWait(full + 8 * e, (n >> 1) & 1);
    int w;
    asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(w) : "r"(units + 4 * e) : "memory");
    // Every reader releases its own read (the barrier counts all consumer threads), the ordering
    // compute-sanitizer racecheck follows; one arrival per warp after __syncwarp is as correct,
    // but racecheck reports it as a hazard with the producer's next write.
    MbarArriveIf(empty + 8 * e, true);
    return Decode(w);
  }
  // After the last unit (every thread): the last CTA to finish zeroes the counters for the
  // next launch; every CTA took its last unit before it counts itself finished.
  __device__ void Finish() const {
    if (p.work_counters == nullptr) return;
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      if (atomicAdd(p.work_counters + 1, 1) == static_cast<int>(gridDim.x * gridDim.y) - 1) {
        __threadfence();
        atomicExch(p.work_counters, 0);
        atomicExch(p.work_counters + 1, 0);
      }
    }
  }
};

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_PREFILL_PREFILL_WORK_QUEUE_CUH_
