// Tile shapes of the CUDA kernels, one place to tune them.
#ifndef ATTND_KERNELS_CUDA_KERNEL_TRAITS_CUH_
#define ATTND_KERNELS_CUDA_KERNEL_TRAITS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/paged_kv.h"

namespace attnd::kernels::cuda::detail {

// Batch decode. A CTA owns one (work item, kv head, block of up to 16 query heads of the GQA
// group). Its 4 warps each run an independent cp.async pipeline over their own slice of
// kWarpTokens tokens of every tile and keep their own online-softmax state; the query rows (the
// group's heads, padded to 16) are the M dimension of mma.m16n8k16. Warps merge in shared
// memory at the end, in a fixed order. head_dim 64 takes 32-token slices so that a stage moves
// as many bytes as at 128.
template <int D>
struct DecodeTraits {
  static constexpr int kHeadDim = D;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = 16;        // query rows per CTA (mma M)
  static constexpr int kWarpTokens = D == 64 ? 32 : 16;  // tokens per warp per stage
  static constexpr int kSubTiles = kWarpTokens / 16;     // 16-token mma blocks per slice
  static constexpr int kTileTokens = kWarps * kWarpTokens;
  static constexpr int kStages = 3;
  static constexpr int kChunks = D / 8;                      // 16-byte chunks per row
  static constexpr int kLoadsPerLane = kWarpTokens * kChunks / 32;  // per K (or V) per stage
  static constexpr int kStageElems = 2 * kWarpTokens * D;    // K + V of one warp's slice
  static constexpr bool kQInRegs = D <= 128;
  static constexpr int kMinBlocks = D == 256 ? 1 : 2;
  static constexpr int kPipeBytes = kWarps * kStages * kStageElems * 2;
  static constexpr int kQBytes = kRows * D * 2;
  static constexpr int kMergeBytes = 2 * kWarps * kRows * 4;  // per-warp m and l
  static constexpr int kSmemBytes = kPipeBytes + kQBytes + kMergeBytes;
  // The fp32 per-warp accumulators reuse the pipeline buffers at the end.
  static_assert(kWarps * kRows * D * 4 <= kPipeBytes, "merge scratch must fit the pipeline");
  static_assert(kChunks >= 8, "the swizzle needs 8 chunks per row");
};


// Batch prefill. A CTA owns one work item (a tile of query rows of one kv head, a range of
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
  static constexpr int kThreadBase = 0;  // the CTA's threads that run an item: [base, base + kThreads)
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

// Batch prefill on Hopper (wgmma), warp-specialized: a producer warpgroup loads K and V tiles
// through cp.async into two-slot rings and signals them on mbarriers; two consumer warpgroups
// each own 64 of the tile's 128 rows (the M of wgmma m64nNk16), load their own query rows, and
// run every key: S = Q K^T from shared memory, then O += P V with P from registers. Q and the
// K/V tiles sit in 128-byte-swizzled atoms (kernels/cuda/wgmma.cuh). Narrow tiles (decodes)
// take the portable narrow path on the consumers (HopperNarrowTraits).
template <int D>
struct HopperPrefillTraits {
  static constexpr int kProducerThreads = 128;
  static constexpr int kConsumerThreads = 256;
  static constexpr int kThreads = kProducerThreads + kConsumerThreads;
  static constexpr int kRows = 128;   // one wide tile
  static constexpr int kKeys = 128;   // keys per tile: the N of Q K^T
  static constexpr int kChunks = D / 8;
  static constexpr int kQBytes = kRows * D * 2;
  static constexpr int kTileBytes = kKeys * D * 2;  // K (or V) of one tile
  static constexpr int kKRingOffset = kQBytes;      // two K slots, then two V slots
  static constexpr int kVRingOffset = kQBytes + 2 * kTileBytes;
  static constexpr int kOffOffset = kQBytes + 4 * kTileBytes;  // page offsets, two tiles
  static constexpr int kWideBytes = kOffOffset + 2 * kKeys * 8;
  static constexpr int kRegionBytes = kWideBytes > HopperNarrowTraits<D>::kSmemBytes
                                          ? kWideBytes
                                          : HopperNarrowTraits<D>::kSmemBytes;
  static constexpr int kBarrierOffset = kRegionBytes;  // full K, full V, empty K, empty V: x2
  static constexpr int kAlignSlack = 1024;  // swizzle atoms start at 1024-byte boundaries
  static constexpr int kSmemBytes = kAlignSlack + kBarrierOffset + 8 * 8;
  static constexpr int kLoadsPerThread = kKeys * kChunks / kProducerThreads;  // per K or V tile
  static_assert(D == 64 || D == 128, "wgmma N of P V is head_dim");
  static_assert(kRows == 2 * 64, "two consumer warpgroups of 64 rows");
  static_assert(kProducerThreads % kChunks == 0, "a producer thread keeps one chunk column");
};

// Runs F<T, D>::Run(args...) for a model's dtype and head_dim: the one list of the (dtype,
// head_dim) pairs every kernel family is instantiated for.
template <template <typename, int> class F, typename... Args>
cudaError_t DispatchDTypeHeadDim(DType dtype, int64_t head_dim, Args&&... args) {
  if (dtype == DType::kBFloat16) {
    switch (head_dim) {
      case 64: return F<__nv_bfloat16, 64>::Run(args...);
      case 128: return F<__nv_bfloat16, 128>::Run(args...);
      case 256: return F<__nv_bfloat16, 256>::Run(args...);
    }
  } else if (dtype == DType::kFloat16) {
    switch (head_dim) {
      case 64: return F<__half, 64>::Run(args...);
      case 128: return F<__half, 128>::Run(args...);
      case 256: return F<__half, 256>::Run(args...);
    }
  }
  return cudaErrorInvalidValue;
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_KERNEL_TRAITS_CUH_
