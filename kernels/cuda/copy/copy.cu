// Launchers of the graph copy kernels.
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/common/launch.h"
#include "kernels/cuda/copy/copy.h"
#include "kernels/cuda/copy/copy_kernel.cuh"

namespace attnd::kernels::cuda {

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
