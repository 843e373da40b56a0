// The Hopper kernel of batch prefill (sm_90a; its translation unit is prefill_hopper.cu): the
// same work items, plan, partials and merge as the portable kernel, with the two GEMMs on wgmma
// (kernels/cuda/common/wgmma.cuh) and the loads on their own warpgroup (HopperPrefillTraits).
// K/V arrive through cp.async, because a page of a few tokens is too small a box for TMA. Narrow
// tiles (decodes) run the portable per-item body (prefill_item.cuh) on the consumer warps.
// This file: the producer warpgroup and the kernel; the consumer warpgroups are in
// prefill_hopper_consumer.cuh, what the roles share in prefill_hopper_roles.cuh.
#ifndef ATTND_KERNELS_CUDA_PREFILL_PREFILL_HOPPER_CUH_
#define ATTND_KERNELS_CUDA_PREFILL_PREFILL_HOPPER_CUH_

#include <cstdint>

#include "kernels/cuda/common/device_utils.cuh"
#include "kernels/cuda/common/wgmma.cuh"
#include "kernels/cuda/prefill/prefill_hopper_consumer.cuh"
#include "kernels/cuda/prefill/prefill_hopper_roles.cuh"
#include "kernels/cuda/prefill/prefill_item.cuh"
#include "kernels/cuda/prefill/prefill_params.cuh"
#include "kernels/cuda/prefill/prefill_work_queue.cuh"
#include "kernels/prefill_plan.h"

namespace attnd::kernels::cuda::detail {

// The producer warpgroup: K(t) and V(t) of every tile of a wide item into their rings' slots for
// g, g counting the CTA's wide tiles. Each thread's copies arrive on the slot's "full" barrier when
// they land (CpAsyncMbarArrive), so the producer never waits for its own loads, only for the
// consumers to free a slot (it used to wait for K(t) with cp.async.wait_group after issuing V(t),
// which itself waited for V(t - 2)'s slot).
//
// Thread tid resolves key tid of each tile to the address of its row, one tile early, and
// publishes it in shared memory for the threads that copy that row. A copy is then a 16-byte
// load of an address, an add and a cp.async: issuing a tile took about 23 instructions per
// cp.async when each copy recomputed its row's address from a page offset, and the consumers
// waited for the late copies.
template <typename T, int D>
__device__ __forceinline__ void ProduceItem(const PrefillParams& p, const ItemDesc& it, int kvh,
                                            unsigned char* smem, const HopperSmem<D>& sm,
                                            uint32_t& g) {
  using Tr = HopperPrefillTraits<D>;
  constexpr int kKeys = Tr::kKeys;
  constexpr int kRowStep = Tr::kProducerThreads / Tr::kChunks;
  constexpr int kLoads = Tr::kLoadsPerThread;  // rows r0 + kRowStep i, i < kLoads
  static_assert(kLoads % 2 == 0, "row addresses are read two at a time");
  const int tid = threadIdx.x;  // 0 .. 127
  const int ch = tid % Tr::kChunks, r0 = tid / Tr::kChunks;
  const int num_tiles = (it.t1 - it.t0 + kKeys - 1) / kKeys;
  const char* kv = reinterpret_cast<const char*>(static_cast<const T*>(p.kv_layer) +
                                                 kvh * p.head_stride);
  const int32_t* pages = p.kv_indices + it.page_off;
  // Row r's address at (r % kRowStep) * kLoads + r / kRowStep: a copying thread's rows are
  // consecutive. A key past the item's end has its address with the top bit set: its copy
  // reads nothing and fills zeros (src-size 0) but still names memory of the pool.
  uint64_t* rows = reinterpret_cast<uint64_t*>(smem + Tr::kOffOffset);
  constexpr uint64_t kSkip = uint64_t{1} << 63;
  const int my_slot = (tid % kRowStep) * kLoads + tid / kRowStep;
  const uint64_t k_add = static_cast<uint64_t>(ch) * 16;
  const uint64_t v_add = k_add + static_cast<uint64_t>(p.v_offset) * sizeof(T);

  uint64_t pf_row = 0;
  auto fetch = [&](int t) {
    const int tok = it.t0 + t * kKeys + tid;
    pf_row = reinterpret_cast<uint64_t>(kv) | kSkip;
    if (t < num_tiles && tok < it.t1) {
      uint32_t pg, slot;
      p.page_div.Divmod(static_cast<uint32_t>(tok), pg, slot);
      const int64_t page = __ldg(pages + pg);
      pf_row = reinterpret_cast<uint64_t>(
          kv + (page * p.page_stride + static_cast<int64_t>(slot) * p.slot_stride) * sizeof(T));
    }
  };
  auto issue = [&](const uint64_t* addrs, uint32_t dst_base, uint64_t add) {
    const uint32_t dst0 = dst_base + SwizzledOffset(kKeys, r0, ch);
#pragma unroll
    for (int i = 0; i < kLoads; i += 2) {
      const ulonglong2 a2 = *reinterpret_cast<const ulonglong2*>(addrs + r0 * kLoads + i);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const uint64_t a = e == 0 ? a2.x : a2.y;
        // Row r0 + kRowStep (i + e): same swizzle phase as r0 (kRowStep is a multiple of 8).
        CpAsync16(dst0 + (i + e) * kRowStep * 128,
                  reinterpret_cast<const void*>((a & ~kSkip) + add), (a & kSkip) == 0);
      }
    }
  };
  static_assert(kRowStep % 8 == 0, "a thread's rows share the swizzle phase of row r0");

