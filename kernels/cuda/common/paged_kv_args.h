// The paged KV cache as the append, decode and prefill launchers see it.
#ifndef ATTND_KERNELS_CUDA_COMMON_PAGED_KV_ARGS_H_
#define ATTND_KERNELS_CUDA_COMMON_PAGED_KV_ARGS_H_

#include <cstdint>

#include "kernels/paged_kv.h"

namespace attnd::kernels::cuda {

// One layer of a device's KV pool (layout of KvCacheShape: [layers][pages][2][page block]).
struct PagedKv {
  void* pool = nullptr;  // base of the whole pool, 16-byte aligned
  KvCacheShape shape;    // dtype fp16 or bf16, storage either; head_dim 64, 128 or 256
  int64_t layer = 0;
  // When set (append and decode), the layer is read from this device int when the kernel runs
  // and `layer` is ignored: one captured CUDA graph then serves every layer.
  const int32_t* layer_in_device = nullptr;
  // fp8 pools (shape.storage kFp8E4M3): device float [num_layers][2], each layer's K and V
  // dequantization scale, read when the kernel runs (so a graph sees scales set after capture).
  const float* scales = nullptr;
};

}  // namespace attnd::kernels::cuda

#endif  // ATTND_KERNELS_CUDA_COMMON_PAGED_KV_ARGS_H_
