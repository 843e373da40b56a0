// Host-side helpers of the launchers: the FastDivmod constants, alignment checks and the logit
// scales every kernel family takes. Included by the launchers (.cu) only.
#ifndef ATTND_KERNELS_CUDA_COMMON_HOST_UTILS_H_
#define ATTND_KERNELS_CUDA_COMMON_HOST_UTILS_H_

#include <cstdint>
#include <initializer_list>

#include "absl/status/status.h"

#include "kernels/cuda/common/constants.h"
#include "kernels/cuda/common/device_utils.cuh"
#include "kernels/cuda/common/launch.h"
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

// A stride argument, by the name the launcher's caller knows it.
struct NamedStride {
  const char* name;
  int64_t value;
};

// The checks every attention launcher makes of its tensors: q, out, the pool and the page table
// are given; q, out and the pool are 16-byte aligned and their strides whole 16-byte vectors
// (multiples of 8 elements), since the kernels move 16 bytes at a time.
inline absl::Status CheckAttentionTensors(const char* family, const void* q, const void* out,
                                          const void* pool, const int32_t* kv_indices,
                                          std::initializer_list<NamedStride> strides) {
  if (q == nullptr) return InvalidArg(family, "q is null");
  if (out == nullptr) return InvalidArg(family, "out is null");
  if (pool == nullptr) return InvalidArg(family, "kv.pool is null");
  if (kv_indices == nullptr) return InvalidArg(family, "kv_indices is null");
  if (!Aligned16(q)) return InvalidArg(family, "q is not 16-byte aligned");
  if (!Aligned16(out)) return InvalidArg(family, "out is not 16-byte aligned");
  if (!Aligned16(pool)) return InvalidArg(family, "kv.pool is not 16-byte aligned");
  for (const NamedStride& s : strides) {
    if (s.value % 8) return InvalidArg(family, s.name, " ", s.value, " is not a multiple of 8");
  }
  return absl::OkStatus();
}

// The head and page checks every attention launcher makes: the GQA group is a whole number of
// query heads per KV head, and a page's slot index fits the kernels' 32-bit arithmetic.
inline absl::Status CheckHeadsAndPages(const char* family, int64_t num_qo_heads,
                                       const KvCacheShape& shape) {
  const int64_t kvh = shape.num_kv_heads;
  if (kvh <= 0) return InvalidArg(family, "kv.shape.num_kv_heads ", kvh, " is not positive");
  if (num_qo_heads <= 0)
    return InvalidArg(family, "opts.num_qo_heads ", num_qo_heads, " is not positive");
  if (num_qo_heads % kvh != 0) {
    return InvalidArg(family, "opts.num_qo_heads ", num_qo_heads,
                      " is not a multiple of num_kv_heads ", kvh);
  }
  if (shape.page_size <= 0 || shape.page_size >= (1 << 30)) {
    return InvalidArg(family, "kv.shape.page_size ", shape.page_size, " is not in [1, 2^30)");
  }
  return absl::OkStatus();
}

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
