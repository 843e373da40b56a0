// The Hopper prefill's roles and what they share (prefill_hopper.cuh): the wide-item state in
// shared memory, the K/V rings' slots and phases, and the named barriers between the producer
// warpgroup and the two consumer warpgroups.
#ifndef ATTND_KERNELS_CUDA_PREFILL_PREFILL_HOPPER_ROLES_CUH_
#define ATTND_KERNELS_CUDA_PREFILL_PREFILL_HOPPER_ROLES_CUH_

#include <cstdint>

#include "kernels/cuda/prefill/prefill_params.cuh"

namespace attnd::kernels::cuda::detail {

// Shared-memory addresses of the wide-item state.
template <int D>
struct HopperSmem {
  using Tr = HopperPrefillTraits<D>;
  uint32_t base;
  __device__ uint32_t q() const { return base; }
  __device__ uint32_t k_slot(int s) const { return base + Tr::kKRingOffset + s * Tr::kTileBytes; }
  __device__ uint32_t v_slot(int s) const { return base + Tr::kVRingOffset + s * Tr::kTileBytes; }
  // "full": the producer's loads of a slot landed; "empty": the consumers are done with it.
  __device__ uint32_t full_k(int s) const { return base + Tr::kBarrierOffset + 8 * s; }
  __device__ uint32_t full_v(int s) const { return full_k(Tr::kKSlots) + 8 * s; }
  __device__ uint32_t empty_k(int s) const { return full_v(Tr::kVSlots) + 8 * s; }
  __device__ uint32_t empty_v(int s) const { return empty_k(Tr::kKSlots) + 8 * s; }
  // The work ring (persistent grid): unit n sits in entry n % 2.
  __device__ uint32_t work_full(int e) const { return base + Tr::kWorkOffset + 8 * e; }
  __device__ uint32_t work_empty(int e) const { return work_full(2) + 8 * e; }
  __device__ uint32_t work_unit(int e) const { return work_full(4) + 4 * e; }
};

// Tile g (the CTA's g-th wide tile) in a ring of kSlots: its slot, and the parity of the phase
// in which its barriers complete.
template <int kSlots>
__device__ __forceinline__ uint32_t RingSlot(uint32_t g) { return g % kSlots; }
template <int kSlots>
__device__ __forceinline__ uint32_t RingParity(uint32_t g) { return (g / kSlots) & 1; }

// Ping-pong between the consumer warpgroups (FlashAttention-3): a warpgroup issues its GEMMs
// only after the other issued its own, so one's softmax runs under the other's GEMMs. Barrier
// 5 + wg is warpgroup wg's turn. The kernel comes with and without it (kPingPong): the one
// without serves batches of narrow items only, which its code runs 1-3% faster (measured).
// ATTND_PREFILL_PINGPONG=0 turns it off everywhere (experiments).
#ifndef ATTND_PREFILL_PINGPONG
#define ATTND_PREFILL_PINGPONG 1
#endif
template <bool kPingPong>
__device__ __forceinline__ void AwaitTurn(int wg) {
  if (kPingPong && ATTND_PREFILL_PINGPONG)
    asm volatile("bar.sync %0, 256;\n" ::"r"(5 + wg) : "memory");
}
template <bool kPingPong>
__device__ __forceinline__ void PassTurn(int wg) {
  if (kPingPong && ATTND_PREFILL_PINGPONG)
    asm volatile("bar.arrive %0, 256;\n" ::"r"(6 - wg) : "memory");
}
__device__ __forceinline__ void WarpgroupSync(int wg) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(3 + wg) : "memory");
}
// All kThreads of the CTA, around a narrow item, which the producer and the consumers reach from
// different statements: the barrier without .aligned allows that; __syncthreads and bar.sync
// (barrier.sync.aligned) do not (compute-sanitizer synccheck: "Divergent thread(s) in block").
// Named barriers: 1 the narrow body's, 2 the producer's, 3-4 the warpgroups', 5-6 the
// ping-pong's, 7 this.
template <int kThreads>
__device__ __forceinline__ void RolesSync() {
  asm volatile("barrier.sync 7, %0;\n" ::"n"(kThreads) : "memory");
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_PREFILL_PREFILL_HOPPER_ROLES_CUH_