  fetch(0);
  for (int t = 0; t < num_tiles; ++t, ++g) {
    uint64_t* addrs = rows + (g & 1) * kKeys;
    addrs[my_slot] = pf_row;
    fetch(t + 1);
    ProducerSync();  // tile g's addresses written; everyone's reads of tile g - 2's done
    const uint32_t ks = RingSlot<Tr::kKSlots>(g), vs = RingSlot<Tr::kVSlots>(g);
    MbarWait(sm.empty_k(ks), RingParity<Tr::kKSlots>(g) ^ 1);
    issue(addrs, sm.k_slot(ks), k_add);
    CpAsyncMbarArrive(sm.full_k(ks));
    MbarWait(sm.empty_v(vs), RingParity<Tr::kVSlots>(g) ^ 1);
    issue(addrs, sm.v_slot(vs), v_add);
    CpAsyncMbarArrive(sm.full_v(vs));
  }
}

template <typename T, int D, bool kPingPong>
__global__ void __launch_bounds__(HopperPrefillTraits<D>::kThreads, 1)
    BatchPrefillHopperKernel(const __grid_constant__ PrefillParams p) {
#if ATTND_WGMMA_AVAILABLE
  using Tr = HopperPrefillTraits<D>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // Swizzle atoms need 1024-byte alignment, which the dynamic window does not promise.
  const uint32_t raw = SmemAddr(smem_raw);
  unsigned char* smem = smem_raw + (((raw + 1023u) & ~1023u) - raw);
  const HopperSmem<D> sm{SmemAddr(smem)};
  if (threadIdx.x == 0) {
    for (int s = 0; s < Tr::kKSlots; ++s) {
      MbarInit(sm.full_k(s), Tr::kProducerThreads);
      MbarInit(sm.empty_k(s), Tr::kConsumerThreads / 32);
    }
    for (int s = 0; s < Tr::kVSlots; ++s) {
      MbarInit(sm.full_v(s), Tr::kProducerThreads);
      MbarInit(sm.empty_v(s), Tr::kConsumerThreads / 32);
    }
    for (int e = 0; e < 2; ++e) {
      MbarInit(sm.work_full(e), 1);
      MbarInit(sm.work_empty(e), Tr::kConsumerThreads);
    }
  }
  __syncthreads();
  const int num_items = __ldg(p.plan);
  const WorkQueue work{p, sm.work_full(0), sm.work_empty(0), sm.work_unit(0), num_items};
  const int4* items = reinterpret_cast<const int4*>(p.plan + p.items_offset);
  auto item_at = [&](int item) {
    const int4 a = __ldg(items + 2 * item);
    const int4 b = __ldg(items + 2 * item + 1);
    return ItemDesc{a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  };
  GridDependencyWait();
  uint32_t g = 0;  // wide tiles so far (RingSlot, RingParity)
  // Registers as HopperPrefillTraits budgets them (128 x 56 + 256 x 224). Each
  // role has its own loop so that the compiler can hold each to its budget. A narrow item
  // reuses the whole buffer, so nothing of a wide item may be in flight around it.
  if (threadIdx.x < Tr::kProducerThreads) {
    ShrinkRegisters<Tr::kProducerRegs>();
    for (int n = 0;; ++n) {
      const WorkUnit u = work.ProducerNext(n);
      if (u.item >= num_items) break;
      const ItemDesc it = item_at(u.item);
      if (it.q_len * p.group <= kPrefillDecodeRows) {
        RolesSync<Tr::kThreads>();
        RolesSync<Tr::kThreads>();
      } else {
        ProduceItem<T, D>(p, it, u.kvh, smem, sm, g);
      }
    }
  } else {
    GrowRegisters<Tr::kConsumerRegs>();
    const int wg = __shfl_sync(0xffffffffu, (threadIdx.x - Tr::kProducerThreads) >> 7, 0);
    if (wg == 1) PassTurn<kPingPong>(wg);  // warpgroup 0 goes first
    for (int n = 0;; ++n) {
      const WorkUnit u = work.ConsumerNext(n);
      if (u.item >= num_items) break;
      const ItemDesc it = item_at(u.item);
      if (it.q_len * p.group <= kPrefillDecodeRows) {
        RolesSync<Tr::kThreads>();
        RunItem<T, D, true, 1, HopperNarrowTraits<D>>(p, it, u.kvh, 0, smem);
        RolesSync<Tr::kThreads>();
      } else {
        if (p.soft_cap) {
          ConsumeItem<T, D, true, kPingPong>(p, it, u.kvh, smem, sm, g);
        } else {
          ConsumeItem<T, D, false, kPingPong>(p, it, u.kvh, smem, sm, g);
        }
      }
    }
    if (wg == 0) AwaitTurn<kPingPong>(wg);  // takes warpgroup 1's last pass: none left pending
  }
  work.Finish();
  LaunchDependents();
#else
  __trap();  // built without sm_90a code: the host never picks this kernel then
#endif
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_PREFILL_PREFILL_HOPPER_CUH_
