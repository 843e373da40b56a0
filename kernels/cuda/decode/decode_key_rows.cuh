// The decode kernel's key-rows layout (DecodeTraits::kKeyRows, GQA groups of up to 8): one
// warp stage's math with the keys as the mma's M dimension and the group's query heads as N.
//
// Fragments (g = lane / 4, c = lane % 4): a score tile s[j] holds keys 16 j + g (e = 0, 1) and
// 16 j + g + 8 (e = 2, 3) of query columns 2c and 2c + 1 (e & 1); an output tile acc[n] holds
// head dims (the tile's rows) of the same two query columns. A column's keys are spread over the
// 8 lanes that share c, so its max and sum reduce over lane bits 2..4.
//
// fp8: K bytes are read as 16-bit pairs, so a fragment register holds 4 consecutive head dims,
// mapped to k columns 2c, 2c + 1 | 2c + 8, 2c + 9 (the query columns are permuted to match). V
// bytes are read transposed: a register holds two keys of two dims, split by a byte permute into
// an even-dim and an odd-dim pair, so tile n's rows are dims 16 n + 2g (rows g) and 16 n + 2g + 1
// (rows g + 8).
#ifndef ATTND_KERNELS_CUDA_DECODE_DECODE_KEY_ROWS_CUH_
#define ATTND_KERNELS_CUDA_DECODE_DECODE_KEY_ROWS_CUH_

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/common/device_utils.cuh"
#include "kernels/cuda/common/softmax.cuh"
#include "kernels/cuda/common/swizzle.cuh"
#include "kernels/cuda/decode/decode_params.cuh"

namespace attnd::kernels::cuda::detail {

// The query as q^T's B fragments, one pair per 16-dim k-step, from the CTA's 8 swizzled query
// rows (fp8: widened to fp16, dims permuted as the K fragments, see the file comment).
//
// Tried and dropped: e4m3 operands for q.k (m16n8k32, K's bytes as stored, the query split into
// two or three e4m3 words that sum to it exactly): 2-9% slower than widening K (H200).
template <typename Tr, typename T>
struct QueryOperand {
  static constexpr int D = Tr::kHeadDim;
  uint32_t b[D / 16][2];

  __device__ __forceinline__ void Load(const T* q_smem, int lane) {
    const int g = lane >> 2, c = lane & 3;
    if constexpr (Tr::kFp8) {
      // k-step kk: columns 2c, 2c + 1 | 2c + 8, 2c + 9 are dims 16 kk + 4c + 0, 1 | 2, 3.
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint2 v = *reinterpret_cast<const uint2*>(q_smem + Swz<D>(g, 2 * kk + (c >> 1)) +
                                                        4 * (c & 1));
        b[kk][0] = PairToHalf2<T>(v.x);
        b[kk][1] = PairToHalf2<T>(v.y);
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < D / 16; kk += 2) {
        uint32_t r[4];
        LdMatrixX4(r, SmemAddr(q_smem + Swz<D>(lane & 7, 2 * kk + (lane >> 3))));
        b[kk][0] = r[0];
        b[kk][1] = r[1];
        b[kk + 1][0] = r[2];
        b[kk + 1][1] = r[3];
      }
    }
  }
};

// s^T = K q^T over the warp's stage. Even and odd k-steps accumulate apart (sp[0], sp[1]) so
// that a stage of one 16-key block has two mma chains, not one of D / 16.
template <typename Tr, typename KV, typename Q>
__device__ __forceinline__ void QkKeyRows(float (&s)[Tr::kSubTiles][4], const Q& q, const KV* ks,
                                          int lane) {
  constexpr int D = Tr::kHeadDim, kSub = Tr::kSubTiles;
  const int mi = lane >> 3;
  float sp[2][kSub][4];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int j = 0; j < kSub; ++j) sp[h][j][0] = sp[h][j][1] = sp[h][j][2] = sp[h][j][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; kk += 2) {
#pragma unroll
    for (int sub = 0; sub < kSub; ++sub) {
      const int row = sub * 16 + ((mi & 1) << 3) + (lane & 7);
      if constexpr (Tr::kFp8) {
        uint32_t kb[4];
        LdMatrixX4(kb, SmemAddr(ks + SwzFp8<Tr::kRowBytes>(row, kk + (mi >> 1))));
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t a[4];
          Fp8x4ToHalf2x2(kb[2 * h], a[0], a[2]);
          Fp8x4ToHalf2x2(kb[2 * h + 1], a[1], a[3]);
          Mma16816<__half>(sp[h][sub], a, q.b[kk + h][0], q.b[kk + h][1]);
        }
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t a[4];
          LdMatrixX4(a, SmemAddr(ks + Swz<D>(row, 2 * (kk + h) + (mi >> 1))));
          Mma16816<KV>(sp[h][sub], a, q.b[kk + h][0], q.b[kk + h][1]);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kSub; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = sp[0][j][e] + sp[1][j][e];
}

// acc^T += V^T p^T for 16-key block `sub`; pb is p^T's B fragment pair of the block.
template <typename Tr, typename KV>
__device__ __forceinline__ void PvKeyRows(float (&acc)[Tr::kHeadDim / 16][4], uint32_t pb0,
                                          uint32_t pb1, const KV* vs, int sub, int lane) {
  constexpr int D = Tr::kHeadDim;
  const int mi = lane >> 3;
  if constexpr (Tr::kFp8) {
#pragma unroll
    for (int dd = 0; dd < D / 32; ++dd) {
      uint32_t even[2][2], odd[2][2];
      LoadFp8VPairs<Tr::kRowBytes>(vs, sub, dd, lane, even, odd);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        // rows g: the even dims, rows g + 8: the odd dims
        const uint32_t a[4] = {even[j][0], odd[j][0], even[j][1], odd[j][1]};
        Mma16816<__half>(acc[2 * dd + j], a, pb0, pb1);
      }
    }
  } else {
#pragma unroll
    for (int dd = 0; dd < D / 16; ++dd) {
      uint32_t a[4];
      LdMatrixX4Trans(a, SmemAddr(vs + Swz<D>(sub * 16 + ((mi >> 1) << 3) + (lane & 7),
                                              2 * dd + (mi & 1))));
      Mma16816<KV>(acc[dd], a, pb0, pb1);
    }
  }
}

