// Host-side helpers of the launchers: the FastDivmod constants, alignment checks and the logit
// scales every kernel family takes. Included by the launchers (.cu) only.
#ifndef ATTND_KERNELS_CUDA_COMMON_HOST_UTILS_H_
#define ATTND_KERNELS_CUDA_COMMON_HOST_UTILS_H_

#include <cstdint>

#include "kernels/cuda/common/constants.h"
#include "kernels/cuda/common/device_utils.cuh"
#include "kernels/paged_kv.h"

namespace attnd::kernels::cuda::detail {

inline FastDivmod MakeFastDivmod(uint32_t d) {
  FastDivmod f{d, 0, 0};
  if (d > 1) {
    uint32_t l = 0;
    while ((1ull << l) < d) ++l;  // ceil(log2 d)
    const uint64_t p = 31 + l;
    f.multiplier = static_cast<uint32_t>(((1ull << p) + d - 1) / d);
    f.shift = static_cast<uint32_t>(p - 32);
  }
  return f;
}

inline bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// The kernels compute logits in log2 units: s = pre * q.k, or with a soft cap
// s = post * tanh(pre * q.k). One definition for every kernel family.
struct LogitScales {
  int soft_cap;
  float pre;
  float post;
};

inline LogitScales MakeLogitScales(const AttentionOptions& opts) {
  if (opts.logits_soft_cap > 0.f)
    return {1, opts.sm_scale / opts.logits_soft_cap, opts.logits_soft_cap * kLog2e};
  return {0, opts.sm_scale * kLog2e, 0.f};
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_COMMON_HOST_UTILS_H_
