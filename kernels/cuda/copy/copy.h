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

// A KV pull within one node: positions [0, num_tokens) of kv heads [head_begin, head_end) of
// layers [layer_begin, layer_end) of a peer's pool (mapped into this device through CUDA IPC)
// into this pool at heads [0, head_end - head_begin) and layers from dst_layer_begin. Both pools
// are [layers][pages][2][page block] with the same page size, head dim, dtype and layout; the
// page ids of positions [0, num_tokens) are in device memory. One warp per (layer, page, K/V)
// block computes its own addresses, so a pull uploads two page lists, not a list of runs, and
// costs one launch however scattered its pages are.
struct PagedPullParams {
  const uint8_t* src = nullptr;
  uint8_t* dst = nullptr;
  const int32_t* src_pages = nullptr;  // device memory
  const int32_t* dst_pages = nullptr;
  int64_t src_pool_pages = 0, dst_pool_pages = 0;  // pages per layer of each pool
  int64_t src_heads = 0, dst_heads = 0;  // kv heads of each pool; dst_heads heads are copied
  int64_t head_begin = 0;
  int64_t layer_begin = 0, layer_end = 0, dst_layer_begin = 0;
  int64_t num_tokens = 0, page_size = 0, head_dim = 0, elem_bytes = 0;
  bool hnd = false;  // HND page blocks ([heads][page_size][dim]); else NHD
  // Per-token scale pools (KvStorage::kFp8E4M3PerToken): the byte offsets of each pool's
  // scales ([layers][pages][2][heads][page_size] floats), which move with their slots; -1: none.
  int64_t src_scales_offset = -1, dst_scales_offset = -1;
};
absl::Status LaunchPagedPull(const PagedPullParams& params, cudaStream_t stream);

}  // namespace attnd::kernels::cuda

#endif  // ATTND_KERNELS_CUDA_COPY_COPY_H_
