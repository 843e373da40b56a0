// Online softmax (FlashAttention-2) in log2 units, the arithmetic the kernel families share. A
// thread of an mma.sync m16n8k16 (or wgmma m64) accumulator fragment holds two rows, i = 0 and 1;
// the four lanes of a quad hold the rest of each row. A row keeps its running max m and sum l in
// log2 units.
//
// Where the logits' scale is applied differs, and so does the rounding: decode scales (or
// soft-caps) its scores in the pass that masks them and exponentiates s - m; the prefill kernels
// keep raw scores and fold the scale into the exponent's FFMA, fma(s, scale, -m), one rounding
// fewer. The two are the Logits policies below. Decode and the portable prefill then run the
// same step (OnlineSoftmaxStep). The Hopper prefill shares only the row-max update and the
// exponent: its accumulators are in flight in wgmma when the step runs (it rescales them after
// the wait), and it sums a row's probabilities as a tree, l * alpha + sum, for shorter
// dependency chains, which rounds differently from OnlineSoftmaxStep's running sum.
#ifndef ATTND_KERNELS_CUDA_COMMON_SOFTMAX_CUH_
#define ATTND_KERNELS_CUDA_COMMON_SOFTMAX_CUH_

#include <cmath>

#include "kernels/cuda/common/device_utils.cuh"

namespace attnd::kernels::cuda::detail {

// Decode: logits already in log2 units.
struct ScaledLogits {
  __device__ __forceinline__ float Logit(float x) const { return x; }
  __device__ __forceinline__ float Exp2(float s, float m_use) const { return FastExp2(s - m_use); }
};

// Prefill: raw scores; logit = s * scale, inside the exponent's FFMA.
struct RawScores {
  float scale;
  __device__ __forceinline__ float Logit(float x) const { return x * scale; }
  __device__ __forceinline__ float Exp2(float s, float m_use) const {
    return FastExp2(fmaf(s, scale, -m_use));
  }
};

struct RowMax {
  float m_new;  // the row's running max after this tile
  float m_use;  // the max this tile's logits are taken from
  float alpha;  // the factor for the row's earlier sum and accumulators
};

// Folds this thread's part of a tile's row max (mx) into the lanes that share the row (lane
// bits [kFirstXor, kEndXor): the quad by default), then into the running max m. A row that has
// seen no visible key yet subtracts 0, so that its exponentials are exp2(-inf) = 0 rather than
// NaN. The caller stores m_new.
template <int kFirstXor = 1, int kEndXor = 4, typename Logits>
__device__ __forceinline__ RowMax NextRowMax(float m, float mx, const Logits& logits) {
#pragma unroll
  for (int x = kFirstXor; x < kEndXor; x <<= 1) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, x));
  }
  const float m_new = fmaxf(m, logits.Logit(mx));
  const float m_use = m_new == -INFINITY ? 0.f : m_new;
  return {m_new, m_use, FastExp2(m - m_use)};
}

// One tile of an mma.sync kernel: scores s[j][2 i + e] and accumulators acc[n][2 i + e] of this
// thread's rows i, the rows' tile maxima mx (this thread's part). Rescales l and acc by alpha,
// then leaves the probabilities in s and adds them to l in key order. Without `upper`, the
// second row (i = 1) holds no query: its probabilities are 0 and its state stays as it was.
template <typename Logits, int kJ, int kN>
__device__ __forceinline__ void OnlineSoftmaxStep(float (&s)[kJ][4], const float (&mx)[2],
                                                  float (&m)[2], float (&l)[2],
                                                  float (&acc)[kN][4], const Logits& logits,
                                                  bool upper = true) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (i == 1 && !upper) {
#pragma unroll
      for (int j = 0; j < kJ; ++j) s[j][2] = s[j][3] = 0.f;
      break;
    }
    const RowMax r = NextRowMax(m[i], mx[i], logits);
    m[i] = r.m_new;
    l[i] *= r.alpha;
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      acc[n][2 * i] *= r.alpha;
      acc[n][2 * i + 1] *= r.alpha;
    }
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      s[j][2 * i] = logits.Exp2(s[j][2 * i], r.m_use);
      s[j][2 * i + 1] = logits.Exp2(s[j][2 * i + 1], r.m_use);
      l[i] += s[j][2 * i] + s[j][2 * i + 1];
    }
  }
}

// OnlineSoftmaxStep for the transposed tile of the decode kernel's key-rows layout: the keys
// are the mma's rows and the query rows its columns, so s[j][2 h + i] is key g + 8 h of block j
// for query column i (2c + i), acc[n][2 h + i] likewise, and a column's other keys sit in the
// 8 lanes that share c (lane bits 2..4).
template <int kJ, int kN>
__device__ __forceinline__ void OnlineSoftmaxStepKeyRows(float (&s)[kJ][4], const float (&mx)[2],
                                                         float (&m)[2], float (&l)[2],
                                                         float (&acc)[kN][4]) {
  const ScaledLogits logits;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const RowMax r = NextRowMax<4, 32>(m[i], mx[i], logits);
    m[i] = r.m_new;
    l[i] *= r.alpha;
#pragma unroll
    for (int n = 0; n < kN; ++n) {
      acc[n][i] *= r.alpha;
      acc[n][2 + i] *= r.alpha;
    }
#pragma unroll
    for (int j = 0; j < kJ; ++j) {
      s[j][i] = logits.Exp2(s[j][i], r.m_use);
      s[j][2 + i] = logits.Exp2(s[j][2 + i], r.m_use);
      l[i] += s[j][i] + s[j][2 + i];
    }
  }
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_COMMON_SOFTMAX_CUH_
