// Device-side parameters and shape of the append kernel.
#ifndef ATTND_KERNELS_CUDA_APPEND_APPEND_PARAMS_CUH_
#define ATTND_KERNELS_CUDA_APPEND_APPEND_PARAMS_CUH_

#include <cstdint>

#include "kernels/cuda/common/device_utils.cuh"

namespace attnd::kernels::cuda::detail {

struct AppendParams {
  void* kv_layer;
  const int32_t* layer_ptr;  // non-null: add *layer_ptr * layer_elems to kv_layer
  int64_t layer_elems;
  int64_t page_stride, v_offset, slot_stride, head_stride;
  FastDivmod page_div;
  FastDivmod heads_div;
  const uint16_t* k;
  const uint16_t* v;
  int64_t k_ts, v_ts;
  const int64_t* slot_mapping;
  int64_t num_rows;  // tokens * kv heads
  int chunks_log2;   // log2(head_dim / 8)
  int head_dim;
  // fp8 pools: the layer (when layer_ptr is null) and the device [layers][2] K/V scales.
  int layer;
  const float* scales;
  // Per-token scales (kFp8E4M3PerToken): the pool's [layers][pages][2][kv_heads][page_size].
  float* token_scales;
  int64_t layer_scales, page_scales;  // floats per layer and per page
  int page_size;
  int scale_v_offset;                 // floats from a page's K scales to its V scales
};

// A thread moves one 16-byte chunk of kRowsPerThread (token, head) rows, loads first, so that
// two rows' loads are in flight together.
constexpr int kAppendThreads = 256;
constexpr int kRowsPerThread = 2;

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_APPEND_APPEND_PARAMS_CUH_
