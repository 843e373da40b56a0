// Epilogue stores shared by the kernel families: 16-byte chunks of output rows, fp32 partial
// states for a later merge (kernels/cuda/common/merge_states.cuh), and the combination of
// per-warp states when the warps of a CTA split one row's keys (decode, narrow prefill tiles).
#ifndef ATTND_KERNELS_CUDA_COMMON_EPILOGUE_CUH_
#define ATTND_KERNELS_CUDA_COMMON_EPILOGUE_CUH_

#include <cmath>
#include <cstdint>

#include "kernels/cuda/common/device_utils.cuh"

namespace attnd::kernels::cuda::detail {

// Eight output values packed for one 16-byte store. Callers write `*dst = PackChunk<T>(o)`: the
// right side is sequenced first, so the address arithmetic follows the conversions as the
// kernels were tuned.
template <typename T>
__device__ __forceinline__ uint4 PackChunk(const float (&o)[8]) {
  uint4 packed;
  packed.x = PackPair<T>(o[0], o[1]);
  packed.y = PackPair<T>(o[2], o[3]);
  packed.z = PackPair<T>(o[4], o[5]);
  packed.w = PackPair<T>(o[6], o[7]);
  return packed;
}

// Eight fp32 partial values. Cached in L2 only: another CTA reads them once, soon.
__device__ __forceinline__ void StorePartialChunk(float* dst, const float (&o)[8]) {
  __stcg(reinterpret_cast<float4*>(dst), make_float4(o[0], o[1], o[2], o[3]));
  __stcg(reinterpret_cast<float4*>(dst + 4), make_float4(o[4], o[5], o[6], o[7]));
}

// ---- Warps that split a row's keys ------------------------------------------------------------
// Each warp leaves its state in shared memory: m and l of row r at [warp * kRowStride + r], its
// fp32 accumulator row at acc_smem + (warp * kRowStride + r) * D. The mma fragment's rows of a
// thread are r_lo = lane / 4 and r_lo + 8.

// The thread's two rows' m and l, written by one lane of the quad.
template <int kRowStride>
__device__ __forceinline__ void StoreWarpRowStats(float* m_smem, float* l_smem, int warp,
                                                  int lane, const float (&m)[2],
                                                  const float (&l)[2]) {
  const int r_lo = lane >> 2;
  if ((lane & 3) == 0) {
    m_smem[warp * kRowStride + r_lo] = m[0];
    l_smem[warp * kRowStride + r_lo] = l[0];
    m_smem[warp * kRowStride + r_lo + 8] = m[1];
    l_smem[warp * kRowStride + r_lo + 8] = l[1];
  }
}

// The thread's part of accumulator row r (fragment row i: r = r_lo + 8 i).
template <int kRowStride, int D, int kN>
__device__ __forceinline__ void StoreWarpAccRow(float* acc_smem, int warp, int r, int lane,
                                                const float (&acc)[kN][4], int i) {
  float* dst = acc_smem + (warp * kRowStride + r) * D + ((lane & 3) << 1);
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    *reinterpret_cast<float2*>(dst + n * 8) = make_float2(acc[n][2 * i], acc[n][2 * i + 1]);
  }
}

// StoreWarpAccRow for the fp8 decode's accumulators, times `scale`: tiles 2b and 2b + 1 hold
// the even and the odd dims of dims [16b, 16b + 16), so a thread's four columns of block b
// are dims 16b + 4c .. 16b + 4c + 3 (c = lane % 4), one 16-byte store.
template <int kRowStride, int D, int kN>
__device__ __forceinline__ void StoreWarpAccRowInterleaved(float* acc_smem, int warp, int r,
                                                           int lane, const float (&acc)[kN][4],
                                                           int i, float scale) {
  float* dst = acc_smem + (warp * kRowStride + r) * D + ((lane & 3) << 2);
#pragma unroll
  for (int b = 0; b < kN / 2; ++b) {
    *reinterpret_cast<float4*>(dst + 16 * b) =
        make_float4(scale * acc[2 * b][2 * i], scale * acc[2 * b + 1][2 * i],
                    scale * acc[2 * b][2 * i + 1], scale * acc[2 * b + 1][2 * i + 1]);
  }
}

// Merges the kWarps states of row r, in warp order (so the bits do not depend on timing), into
// chunk ch of the normalised output row, o; returns the row's lse in log2 units (-inf, with a
// zero row, when no warp saw a visible key). mw is scratch. Both arrays are the caller's, declared
// where the kernels always declared them: arrays of an inlined helper are hoisted to the top of
// the kernel, which renumbered the Hopper kernel's main-loop registers and changed its SASS.
template <int kWarps, int kRowStride, int D>
__device__ __forceinline__ float CombineWarpStates(const float* m_smem, const float* l_smem,
                                                   const float* acc_smem, int r, int ch,
                                                   float (&mw)[kWarps], float (&o)[8]) {
  float mmax = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    mw[w] = m_smem[w * kRowStride + r];
    mmax = fmaxf(mmax, mw[w]);
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) o[e] = 0.f;
  float lsum = 0.f;
  if (mmax != -INFINITY) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float sc = FastExp2(mw[w] - mmax);
      lsum += sc * l_smem[w * kRowStride + r];
      const float* src = acc_smem + (w * kRowStride + r) * D + ch * 8;
      const float4 x0 = *reinterpret_cast<const float4*>(src);
      const float4 x1 = *reinterpret_cast<const float4*>(src + 4);
      o[0] += sc * x0.x; o[1] += sc * x0.y; o[2] += sc * x0.z; o[3] += sc * x0.w;
      o[4] += sc * x1.x; o[5] += sc * x1.y; o[6] += sc * x1.z; o[7] += sc * x1.w;
    }
  }
  const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) o[e] *= inv;
  return lsum > 0.f ? __log2f(lsum) + mmax : -INFINITY;
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_COMMON_EPILOGUE_CUH_
