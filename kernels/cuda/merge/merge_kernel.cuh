// Stand-alone merge of partial attention states (split-KV): one warp per (request, head), items
// merged in index order so that the result does not depend on scheduling. Batch decode uses it
// in deterministic mode, as a programmatic dependent launch.
#ifndef ATTND_KERNELS_CUDA_MERGE_MERGE_KERNEL_CUH_
#define ATTND_KERNELS_CUDA_MERGE_MERGE_KERNEL_CUH_

#include <cstdint>

#include "kernels/cuda/common/device_utils.cuh"
#include "kernels/cuda/common/merge_states.cuh"
#include "kernels/cuda/merge/merge_params.cuh"

namespace attnd::kernels::cuda::detail {

template <typename T, int D>
__global__ void __launch_bounds__(kMergeWarps * 32)
    MergeStatesKernel(const __grid_constant__ MergeParams p) {
  GridDependencyWait();  // no-op unless launched as a programmatic dependent
  const int b = blockIdx.x;
  const int h = blockIdx.y * kMergeWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const int begin = __ldg(p.indptr + b), end = __ldg(p.indptr + b + 1);
  if (end - begin < 2 || h >= p.num_heads) return;
  MergeRowWarp<T, D>(p.partial_out, p.partial_lse, p.num_heads, begin, end - begin, h, lane,
                     static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh,
                     p.lse != nullptr ? p.lse + static_cast<int64_t>(b) * p.num_heads + h
                                      : nullptr);
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_MERGE_MERGE_KERNEL_CUH_
