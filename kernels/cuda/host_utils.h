// Host-side helpers of the launchers: argument checks and the FastDivmod constants.
#ifndef ATTND_KERNELS_CUDA_HOST_UTILS_H_
#define ATTND_KERNELS_CUDA_HOST_UTILS_H_

#include <cstdint>

#include "kernels/cuda/device_utils.cuh"

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

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_HOST_UTILS_H_
