// Copies for CUDA graphs: their addresses and sizes are read from memory when the kernel runs,
// so a graph captured once moves whatever each call names.
#ifndef ATTND_KERNELS_CUDA_COPY_COPY_H_
#define ATTND_KERNELS_CUDA_COPY_COPY_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace attnd::kernels::cuda {

// One copy of `bytes` bytes (0: none); an array of these lives in device memory and is read when
// the kernel runs, so a graph captured once copies whatever the host wrote there before replay.
struct IndirectCopy {
  const void* src;
  void* dst;
  uint64_t bytes;
};
absl::Status LaunchIndirectCopies(const IndirectCopy* copies, int count, cudaStream_t stream);

// Copies two ranges of a pinned host block to the device, their sizes read from pinned host
// memory when the kernel runs: header[0] bytes from offset 0 and header[2] bytes from offset
// header[1] (offsets and sizes multiples of 4). A graph that starts with it takes each call's
// arguments with no host copy call of its own.
absl::Status LaunchHostRangesCopy(const uint32_t* header, const void* src, void* dst,
                                  cudaStream_t stream);

}  // namespace attnd::kernels::cuda

#endif  // ATTND_KERNELS_CUDA_COPY_COPY_H_
