// The batch decode kernel: split-KV work items from a host plan, tensor cores (mma.sync
// m16n8k16: the keys as rows for GQA groups of up to 8, else the group's query heads), a
// per-warp cp.async pipeline, and the merge of a request's items by the CTA that finishes its
// last one (or by the merge kernel).
#ifndef ATTND_KERNELS_CUDA_DECODE_DECODE_KERNEL_CUH_
#define ATTND_KERNELS_CUDA_DECODE_DECODE_KERNEL_CUH_

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/common/constants.h"
#include "kernels/cuda/common/device_utils.cuh"
#include "kernels/cuda/common/epilogue.cuh"
#include "kernels/cuda/common/merge_states.cuh"
#include "kernels/cuda/common/softmax.cuh"
#include "kernels/cuda/common/swizzle.cuh"
#include "kernels/cuda/decode/decode_key_rows.cuh"
#include "kernels/cuda/decode/decode_params.cuh"

namespace attnd::kernels::cuda::detail {

// Writes 8 output values of (request b, head h, chunk ch) and, once per row, the lse.
template <typename T>
__device__ __forceinline__ void StoreOut(const DecodeParams& p, int b, int h, int ch,
                                         const float (&o)[8], float lse2) {
  *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + ch * 8) =
      PackChunk<T>(o);
  if (ch == 0 && p.lse != nullptr) {
    p.lse[static_cast<int64_t>(b) * p.num_qo_heads + h] = lse2 * kLn2;
  }
}

// Merges request b's partial states for rows [0, nrows) of the CTA's head block, a warp a row.
template <typename T, int D>
__device__ __forceinline__ void MergeRequest(const DecodeParams& p, int b, int first, int n,
                                             int qo_head0, int nrows, int warp, int lane) {
  constexpr int kWarps = DecodeTraits<D>::kWarps;
  for (int r = warp; r < nrows; r += kWarps) {
    const int h = qo_head0 + r;
    MergeRowWarp<T, D>(p.partial_out, p.partial_lse, p.num_qo_heads, first, n, h, lane,
                       static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh,
                       p.lse != nullptr ? p.lse + static_cast<int64_t>(b) * p.num_qo_heads + h
                                        : nullptr);
  }
}

// fp8: s = q . k over the warp's stage, two k-steps (fp8 chunks) per ldmatrix: kb[0] / kb[1] are tokens 0-7 / 8-15 of chunk kk, kb[2] / kb[3] of
// chunk kk + 1; each register widens to the fragment pair (b0, b1) of one n8 tile.
template <typename Tr, typename KV, typename LoadQ, int kJ, int kQ>
__device__ __forceinline__ void QkFp8(float (&s)[kJ][4], const uint32_t (&qfrag)[kQ][4],
                                      const LoadQ& load_q, const KV* ks, int lane) {
  constexpr int D = Tr::kHeadDim;
  const int mi = lane >> 3;
#pragma unroll
  for (int kk = 0; kk < D / 16; kk += 2) {
    uint32_t a[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if constexpr (Tr::kQInRegs) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[h][e] = qfrag[kk + h][e];
      } else {
        load_q(a[h], kk + h);
      }
    }
#pragma unroll
    for (int sub = 0; sub < Tr::kSubTiles; ++sub) {
      uint32_t kb[4];
      LdMatrixX4(kb, SmemAddr(ks + SwzFp8<Tr::kRowBytes>(sub * 16 + ((mi & 1) << 3) + (lane & 7),
                                                          kk + (mi >> 1))));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t b0, b1;  // head dims 4c, 4c + 1 | 4c + 2, 4c + 3
        Fp8x4ToHalf2x2(kb[j], b0, b1);
        Mma16816<__half>(s[2 * sub + (j & 1)], a[j >> 1], b0, b1);
      }
    }
  }
}

