// Merging of partial attention states (split-KV), shared by the decode kernel's fused merge, the
// stand-alone merge kernel and the prefill merge kernel. A partial state is an fp32 row
// normalised by its own softmax denominator plus that denominator's log2-sum-exp; rows of item
// i, head h live at [(i * num_heads + h) * D] and [i * num_heads + h].
#ifndef ATTND_KERNELS_CUDA_COMMON_MERGE_STATES_CUH_
#define ATTND_KERNELS_CUDA_COMMON_MERGE_STATES_CUH_

#include <cmath>
#include <cstdint>

#include "kernels/cuda/common/constants.h"
#include "kernels/cuda/common/device_utils.cuh"

namespace attnd::kernels::cuda::detail {

// One warp merges items [first, first + n) of head h, in index order (so the result does not
// depend on who runs it), each lane D/32 dims, and writes the output row (dtype T) and the lse
// (natural log; skipped when lse_out is null). The loads of a group of items are all in flight
// together: the merge may run while HBM is saturated, when each dependent round trip is slow.
template <typename T, int D>
__device__ __forceinline__ void MergeRowWarp(const float* partial_out, const float* partial_lse,
                                             int num_heads, int first, int n, int h, int lane,
                                             T* out_row, float* lse_out) {
  constexpr int V = D / 32;
  constexpr int G = (V >= 8 ? 32 : 64) / V;  // items whose partial rows are in flight together
  const float* lse_base = partial_lse + static_cast<int64_t>(first) * num_heads + h;
  const float* out_base =
      partial_out + (static_cast<int64_t>(first) * num_heads + h) * D + lane * V;
  const int64_t item_stride = static_cast<int64_t>(num_heads) * D;
  float x[G][V];
  auto load_group = [&](int j0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (j0 + g < n) {
        const float* src = out_base + (j0 + g) * item_stride;
#pragma unroll
        for (int e = 0; e < V; e += 2) {
          const float2 v2 = __ldcg(reinterpret_cast<const float2*>(src + e));
          x[g][e] = v2.x;
          x[g][e + 1] = v2.y;
        }
      }
    }
  };
  // The first group's rows and all the lse values are requested in the same round trip.
  load_group(0);
  const float lse0 = lane < n ? __ldcg(lse_base + static_cast<int64_t>(lane) * num_heads)
                              : -INFINITY;  // kept: the weights of the first 32 items
  float mmax = lse0;
  for (int i = lane + 32; i < n; i += 32) {
    mmax = fmaxf(mmax, __ldcg(lse_base + static_cast<int64_t>(i) * num_heads));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mmax = fmaxf(mmax, __shfl_xor_sync(0xffffffffu, mmax, o));
  float acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = 0.f;
  float lsum = 0.f;
  for (int j0 = 0; j0 < n; j0 += G) {
    if (j0 > 0) load_group(j0);
    // Weights of this group: lane g < G holds item j0 + g's (G divides 32).
    float l_lane = __shfl_sync(0xffffffffu, lse0, (j0 + lane) & 31);
    if (j0 >= 32) {
      l_lane = lane < G && j0 + lane < n
                   ? __ldcg(lse_base + static_cast<int64_t>(j0 + lane) * num_heads)
                   : -INFINITY;
    }
    const float w_lane =
        lane < G && j0 + lane < n && mmax != -INFINITY ? FastExp2(l_lane - mmax) : 0.f;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float w = __shfl_sync(0xffffffffu, w_lane, g);
      if (j0 + g < n) {
        lsum += w;
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] += w * x[g][e];
      }
    }
  }
  const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
  T* dst = out_row + lane * V;
#pragma unroll
  for (int e = 0; e < V; e += 2) {
    *reinterpret_cast<uint32_t*>(dst + e) = PackPair<T>(acc[e] * inv, acc[e + 1] * inv);
  }
  if (lane == 0 && lse_out != nullptr) {
    *lse_out = lsum > 0.f ? (__log2f(lsum) + mmax) * kLn2 : -INFINITY;
  }
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_COMMON_MERGE_STATES_CUH_