// One warp stage: scores, masking past t1, the online softmax and p.v. tile_scales: the stage's
// per-token K scales, then its V scales (per-token pools only), of each scale head: with head
// pairs, a query column takes its own head's (columns from pair_group on are the second's).
template <typename Tr, typename KV, typename Q>
__device__ __forceinline__ void KeyRowsTile(const DecodeParams& p, float scale_pre, const Q& q,
                                            const KV* ks, const KV* vs, const float* tile_scales,
                                            int tok_base, int t1, float (&m)[2], float (&l)[2],
                                            float (&acc)[Tr::kHeadDim / 16][4], int lane) {
  using M = std::conditional_t<Tr::kFp8, __half, KV>;  // the mma operands' type
  constexpr int kSub = Tr::kSubTiles, kWT = Tr::kWarpTokens, kSH = Tr::kScaleHeads;
  const int g = lane >> 2;
  // The scale rows of the thread's columns 2c and 2c + 1 (e & 1).
  int scale_row[2] = {0, 0};
  if constexpr (kSH == 2) {
#pragma unroll
    for (int i = 0; i < 2; ++i) scale_row[i] = 2 * (lane & 3) + i >= p.pair_group ? kWT : 0;
  }
  float s[kSub][4];
  QkKeyRows<Tr>(s, q, ks, lane);
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < kSub; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = j * 16 + g + ((e >> 1) << 3);
      float x = s[j][e];
      if constexpr (Tr::kTokenScales) x *= tile_scales[scale_row[e & 1] + key];
      x = p.soft_cap ? p.scale_post * tanhf(scale_pre * x) : scale_pre * x;
      x = tok_base + key < t1 ? x : -INFINITY;
      s[j][e] = x;
      mx[e & 1] = fmaxf(mx[e & 1], x);
    }
  }
  OnlineSoftmaxStepKeyRows(s, mx, m, l, acc);
#pragma unroll
  for (int sub = 0; sub < kSub; ++sub) {
    if constexpr (Tr::kTokenScales && kSH == 1) {  // after the sums: plain probabilities there
      const float v0 = 256.f * tile_scales[kWT + sub * 16 + g];
      const float v1 = 256.f * tile_scales[kWT + sub * 16 + g + 8];
      s[sub][0] *= v0, s[sub][1] *= v0, s[sub][2] *= v1, s[sub][3] *= v1;
    } else if constexpr (Tr::kTokenScales) {
      const float* v = tile_scales + kSH * kWT + sub * 16 + g;
#pragma unroll
      for (int e = 0; e < 4; ++e) s[sub][e] *= 256.f * v[scale_row[e & 1] + ((e >> 1) << 3)];
    }
    const uint32_t pb0 = MovMatrixTrans(PackPair<M>(s[sub][0], s[sub][1]));
    const uint32_t pb1 = MovMatrixTrans(PackPair<M>(s[sub][2], s[sub][3]));
    PvKeyRows<Tr>(acc, pb0, pb1, vs, sub, lane);
  }
}

// The warp's state into the merge scratch: its columns' m and l (summed over the 8 lanes that
// share them) and its accumulators, times v_scale, as [warp][query row][D] rows.
template <typename Tr>
__device__ __forceinline__ void StoreKeyRowsState(float* m_smem, float* l_smem, float* acc_smem,
                                                  int warp, int lane, int nrows,
                                                  const float (&m)[2], float (&l)[2],
                                                  const float (&acc)[Tr::kHeadDim / 16][4],
                                                  float v_scale) {
  constexpr int D = Tr::kHeadDim, kRows = Tr::kRows;
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 4);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 8);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 16);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = 2 * c + i;
    if (r >= nrows) continue;
    if (g == 0) {
      m_smem[warp * kRows + r] = m[i];
      l_smem[warp * kRows + r] = l[i];
    }
    float* dst = acc_smem + (warp * kRows + r) * D;
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      if constexpr (Tr::kFp8) {
        *reinterpret_cast<float2*>(dst + 16 * n + 2 * g) =
            make_float2(v_scale * acc[n][i], v_scale * acc[n][2 + i]);
      } else {
        dst[16 * n + g] = acc[n][i];
        dst[16 * n + g + 8] = acc[n][2 + i];
      }
    }
  }
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_DECODE_DECODE_KEY_ROWS_CUH_
