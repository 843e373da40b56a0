// Stand-alone merge of partial attention states (split-KV): one warp per (request, head), items
// merged in index order so that the result does not depend on scheduling. Batch decode uses it
// in deterministic mode, as a programmatic dependent launch.
#include <cuda_runtime.h>

#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/merge_states.cuh"

namespace attnd::kernels::cuda {
namespace detail {

struct MergeParams {
  int num_heads;
  const int32_t* indptr;
  const float* partial_out;
  const float* partial_lse;
  void* out;
  int64_t o_sb, o_sh;
  float* lse;
};

constexpr int kMergeWarps = 4;

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

template <typename T, int D>
cudaError_t LaunchMergeTyped(const MergeParams& p, dim3 grid, bool programmatic,
                             cudaStream_t s) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(kMergeWarps * 32);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, MergeStatesKernel<T, D>, p);
}

template <typename T>
cudaError_t LaunchMergeDim(const MergeParams& p, int64_t head_dim, dim3 grid, bool prog,
                           cudaStream_t s) {
  switch (head_dim) {
    case 64: return LaunchMergeTyped<T, 64>(p, grid, prog, s);
    case 128: return LaunchMergeTyped<T, 128>(p, grid, prog, s);
    case 256: return LaunchMergeTyped<T, 256>(p, grid, prog, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace detail

cudaError_t LaunchMergeStates(const MergeArgs& a, cudaStream_t stream) {
  if (a.batch < 0 || a.num_heads <= 0 || a.indptr == nullptr || a.out == nullptr ||
      a.out_stride_b % 2 || a.out_stride_h % 2) {
    return cudaErrorInvalidValue;
  }
  if (a.batch == 0) return cudaSuccess;
  detail::MergeParams p{};
  p.num_heads = static_cast<int>(a.num_heads);
  p.indptr = a.indptr;
  p.partial_out = a.partial_out;
  p.partial_lse = a.partial_lse;
  p.out = a.out;
  p.o_sb = a.out_stride_b;
  p.o_sh = a.out_stride_h;
  p.lse = a.lse;
  const dim3 grid(a.batch, static_cast<unsigned>((a.num_heads + detail::kMergeWarps - 1) /
                                                 detail::kMergeWarps));
  if (a.dtype == DType::kBFloat16) {
    return detail::LaunchMergeDim<__nv_bfloat16>(p, a.head_dim, grid, a.programmatic, stream);
  }
  if (a.dtype == DType::kFloat16) {
    return detail::LaunchMergeDim<__half>(p, a.head_dim, grid, a.programmatic, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace attnd::kernels::cuda