// fp8: acc += p . v for 16-token block `sub`: the even dims of 16-dim block blk into tile
// acc[2 blk], its odd dims into acc[2 blk + 1] (LoadFp8VPairs).
template <typename Tr, typename KV, int kN>
__device__ __forceinline__ void PvFp8(float (&acc)[kN][4], const uint32_t (&a)[4], const KV* vs,
                                      int sub, int lane) {
  constexpr int D = Tr::kHeadDim;
#pragma unroll
  for (int dd = 0; dd < D / 32; ++dd) {
    uint32_t even[2][2], odd[2][2];
    LoadFp8VPairs<Tr::kRowBytes>(vs, sub, dd, lane, even, odd);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int blk = 2 * dd + j;
      Mma16816<__half>(acc[2 * blk], a, even[j][0], even[j][1]);
      Mma16816<__half>(acc[2 * blk + 1], a, odd[j][0], odd[j][1]);
    }
  }
}

// One warp stage in the query-rows layout: s = q . k for 16 query rows x kWT tokens, masking
// past t1, the online softmax and acc += p . v, 16 tokens at a time. tile_scales: the stage's
// per-token K scales, then its V scales (per-token pools only).
template <typename Tr, typename T, typename KV, typename LoadQ, int kQ>
__device__ __forceinline__ void QueryRowsTile(const DecodeParams& p, float scale_pre,
                                              const uint32_t (&qfrag)[kQ][4],
                                              const LoadQ& load_q, const KV* ks, const KV* vs,
                                              const float* tile_scales, int tok_base, int t1,
                                              bool upper_rows, float (&m)[2], float (&l)[2],
                                              float (&acc)[Tr::kHeadDim / 8][4], int lane) {
  constexpr bool kFp8 = Tr::kFp8;
  using M = std::conditional_t<kFp8, __half, T>;  // the mma operands' type
  constexpr int D = Tr::kHeadDim, kKSteps = D / 16;
  constexpr int kSub = Tr::kSubTiles, kWT = Tr::kWarpTokens;
  // s = q . k for 16 rows x kWT tokens.
  float s[2 * kSub][4];
#pragma unroll
  for (int j = 0; j < 2 * kSub; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
  if constexpr (kFp8) {
    QkFp8<Tr>(s, qfrag, load_q, ks, lane);
  } else {
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t a[4];
      if constexpr (Tr::kQInRegs) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a[e] = qfrag[kk][e];
      } else {
        load_q(a, kk);
      }
#pragma unroll
      for (int sub = 0; sub < kSub; ++sub) {
        uint32_t kb[4];
        const int mi = lane >> 3;
        LdMatrixX4(kb, SmemAddr(ks + Swz<D>(sub * 16 + ((mi >> 1) << 3) + (lane & 7),
                                            kk * 2 + (mi & 1))));
        Mma16816<T>(s[2 * sub], a, kb[0], kb[1]);
        Mma16816<T>(s[2 * sub + 1], a, kb[2], kb[3]);
      }
    }
  }

  // Logits in log2 units, masked past the chunk.
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < 2 * kSub; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (e >= 2 && !upper_rows) break;
      const int tok = tok_base + j * 8 + ((lane & 3) << 1) + (e & 1);
      float x = s[j][e];
      if constexpr (Tr::kTokenScales) x *= tile_scales[j * 8 + ((lane & 3) << 1) + (e & 1)];
      x = p.soft_cap ? p.scale_post * tanhf(scale_pre * x) : scale_pre * x;
      x = tok < t1 ? x : -INFINITY;
      s[j][e] = x;
      mx[e >> 1] = fmaxf(mx[e >> 1], x);
    }
  }
  OnlineSoftmaxStep(s, mx, m, l, acc, ScaledLogits{}, upper_rows);
  if constexpr (Tr::kTokenScales) {  // after the row sums: they take the plain probabilities
#pragma unroll
    for (int j = 0; j < 2 * kSub; ++j) {
      const float2 v = *reinterpret_cast<const float2*>(tile_scales + kWT + j * 8 +
                                                        ((lane & 3) << 1));
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] *= 256.f * ((e & 1) ? v.y : v.x);
    }
  }

  // acc += p . v, 16 tokens at a time.
