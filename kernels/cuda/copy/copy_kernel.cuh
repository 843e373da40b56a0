// Copy kernels whose addresses (and sizes) are read from memory when the kernel runs, so a
// captured CUDA graph can move each call's inputs and outputs between the caller's buffers and
// its own.
#ifndef ATTND_KERNELS_CUDA_COPY_COPY_KERNEL_CUH_
#define ATTND_KERNELS_CUDA_COPY_COPY_KERNEL_CUH_

#include <cstdint>

#include "kernels/cuda/copy/copy.h"

namespace attnd::kernels::cuda::detail {

__global__ void IndirectCopyKernel(const IndirectCopy* copies) {
  const IndirectCopy c = copies[blockIdx.y];
  if (c.bytes == 0) return;
  const auto* src = static_cast<const uint8_t*>(c.src);
  auto* dst = static_cast<uint8_t*>(c.dst);
  const uint64_t stride = uint64_t{gridDim.x} * blockDim.x;
  const uint64_t first = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const bool vec = ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                     c.bytes) & 15) == 0;
  if (vec) {
    const auto* s = reinterpret_cast<const uint4*>(src);
    auto* d = reinterpret_cast<uint4*>(dst);
    for (uint64_t i = first; i < c.bytes / 16; i += stride) d[i] = s[i];
  } else {
    for (uint64_t i = first; i < c.bytes; i += stride) dst[i] = src[i];
  }
}

// Copies [0, first) and [second_offset, second_offset + second) of src (pinned host memory,
// read through the unified address space) to dst; the three sizes are read from `header`, also
// in host memory, when the kernel runs.
__global__ void HostRangesCopyKernel(const uint32_t* header, const uint32_t* src, uint32_t* dst) {
  __shared__ uint32_t range[2];
  if (threadIdx.x == 0) {
    const uint32_t first = header[0], second_offset = header[1], second = header[2];
    range[0] = blockIdx.y == 0 ? 0 : second_offset / 4;
    range[1] = blockIdx.y == 0 ? first / 4 : second / 4;
  }
  __syncthreads();
  const uint32_t begin = range[0], words = range[1];
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < words; i += gridDim.x * blockDim.x)
    dst[begin + i] = src[begin + i];
}

// One warp per run, 16 bytes per lane per step; warps stride over the runs.
__global__ void RunsCopyKernel(const uint8_t* src, uint8_t* dst, const ByteRun* runs,
                               int64_t count) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / 32);
  for (int64_t r = int64_t{blockIdx.x} * (blockDim.x / 32) + threadIdx.x / 32; r < count;
       r += warps) {
    const ByteRun run = runs[r];
    const auto* s = reinterpret_cast<const uint4*>(src + run.src_offset);
    auto* d = reinterpret_cast<uint4*>(dst + run.dst_offset);
    const uint64_t n = run.bytes / 16;
    for (uint64_t i = lane; i < n; i += 32) d[i] = s[i];
  }
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_COPY_COPY_KERNEL_CUH_
