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

// Copies `bytes` (a multiple of 16) with one warp; each lane issues four 16-byte loads before
// its stores, so a warp keeps 2 KiB in flight.
__device__ __forceinline__ void WarpCopy(const uint8_t* src, uint8_t* dst, int64_t bytes,
                                         int lane) {
  constexpr int kUnroll = 4;
  const auto* s = reinterpret_cast<const uint4*>(src);
  auto* d = reinterpret_cast<uint4*>(dst);
  const int64_t n = bytes / 16;
  for (int64_t i = lane; i < n; i += 32 * kUnroll) {
    uint4 v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k)
      if (i + 32 * k < n) v[k] = s[i + 32 * k];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k)
      if (i + 32 * k < n) d[i + 32 * k] = v[k];
  }
}

// One warp per (layer, page, K/V) block of the pull; warps stride over the blocks. Within a
// block the contiguous units are slots (NHD: a slot's heads) or heads (HND: a head's slots).
__global__ void PagedPullKernel(const PagedPullParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t pages = (p.num_tokens + p.page_size - 1) / p.page_size;
  const int64_t items = (p.layer_end - p.layer_begin) * pages * 2;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / 32);
  const int64_t row = p.head_dim * p.elem_bytes;  // one head of one slot
  const int64_t src_block = p.page_size * p.src_heads * row;
  const int64_t dst_block = p.page_size * p.dst_heads * row;
  for (int64_t item = int64_t{blockIdx.x} * (blockDim.x / 32) + threadIdx.x / 32; item < items;
       item += warps) {
    const int kv = static_cast<int>(item % 2);
    const int64_t page = (item / 2) % pages;
    const int64_t layer = item / 2 / pages;
    const int64_t rows = min(p.page_size, p.num_tokens - page * p.page_size);
    const uint8_t* s = p.src + ((p.layer_begin + layer) * p.src_pool_pages * 2 +
                                int64_t{p.src_pages[page]} * 2 + kv) * src_block;
    uint8_t* d = p.dst + ((p.dst_layer_begin + layer) * p.dst_pool_pages * 2 +
                          int64_t{p.dst_pages[page]} * 2 + kv) * dst_block;
    if (p.hnd) {  // head h: rows slots from h * page_size * row
      for (int64_t h = 0; h < p.dst_heads; ++h)
        WarpCopy(s + (p.head_begin + h) * p.page_size * row, d + h * p.page_size * row,
                 rows * row, lane);
    } else if (p.dst_heads == p.src_heads) {  // NHD, every head: the first rows slots at once
      WarpCopy(s, d, rows * p.src_heads * row, lane);
    } else {  // NHD, a head range: per slot
      for (int64_t slot = 0; slot < rows; ++slot)
        WarpCopy(s + (slot * p.src_heads + p.head_begin) * row, d + slot * p.dst_heads * row,
                 p.dst_heads * row, lane);
    }
    if (p.src_scales_offset >= 0) {  // per-token scales: the head range's first rows slots
      const float* ss = reinterpret_cast<const float*>(p.src + p.src_scales_offset) +
                        (((p.layer_begin + layer) * p.src_pool_pages + p.src_pages[page]) * 2 +
                         kv) * p.src_heads * p.page_size;
      float* ds = reinterpret_cast<float*>(p.dst + p.dst_scales_offset) +
                  (((p.dst_layer_begin + layer) * p.dst_pool_pages + p.dst_pages[page]) * 2 +
                   kv) * p.dst_heads * p.page_size;
      for (int64_t h = 0; h < p.dst_heads; ++h)
        for (int64_t i = lane; i < rows; i += 32)
          ds[h * p.page_size + i] = ss[(p.head_begin + h) * p.page_size + i];
    }
  }
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_COPY_COPY_KERNEL_CUH_
