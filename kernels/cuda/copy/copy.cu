// Launchers of the graph copy kernels.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/common/launch.h"
#include "kernels/cuda/copy/copy.h"
#include "kernels/cuda/copy/copy_kernel.cuh"

namespace attnd::kernels::cuda {

absl::Status LaunchPagedPull(const PagedPullParams& p, cudaStream_t stream) {
  if (p.num_tokens <= 0 || p.layer_end <= p.layer_begin) return absl::OkStatus();
  if (p.src == nullptr || p.dst == nullptr || p.src_pages == nullptr || p.dst_pages == nullptr)
    return absl::InvalidArgumentError("src, dst, src_pages, dst_pages: must not be null");
  if (((reinterpret_cast<uintptr_t>(p.src) | reinterpret_cast<uintptr_t>(p.dst)) & 15) != 0 ||
      (p.head_dim * p.elem_bytes) % 16 != 0)
    return absl::InvalidArgumentError(
        "src, dst, head_dim: pools must be 16-byte aligned with rows of a multiple of 16 bytes");
  if (p.dst_heads <= 0 || p.head_begin < 0 || p.head_begin + p.dst_heads > p.src_heads ||
      p.page_size <= 0)
    return absl::InvalidArgumentError("head_begin, dst_heads: outside the source's heads");
  if ((p.src_scales_offset < 0) != (p.dst_scales_offset < 0) ||
      (p.src_scales_offset >= 0 && ((p.src_scales_offset | p.dst_scales_offset) & 3) != 0))
    return absl::InvalidArgumentError(
        "src_scales_offset, dst_scales_offset: both or neither, 4-byte aligned");
  const int64_t pages = (p.num_tokens + p.page_size - 1) / p.page_size;
  const int64_t items = (p.layer_end - p.layer_begin) * pages * 2;
  const int64_t blocks = std::min<int64_t>((items + 7) / 8, 132 * 16);  // 8 warps a block
  detail::PagedPullKernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
  return detail::CudaStatus(cudaGetLastError(), "paged pull kernel launch");
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
