// Launchers of the graph copy kernels.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/common/launch.h"
#include "kernels/cuda/copy/copy.h"
#include "kernels/cuda/copy/copy_kernel.cuh"

namespace attnd::kernels::cuda {

absl::Status LaunchRunsCopy(const void* src, void* dst, const ByteRun* runs, int64_t count,
                            cudaStream_t stream) {
  if (count < 0) return absl::InvalidArgumentError("count: negative");
  if (count == 0) return absl::OkStatus();
  if (src == nullptr || dst == nullptr || runs == nullptr)
    return absl::InvalidArgumentError("src, dst, runs: must not be null");
  if (((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) & 15) != 0)
    return absl::InvalidArgumentError("src, dst: must be 16-byte aligned");
  // 8 warps a block; enough blocks to fill the device, fewer for few runs.
  const int64_t blocks = std::min<int64_t>((count + 7) / 8, 132 * 16);
  detail::RunsCopyKernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), runs, count);
  return detail::CudaStatus(cudaGetLastError(), "runs copy kernel launch");
}

absl::Status LaunchHostRangesCopy(const uint32_t* header, const void* src, void* dst,
                                  cudaStream_t stream) {
  detail::HostRangesCopyKernel<<<dim3(32, 2), 256, 0, stream>>>(
      header, static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst));
  return detail::CudaStatus(cudaGetLastError(), "host ranges copy kernel launch");
}

absl::Status LaunchIndirectCopies(const IndirectCopy* copies, int count, cudaStream_t stream) {
  if (count <= 0) return absl::OkStatus();
  detail::IndirectCopyKernel<<<dim3(64, static_cast<unsigned>(count)), 256, 0, stream>>>(copies);
  return detail::CudaStatus(cudaGetLastError(), "indirect copy kernel launch");
}

}  // namespace attnd::kernels::cuda
