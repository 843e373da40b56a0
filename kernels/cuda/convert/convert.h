// Conversions of an fp8 e4m3 pool's K/V to and from the model dtype: a gather of pages into a
// model-dtype staging pool (what prefill reads on an fp8 pool), and dense element-wise
// conversion (what KV export and import go through).
#ifndef ATTND_KERNELS_CUDA_CONVERT_CONVERT_H_
#define ATTND_KERNELS_CUDA_CONVERT_CONVERT_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/common/paged_kv_args.h"

namespace attnd::kernels::cuda {

// Page pages[i] of layer kv.layer of an fp8 pool, dequantized into page i of `dst`
// ([num_pages][2][page block] of kv.shape.dtype, the pool's page layout): dst =
// dtype(scale * fp8), the scale the layer's K or V scale, or (kFp8E4M3PerToken) the row's own.
struct DequantizePagesArgs {
  PagedKv kv;                      // fp8 storage (per-layer: scales set); layer_in_device unused
  const int32_t* pages = nullptr;  // device [num_pages]
  int64_t num_pages = 0;
  void* dst = nullptr;             // 16-byte aligned
};
absl::Status LaunchDequantizePages(const DequantizePagesArgs& args, cudaStream_t stream);

// n elements (a multiple of 8) from `src` to `dst`, one side fp8 e4m3 and the other `dtype`
// (fp16 or bf16): to fp8, dst = fp8(src / scale) (saturating); from fp8, dst = scale * src.
// With row_scales, n is [tokens][heads][head_dim] and each (token, head) row has its own scale
// at row_scales[head * tokens + token]: read from fp8; to fp8, computed from the row as append
// does (max |x| / 448) and written there.
struct ConvertKvArgs {
  const void* src = nullptr;  // device memory, 16-byte aligned
  void* dst = nullptr;        // device memory, 16-byte aligned
  int64_t n = 0;
  DType dtype = DType::kBFloat16;
  bool to_fp8 = false;
  float scale = 1.0f;
  float* row_scales = nullptr;  // device memory
  int64_t head_dim = 0, heads = 0, tokens = 0;
};
absl::Status LaunchConvertKv(const ConvertKvArgs& args, cudaStream_t stream);

}  // namespace attnd::kernels::cuda

#endif  // ATTND_KERNELS_CUDA_CONVERT_CONVERT_H_
