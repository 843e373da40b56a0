// Copies whose addresses are read from device memory when the kernel runs, so a captured CUDA
// graph can move each call's inputs and outputs between the caller's buffers and its own.
#include <cstdint>

#include "kernels/cuda/attention_cuda.h"

namespace attnd::kernels::cuda {
namespace {

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

}  // namespace

cudaError_t LaunchIndirectCopies(const IndirectCopy* copies, int count, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  IndirectCopyKernel<<<dim3(64, static_cast<unsigned>(count)), 256, 0, stream>>>(copies);
  return cudaGetLastError();
}

}  // namespace attnd::kernels::cuda