#pragma unroll
  for (int sub = 0; sub < kSub; ++sub) {
    uint32_t a[4];
    a[0] = PackPair<M>(s[2 * sub][0], s[2 * sub][1]);
    a[1] = PackPair<M>(s[2 * sub][2], s[2 * sub][3]);
    a[2] = PackPair<M>(s[2 * sub + 1][0], s[2 * sub + 1][1]);
    a[3] = PackPair<M>(s[2 * sub + 1][2], s[2 * sub + 1][3]);
    if constexpr (kFp8) {
      PvFp8<Tr>(acc, a, vs, sub, lane);
    } else {
#pragma unroll
      for (int dd = 0; dd < kKSteps; ++dd) {
        uint32_t vb[4];
        const int mi = lane >> 3;
        LdMatrixX4Trans(vb, SmemAddr(vs + Swz<D>(sub * 16 + ((mi & 1) << 3) + (lane & 7),
                                                 dd * 2 + (mi >> 1))));
        Mma16816<T>(acc[2 * dd], a, vb[0], vb[1]);
        Mma16816<T>(acc[2 * dd + 1], a, vb[2], vb[3]);
      }
    }
  }
}

// The warp's state into the merge scratch in the query-rows layout: its rows' m and l (summed
// over the quad) and its accumulators, times v_scale (fp8), as [warp][query row][D] rows.
template <typename Tr>
__device__ __forceinline__ void StoreQueryRowsState(float* m_smem, float* l_smem, float* acc_smem,
                                                    int warp, int lane, int nrows,
                                                    const float (&m)[2], float (&l)[2],
                                                    const float (&acc)[Tr::kHeadDim / 8][4],
                                                    float v_scale) {
  constexpr int D = Tr::kHeadDim;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
  StoreWarpRowStats<Tr::kRows>(m_smem, l_smem, warp, lane, m, l);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = (lane >> 2) + 8 * i;
    if (r >= nrows) continue;
    if constexpr (Tr::kFp8) {
      StoreWarpAccRowInterleaved<Tr::kRows, D>(acc_smem, warp, r, lane, acc, i, v_scale);
    } else {
      StoreWarpAccRow<Tr::kRows, D>(acc_smem, warp, r, lane, acc, i);
    }
  }
}

// Chunk `ch` (8 elements) of the kernel's query or output row r, as a chunk of the query's
// own row: with head pairs (DecodeParams::pair_group) a column's 64 dims are the first or the
// second half of the 128, as its head is the pair's first or second, and the other half is
// not in its row (its query zero, its output dropped).
struct PairedChunk {
  bool in_row;
  int chunk;
};
template <bool kPairs>
__device__ __forceinline__ PairedChunk PairChunk(int pair_group, int r, int ch) {
  if constexpr (!kPairs) return {true, ch};
  const int half = r >= pair_group ? 1 : 0;
  return {(ch >> 3) == half, ch - 8 * half};
}

// A CTA's work item: request b's item `item`, one of the n_items from first_item.
struct ItemRef {
  int b, item, first_item, n_items;
};

// Merges the warps' states in a fixed order and writes the output (an unsplit request) or the
// item's partial; the CTA that completes a request's last partial (for its kv head block) then
// merges all of them, in item order, and resets the counter for the next launch.
template <typename Tr, typename T, bool kPairs>
__device__ __forceinline__ void WriteItemOutput(const DecodeParams& p, const float* m_smem,
                                                const float* l_smem, const float* acc_smem,
                                                ItemRef it, int qo_head0, int nrows, int warp,
                                                int lane, int& last_flag) {
  constexpr int D = Tr::kHeadDim;
  const bool direct = it.n_items == 1;
  constexpr int out_dim = kPairs ? D / 2 : D;  // a query's output and partial rows
  for (int idx = threadIdx.x; idx < nrows * Tr::kQChunks; idx += Tr::kThreads) {
    const int r = idx / Tr::kQChunks, ch = idx % Tr::kQChunks;
    const PairedChunk pc = PairChunk<kPairs>(p.pair_group, r, ch);
    if (!pc.in_row) continue;  // head pairs: the other head's half
    float mw[Tr::kWarps], o[8];
    const float lse2 =
        CombineWarpStates<Tr::kWarps, Tr::kRows, D>(m_smem, l_smem, acc_smem, r, ch, mw, o);
    const int h = qo_head0 + r;
    if (direct) {
      StoreOut<T>(p, it.b, h, pc.chunk, o, lse2);
    } else {
      const int64_t row = static_cast<int64_t>(it.item) * p.num_qo_heads + h;
      StorePartialChunk(p.partial_out + row * out_dim + pc.chunk * 8, o);
      if (pc.chunk == 0) __stcg(p.partial_lse + row, lse2);
    }
  }
  if (direct || !p.fused_merge) return;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // cumulative: releases the whole CTA's partial writes (bar.sync above)
    int* counter = p.counters + it.b * gridDim.x + blockIdx.x;
    const int done = atomicAdd(counter, 1) + 1;
    last_flag = done == it.n_items;
    if (done == it.n_items) *counter = 0;
  }
  __syncthreads();
  if (last_flag) {
    __threadfence();
    MergeRequest<T, out_dim>(p, it.b, it.first_item, it.n_items, qo_head0, nrows, warp, lane);
  }
}

