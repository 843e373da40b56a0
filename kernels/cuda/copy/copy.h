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

// `bytes` bytes from src + src_offset to dst + dst_offset.
struct ByteRun {
  uint64_t src_offset;
  uint64_t dst_offset;
  uint64_t bytes;
};
// The runs of a KV pull between two pools on one node (src mapped from the peer through CUDA
// IPC): `runs` (device memory, `count` of them, multiples of 16 bytes at 16-byte aligned
// offsets) copied by one warp each; callers split runs longer than kMaxRunBytes so that warps
// share the work. One launch moves any number of runs: what a request per run costs in copy
// calls and events (UCX's cuda_ipc pays one copy call per request) is paid once.
inline constexpr uint64_t kMaxRunBytes = 64 << 10;
absl::Status LaunchRunsCopy(const void* src, void* dst, const ByteRun* runs, int64_t count,
                            cudaStream_t stream);

}  // namespace attnd::kernels::cuda

#endif  // ATTND_KERNELS_CUDA_COPY_COPY_H_
