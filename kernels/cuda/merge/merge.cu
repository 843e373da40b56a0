// Launcher of the stand-alone merge kernel: checks the arguments and dispatches on dtype and
// head_dim.
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/common/dispatch.h"
#include "kernels/cuda/common/launch.h"
#include "kernels/cuda/merge/merge.h"
#include "kernels/cuda/merge/merge_kernel.cuh"
#include "kernels/cuda/merge/merge_params.cuh"

namespace attnd::kernels::cuda {
namespace {

constexpr char kFamily[] = "merge";

template <typename T, int D>
struct LaunchMergeFn {
  static absl::Status Run(const detail::MergeParams& p, dim3 grid, bool programmatic,
                          cudaStream_t stream) {
    return detail::CudaStatus(
        detail::LaunchKernel(detail::MergeStatesKernel<T, D>, grid, dim3(detail::kMergeWarps * 32),
                             0, stream, programmatic, p),
        "merge kernel launch");
  }
};

absl::Status ValidateMergeArgs(const MergeArgs& a) {
  using detail::InvalidArg;
  if (a.batch < 0) return InvalidArg(kFamily, "batch ", a.batch, " is negative");
  if (a.num_heads <= 0) return InvalidArg(kFamily, "num_heads ", a.num_heads, " is not positive");
  if (a.indptr == nullptr) return InvalidArg(kFamily, "indptr is null");
  if (a.out == nullptr) return InvalidArg(kFamily, "out is null");
  if (a.out_stride_b % 2) {
    return InvalidArg(kFamily, "out_stride_b ", a.out_stride_b, " is not a multiple of 2");
  }
  if (a.out_stride_h % 2) {
    return InvalidArg(kFamily, "out_stride_h ", a.out_stride_h, " is not a multiple of 2");
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchMergeStates(const MergeArgs& a, cudaStream_t stream) {
  if (absl::Status s = ValidateMergeArgs(a); !s.ok()) return s;
  if (a.batch == 0) return absl::OkStatus();
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
  return detail::DispatchDTypeHeadDim<LaunchMergeFn>(kFamily, a.dtype, a.head_dim, p, grid,
                                                     a.programmatic, stream);
}

}  // namespace attnd::kernels::cuda