// The rows of a warp slice one lane resolves: their element offsets in the layer and whether
// they are visible.
template <int kR>
struct SliceRows {
  int64_t off[kR];
  int64_t scale_off[kR];  // per-token scales: the row's K scale, floats from the head's base
  bool valid[kR];
};

// Element offset of chunk `chunk` of row `row` in a warp's K or V stage.
template <typename Tr>
__device__ __forceinline__ int SwzKv(int row, int chunk) {
  if constexpr (Tr::kFp8) {
    return SwzFp8<Tr::kRowBytes>(row, chunk);
  } else {
    return Swz<Tr::kHeadDim>(row, chunk);
  }
}

// A warp's cp.async pipeline over its slice of every tile of an item: lane l resolves rows l,
// l + 32, ... (mod kWarpTokens) of a slice (their K offsets and whether they are visible), and
// Issue copies a resolved slice's K and V rows, and per-token scales, into one of its stages.
template <typename Tr, typename KV>
struct WarpSlicePipe {
  using Refs = SliceRows<Tr::kRowsPerLane>;
  const DecodeParams& p;
  const KV* kv;              // the kv head's elements in the layer
  const float* head_scales;  // per-token pools: the kv head's scales in the layer
  const int32_t* pages;      // the request's page table
  int t0, t1;                // the item's tokens
  int warp, lane;
  KV* stages;                // the warp's kStages stages of K then V rows
  float* stage_scales;       // per-token pools: [stage][K | V][scale head][token of the slice]

  __device__ __forceinline__ void Resolve(int tile, Refs& refs) const {
    constexpr int kWT = Tr::kWarpTokens;
#pragma unroll
    for (int h = 0; h < Tr::kRowsPerLane; ++h) {
      const int tok = t0 + tile * Tr::kTileTokens + warp * kWT + ((lane + 32 * h) & (kWT - 1));
      refs.valid[h] = tok < t1;
      refs.off[h] = 0;
      refs.scale_off[h] = 0;
      if (refs.valid[h]) {
        uint32_t pg, slot;
        p.page_div.Divmod(static_cast<uint32_t>(tok), pg, slot);
        const int64_t page = __ldg(pages + pg);
        refs.off[h] = page * p.page_stride + slot * p.slot_stride;
        if constexpr (Tr::kTokenScales) refs.scale_off[h] = page * p.page_scales + slot;
      }
    }
  }

