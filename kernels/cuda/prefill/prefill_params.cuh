// Device-side parameters, work-item descriptor and tile shapes of the batch prefill kernels
// (portable and Hopper), and the addressing of a tile's packed rows.
#ifndef ATTND_KERNELS_CUDA_PREFILL_PREFILL_PARAMS_CUH_
#define ATTND_KERNELS_CUDA_PREFILL_PREFILL_PARAMS_CUH_

#include <cstdint>

#include "kernels/cuda/common/device_utils.cuh"

namespace attnd::kernels::cuda::detail {

struct PrefillParams {
  const void* kv_layer;  // pool + layer offset
  int64_t page_stride;
  int64_t v_offset;
  int64_t slot_stride;
  int64_t head_stride;
  FastDivmod page_div;
  FastDivmod group_div;
  const int32_t* kv_indices;
  const void* q;
  int64_t q_sn, q_sh;
  void* out;
  int64_t o_sn, o_sh;
  float* lse;
  int num_qo_heads;
  int num_kv_heads;
  int group;
  int causal;
  int window_left;   // < 0: none
  int soft_cap;
  float scale_pre;
  float scale_post;
  const int32_t* plan;
  int items_offset;
  int merges_offset;
  float* partial_out;  // [slot][kv_head][kPrefillWideRows][D]
  float* partial_lse;  // [slot][kv_head][kPrefillWideRows], log2 units
  // Hopper kernel: non-null, a persistent grid whose CTAs take (item, kv head) units from
  // work_counters[0] (work_counters[1] counts finished CTAs); both zero between launches.
  int* work_counters;
};

struct ItemDesc {
  int q_start, q_len, pos0, row0, t0, t1, page_off, slot;
};

// Output row of packed row R (query R / group, head R % group of kv head kvh).
__device__ __forceinline__ int64_t OutRowOffset(const PrefillParams& p, int q_start, int R,
                                                int kvh, int64_t sn, int64_t sh, int* head) {
  uint32_t qi, g;
  p.group_div.Divmod(static_cast<uint32_t>(R), qi, g);
  *head = kvh * p.group + static_cast<int>(g);
  return (static_cast<int64_t>(q_start) + qi) * sn + static_cast<int64_t>(*head) * sh;
}

// The portable kernel. A CTA owns one work item (a tile of query rows of one kv head, a range of
// keys). The CTA loads 64-key K/V stages through a shared cp.async pipeline. Wide tiles
// (kPrefillWideRows = 128 rows): each warp owns kMT 16-row m-tiles and runs every key of a stage
// (FlashAttention-2), so each K/V fragment read from shared memory feeds kMT MMAs; a pass covers
// kRows = 4 warps x 16 kMT rows, and head_dim 256 (kMT 1, registers) runs a tile in two passes.
// Narrow tiles (at most 16 rows: decodes): the warps share the 16 rows and each takes 16 keys of
// a stage, merging their states in shared memory at the end, in a fixed order.
template <int D>
struct PrefillTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMT = D <= 128 ? 2 : 1;  // 16-row m-tiles per warp (wide)
  static constexpr int kRows = kWarps * 16 * kMT;  // rows of one wide pass
  static constexpr int kKeys = 64;  // keys per stage
  static constexpr int kStages = D == 64 ? 3 : 2;
  static constexpr int kChunks = D / 8;
  static constexpr int kLoadsPerThread = kKeys * kChunks / kThreads;  // per K (or V) per stage
  static constexpr int kStageElems = 2 * kKeys * D;
  static constexpr bool kQInRegs = D <= 64;  // wide passes keep Q fragments in registers
  static constexpr int kMinBlocks = D == 256 ? 1 : 2;
  static constexpr int kPipeBytes = kStages * kStageElems * 2;
  static constexpr int kQBytes = kRows * D * 2;
  static constexpr int kOffBytes = kStages * kKeys * 8;
  static constexpr int kMergeBytes = 2 * kWarps * 16 * 4;
  static constexpr int kSmemBytes = kPipeBytes + kQBytes + kOffBytes + kMergeBytes;
  // The CTA's threads that run an item: [kThreadBase, kThreadBase + kThreads).
  static constexpr int kThreadBase = 0;
  static __device__ __forceinline__ void Sync() { __syncthreads(); }
  static_assert(kWarps * 16 * D * 4 <= kPipeBytes, "narrow merge scratch must fit the pipeline");
  static_assert(kChunks >= 8, "the swizzle needs 8 chunks per row");
};

