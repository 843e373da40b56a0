// Device-side parameters and shape of the stand-alone merge kernel.
#ifndef ATTND_KERNELS_CUDA_MERGE_MERGE_PARAMS_CUH_
#define ATTND_KERNELS_CUDA_MERGE_MERGE_PARAMS_CUH_

#include <cstdint>

namespace attnd::kernels::cuda::detail {

struct MergeParams {
  int num_heads;
  const int32_t* indptr;
  const float* partial_out;
  const float* partial_lse;
  void* out;
  int64_t o_sb, o_sh;
  float* lse;
};

constexpr int kMergeWarps = 4;  // a warp per (request, head); a CTA takes kMergeWarps heads

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_MERGE_MERGE_PARAMS_CUH_