  __device__ __forceinline__ void Issue(int stage, const Refs& refs) const {
    constexpr int D = Tr::kHeadDim, kWT = Tr::kWarpTokens;
    KV* ks = stages + stage * Tr::kStageElems;
#pragma unroll
    for (int i = 0; i < Tr::kLoadsPerLane; ++i) {
      const int idx = lane + 32 * i;
      const int r = idx / Tr::kChunks, ch = idx % Tr::kChunks;
      // Row r is lane r % 32's row h = r / 32, the same for every lane at this i (kChunks
      // divides 32), so known when unrolled.
      constexpr int kRowsPerI = 32 / Tr::kChunks;
      const int h = (i * kRowsPerI) >> 5;
      const int64_t off_r = __shfl_sync(0xffffffffu, refs.off[h], r & 31);
      const bool valid_r = __shfl_sync(0xffffffffu, static_cast<int>(refs.valid[h]), r & 31) != 0;
      const KV* src = kv + off_r + ch * Tr::kChunkElems;
      const uint32_t dst = SmemAddr(ks + SwzKv<Tr>(r, ch));
      CpAsync16(dst, src, valid_r);
      CpAsync16(dst + kWT * D * sizeof(KV), src + p.v_offset, valid_r);
    }
    if constexpr (Tr::kTokenScales) {
      constexpr int kSH = Tr::kScaleHeads;
      float* sc = stage_scales + stage * 2 * kSH * kWT;
#pragma unroll
      for (int h = 0; h < Tr::kRowsPerLane; ++h) {
        const int r = lane + 32 * h;  // kWT >= 32 for fp8: each row is one lane's
#pragma unroll
        for (int e = 0; e < kSH; ++e) {  // a pair's second head: the next page_size scales
          const float* src = head_scales + refs.scale_off[h] + e * p.page_size;
          CpAsync4(SmemAddr(sc + e * kWT + r), src, refs.valid[h]);
          CpAsync4(SmemAddr(sc + (kSH + e) * kWT + r), src + p.scale_v_offset, refs.valid[h]);
        }
      }
    }
  }
};

template <typename KV, int D, bool kKeyRows = false, bool kPairs = false>
using DecodeTraitsFor = DecodeTraits<D, sizeof(KV), kTokenScaledKv<KV>, kKeyRows, kPairs>;