// Narrow tiles (decodes) in the Hopper kernel: the portable narrow path with all 8 of its warps,
// 16 keys each per stage.
template <int D>
struct HopperNarrowTraits : PrefillTraits<D> {
  using Base = PrefillTraits<D>;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kKeys = kWarps * 16;
  static constexpr int kStages = D == 64 ? 3 : 2;
  static constexpr int kLoadsPerThread = kKeys * Base::kChunks / kThreads;
  static constexpr int kStageElems = 2 * kKeys * D;
  static constexpr int kPipeBytes = kStages * kStageElems * 2;
  static constexpr int kQBytes = 16 * D * 2;
  static constexpr int kOffBytes = kStages * kKeys * 8;
  static constexpr int kMergeBytes = 2 * kWarps * 16 * 4;
  static constexpr int kSmemBytes = kPipeBytes + kQBytes + kOffBytes + kMergeBytes;
  // The two consumer warpgroups run narrow items; the producer warpgroup (threads 0-127) waits.
  static constexpr int kThreadBase = 128;
  static __device__ __forceinline__ void Sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }
  static_assert(kWarps * 16 * D * 4 <= kPipeBytes, "narrow merge scratch must fit the pipeline");
};

// Ring depths and register budgets of the Hopper kernel (experiments override them).
#ifndef ATTND_PREFILL_PRODUCER_REGS
#define ATTND_PREFILL_PRODUCER_REGS 56
#endif
#ifndef ATTND_PREFILL_CONSUMER_REGS
#define ATTND_PREFILL_CONSUMER_REGS 224
#endif
#ifndef ATTND_PREFILL_K_SLOTS
#define ATTND_PREFILL_K_SLOTS 2
#endif
#ifndef ATTND_PREFILL_V_SLOTS
#define ATTND_PREFILL_V_SLOTS 2
#endif

// Batch prefill on Hopper (wgmma), warp-specialized: a producer warpgroup loads K and V tiles
// through cp.async into rings of slots and signals them on mbarriers; two consumer warpgroups
// each own 64 of the tile's 128 rows (the M of wgmma m64nNk16), load their own query rows, and
// run every key: S = Q K^T from shared memory, then O += P V with P from registers. Q and the
// K/V tiles sit in 128-byte-swizzled atoms (kernels/cuda/common/wgmma.cuh). Narrow tiles (decodes)
// take the portable narrow path on the consumers (HopperNarrowTraits).
template <int D>
struct HopperPrefillTraits {
  static constexpr int kProducerThreads = 128;
  static constexpr int kConsumerThreads = 256;
  static constexpr int kThreads = kProducerThreads + kConsumerThreads;
  // setmaxnreg budgets (multiples of 8): the loads need few registers, the GEMMs' accumulators
  // many. setmaxnreg only moves registers within what the CTA got at launch (168 a thread for
  // 384 threads); asking for more blocks the warpgroup for ever (64 + 224 hung on the H200).
  static constexpr int kProducerRegs = ATTND_PREFILL_PRODUCER_REGS;
  static constexpr int kConsumerRegs = ATTND_PREFILL_CONSUMER_REGS;
  static constexpr int kLaunchRegs = 65536 / kThreads / 8 * 8;
  static_assert(kProducerThreads * kProducerRegs + kConsumerThreads * kConsumerRegs <=
                    kThreads * kLaunchRegs,
                "setmaxnreg budgets exceed the CTA's registers");
  static constexpr int kRows = 128;   // one wide tile
  static constexpr int kKeys = 128;   // keys per tile: the N of Q K^T
  static constexpr int kChunks = D / 8;
  static constexpr int kQBytes = kRows * D * 2;
  static constexpr int kTileBytes = kKeys * D * 2;  // K (or V) of one tile
  static constexpr int kKSlots = ATTND_PREFILL_K_SLOTS;  // K ring, then V ring
  static constexpr int kVSlots = ATTND_PREFILL_V_SLOTS;
  static constexpr int kKRingOffset = kQBytes;
  static constexpr int kVRingOffset = kQBytes + kKSlots * kTileBytes;
  static constexpr int kOffOffset = kVRingOffset + kVSlots * kTileBytes;  // row addresses, 2 tiles
  static constexpr int kWideBytes = kOffOffset + 2 * kKeys * 8;
  static constexpr int kRegionBytes = kWideBytes > HopperNarrowTraits<D>::kSmemBytes
                                          ? kWideBytes
                                          : HopperNarrowTraits<D>::kSmemBytes;
  // full K, full V, empty K, empty V: one barrier per slot each; then the work ring's full and
  // empty barriers and its two units (a persistent grid's)
  static constexpr int kBarrierOffset = kRegionBytes;
  static constexpr int kWorkOffset = kBarrierOffset + 16 * (kKSlots + kVSlots);
  static constexpr int kAlignSlack = 1024;  // swizzle atoms start at 1024-byte boundaries
  static constexpr int kSmemBytes = kAlignSlack + kWorkOffset + 2 * 16 + 2 * 4;
  static constexpr int kLoadsPerThread = kKeys * kChunks / kProducerThreads;  // per K or V tile
  static_assert(D == 64 || D == 128, "wgmma N of P V is head_dim");
  static_assert(kRows == 2 * 64, "two consumer warpgroups of 64 rows");
  static_assert(kProducerThreads % kChunks == 0, "a producer thread keeps one chunk column");
};

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_PREFILL_PREFILL_PARAMS_CUH_
