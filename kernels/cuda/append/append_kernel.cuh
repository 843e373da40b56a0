// The append kernel: scatters new tokens' K and V into their page slots, 16-byte chunks.
#ifndef ATTND_KERNELS_CUDA_APPEND_APPEND_KERNEL_CUH_
#define ATTND_KERNELS_CUDA_APPEND_APPEND_KERNEL_CUH_

#include <cstdint>

#include "kernels/cuda/append/append_params.cuh"
#include "kernels/cuda/common/device_utils.cuh"

namespace attnd::kernels::cuda::detail {

__global__ void __launch_bounds__(kAppendThreads)
    AppendKvKernel(const __grid_constant__ AppendParams p) {
  const int chunks = 1 << p.chunks_log2;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * kAppendThreads + threadIdx.x;
  const int ch = static_cast<int>(gid & (chunks - 1));
  const int64_t row_base = (gid >> p.chunks_log2) * kRowsPerThread;
  uint4 kx[kRowsPerThread], vx[kRowsPerThread];
  int64_t dst[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = row_base + i;
    dst[i] = -1;
    if (row >= p.num_rows) continue;
    uint32_t tok, head;
    p.heads_div.Divmod(static_cast<uint32_t>(row), tok, head);
    const int64_t slot = __ldg(p.slot_mapping + tok);
    if (slot < 0) continue;
    uint32_t pg, s;
    p.page_div.Divmod(static_cast<uint32_t>(slot), pg, s);
    dst[i] = pg * p.page_stride + s * p.slot_stride + head * p.head_stride + ch * 8;
    kx[i] = __ldcs(reinterpret_cast<const uint4*>(p.k + tok * p.k_ts + head * p.head_dim + ch * 8));
    vx[i] = __ldcs(reinterpret_cast<const uint4*>(p.v + tok * p.v_ts + head * p.head_dim + ch * 8));
  }
  uint16_t* base = static_cast<uint16_t*>(p.kv_layer) +
                   (p.layer_ptr != nullptr ? int64_t{__ldg(p.layer_ptr)} * p.layer_elems : 0);
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    if (dst[i] < 0) continue;
    *reinterpret_cast<uint4*>(base + dst[i]) = kx[i];
    *reinterpret_cast<uint4*>(base + dst[i] + p.v_offset) = vx[i];
  }
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_APPEND_APPEND_KERNEL_CUH_