// T: the model dtype (q, out); KV: the pool's (T, or an fp8 type read through fp16 mma);
// kKeyRows: the transposed layout of decode_key_rows.cuh (groups of up to 8); kPairs: head pairs
// (DecodeParams::pair_group; head_dim 128 key rows only), a kernel of its own so that the
// others carry none of its code.
template <typename T, typename KV, int D, bool kKeyRows, bool kPairs = false>
__global__ void __launch_bounds__(DecodeTraitsFor<KV, D, kKeyRows, kPairs>::kThreads,
                                  DecodeTraitsFor<KV, D, kKeyRows, kPairs>::kMinBlocks)
    BatchDecodeKernel(const __grid_constant__ DecodeParams p) {
  static_assert(!kPairs || (D == 128 && kKeyRows), "head pairs read as head_dim 128, key rows");
  using Tr = DecodeTraitsFor<KV, D, kKeyRows, kPairs>;
  constexpr bool kFp8 = Tr::kFp8;
  constexpr int S = Tr::kStages;
  constexpr int kKSteps = D / 16;  // k-steps of q.k and 16-wide column pairs of p.v
  constexpr int kNTiles = D / 8;   // n8 tiles of the output
  constexpr int kWT = Tr::kWarpTokens;
  extern __shared__ __align__(128) unsigned char smem[];
  KV* pipe = reinterpret_cast<KV*>(smem);
  T* q_smem = reinterpret_cast<T*>(smem + Tr::kPipeBytes);
  float* m_smem = reinterpret_cast<float*>(smem + Tr::kPipeBytes + Tr::kQBytes);
  float* l_smem = m_smem + Tr::kWarps * Tr::kRows;
  float* acc_smem = reinterpret_cast<float*>(smem);  // aliases pipe, after the pipeline drains
  // Per-token scales: [warp][stage][K | V][scale head][token of the slice].
  float* my_scales = reinterpret_cast<float*>(smem + Tr::kPipeBytes + Tr::kQBytes +
                                              Tr::kMergeBytes) +
                     (threadIdx.x >> 5) * S * 2 * Tr::kScaleHeads * kWT;
  __shared__ int last_flag;

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  // blockIdx.x: kv head block (fastest, so that the CTAs of all heads of an item run together
  // and read each page's K/V block at the same time); blockIdx.y: item slot.
  const int kvh = blockIdx.x / p.m_blocks;
  const int row0 = (blockIdx.x - kvh * p.m_blocks) * Tr::kRows;
  const int nrows = min(Tr::kRows, p.group - row0);
  // Query rows: a block of up to 8 heads (the last of a group such as 24) leaves every thread's
  // second fragment row (g + 8) empty: its logits and exponentials are skipped (CTA-uniform).
  const bool upper_rows = !kKeyRows && nrows > 8;
  const int qo_head0 = kvh * p.group + row0;
  const KV* kv = static_cast<const KV*>(p.kv_layer) + kvh * p.head_stride +
                 (p.layer_ptr != nullptr ? int64_t{__ldg(p.layer_ptr)} * p.layer_elems : 0);
  KV* my_pipe = pipe + warp * S * Tr::kStageElems;
  // fp8: a per-layer K scale joins the logit scale, the V scale multiplies the accumulators;
  // per-token scales are applied per key (the accumulators then carry a factor 256).
  float scale_pre = p.scale_pre, v_scale = 1.f;
  const float* head_scales = nullptr;  // this kv head's per-token scales in the layer
  if constexpr (Tr::kTokenScales) {
    const int layer = p.layer_ptr != nullptr ? __ldg(p.layer_ptr) : p.layer;
    head_scales = p.token_scales + layer * p.layer_scales + kvh * Tr::kScaleHeads * p.page_size;
    v_scale = 1.f / 256.f;
  } else if constexpr (kFp8) {
    const int layer = p.layer_ptr != nullptr ? __ldg(p.layer_ptr) : p.layer;
    scale_pre *= __ldg(p.scales + 2 * layer);
    v_scale = __ldg(p.scales + 2 * layer + 1);
  }

  const int32_t* item_indptr = p.plan + p.item_indptr_offset;
  const int4* items = reinterpret_cast<const int4*>(p.plan + p.items_offset);
  // Column y runs items y, y + gridDim.y, ...; the plan holds at least gridDim.y item slots, so
  // item y is read together with the item count.
  const int num_items = __ldg(p.plan);
  int4 next = __ldg(items + blockIdx.y);

  for (int item = blockIdx.y; item < num_items; item += gridDim.y) {
    const int b = next.x;
    const int t0 = next.y;
    const int t1 = next.z;
    const int32_t* pages = p.kv_indices + next.w;
    if (item + gridDim.y < num_items) next = __ldg(items + item + gridDim.y);  // for later
    const int first_item = __ldg(item_indptr + b);
    const int n_items = __ldg(item_indptr + b + 1) - first_item;
    const int num_tiles = t1 > t0 ? (t1 - t0 + Tr::kTileTokens - 1) / Tr::kTileTokens : 0;

    using Refs = SliceRows<Tr::kRowsPerLane>;
    const WarpSlicePipe<Tr, KV> slices{p, kv, head_scales, pages, t0, t1, warp, lane, my_pipe,
                                       my_scales};

    // Page-table entries of the first S tiles (they do not depend on the previous kernel on
    // the stream), then, once that kernel's results are visible (a no-op unless launched as a
    // programmatic dependent), the query rows (rows past the group zero-filled) and the
    // pipeline prologue, all in flight together.
    Refs refs[S];
#pragma unroll
    for (int s = 0; s < S; ++s) slices.Resolve(s, refs[s]);
    GridDependencyWait();
    {
      const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + qo_head0 * p.q_sh;
      for (int idx = threadIdx.x; idx < Tr::kRows * Tr::kQChunks; idx += Tr::kThreads) {
        const int r = idx / Tr::kQChunks, ch = idx % Tr::kQChunks;
        const PairedChunk pc = PairChunk<kPairs>(p.pair_group, r, ch);
        const bool ok = r < nrows && pc.in_row;
        CpAsync16(SmemAddr(q_smem + Swz<D>(r, ch)), ok ? qb + r * p.q_sh + pc.chunk * 8 : qb,
                  ok);
      }
      CpAsyncCommit();
    }
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
      if (s < num_tiles) slices.Issue(s, refs[s]);
      CpAsyncCommit();
    }
    Refs next_refs = refs[S - 1];
    CpAsyncWait<S - 1>();  // the query group
    __syncthreads();

    uint32_t qfrag[Tr::kQInRegs && !kKeyRows ? kKSteps : 1][4];
    QueryOperand<Tr, T> qcol;  // key rows: q^T's fragments
    auto load_q = [&](uint32_t (&a)[4], int kk) {
      if constexpr (kFp8) {
        // k-step kk pairs with fp8 chunk kk: the thread's k columns 2c, 2c + 1 | 2c + 8, 2c + 9
        // are head dims 16 kk + 4c + 0, 1 | 2, 3 (the K fragments' order), widened to fp16.
        const int g = lane >> 2, c = lane & 3;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const uint2 x = *reinterpret_cast<const uint2*>(
              q_smem + Swz<D>(g + 8 * i, 2 * kk + (c >> 1)) + 4 * (c & 1));
          a[i] = PairToHalf2<T>(x.x);
          a[2 + i] = PairToHalf2<T>(x.y);
        }
      } else {
        const int mi = lane >> 3;
        const int r = ((mi & 1) << 3) + (lane & 7);
        LdMatrixX4(a, SmemAddr(q_smem + Swz<D>(r, kk * 2 + (mi >> 1))));
      }
    };
    if constexpr (kKeyRows) {
      qcol.Load(q_smem, lane);
    } else if constexpr (Tr::kQInRegs) {
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) load_q(qfrag[kk], kk);
    }

    constexpr int kAccTiles = kKeyRows ? D / 16 : kNTiles;
    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.f, 0.f};
    float acc[kAccTiles][4];
#pragma unroll
    for (int n = 0; n < kAccTiles; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

    // Programmatic dependents may launch once every CTA is this close to its end.
    const int trigger_tile = item + static_cast<int>(gridDim.y) >= num_items && p.trigger_tiles > 0
                                 ? num_tiles - p.trigger_tiles
                                 : INT_MAX;
    if (trigger_tile <= 0) LaunchDependents();
    for (int k = 0; k < num_tiles; ++k) {
      if (k == trigger_tile) LaunchDependents();
      __syncwarp();
      if (k + S - 1 < num_tiles) slices.Issue((k + S - 1) % S, next_refs);
      CpAsyncCommit();
      slices.Resolve(k + S, next_refs);  // its page-table load overlaps this tile's math
      CpAsyncWait<S - 1>();
      __syncwarp();

      const int tok_base = t0 + k * Tr::kTileTokens + warp * kWT;
      if (tok_base >= t1) continue;  // this warp's slice is past the chunk (warp-uniform)
      const KV* ks = my_pipe + (k % S) * Tr::kStageElems;
      const KV* vs = ks + kWT * D;
      // Per-token pools: K, then V scales (each of kScaleHeads heads).
      const float* tile_scales = my_scales + (k % S) * 2 * Tr::kScaleHeads * kWT;
      if constexpr (kKeyRows) {
        KeyRowsTile<Tr>(p, scale_pre, qcol, ks, vs, tile_scales, tok_base, t1, m, l, acc, lane);
      } else {
        QueryRowsTile<Tr, T>(p, scale_pre, qfrag, load_q, ks, vs, tile_scales, tok_base, t1,
                             upper_rows, m, l, acc, lane);
      }
    }

    // The warps' states to shared memory, then the output or the partial.
    CpAsyncWait<0>();
    __syncthreads();
    if constexpr (kKeyRows) {
      StoreKeyRowsState<Tr>(m_smem, l_smem, acc_smem, warp, lane, nrows, m, l, acc, v_scale);
    } else {
      StoreQueryRowsState<Tr>(m_smem, l_smem, acc_smem, warp, lane, nrows, m, l, acc, v_scale);
    }
    __syncthreads();
    WriteItemOutput<Tr, T, kPairs>(p, m_smem, l_smem, acc_smem,
                                   ItemRef{b, item, first_item, n_items}, qo_head0, nrows, warp,
                                   lane, last_flag);
    __syncthreads();  // the next item reuses q_smem and the pipeline buffers
  }
  LaunchDependents();  // a column without items, or none that reached its trigger tile
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_DECODE_DECODE_KERNEL_CUH_
