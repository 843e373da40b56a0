// Launcher of the append kernel: checks the arguments and launches.
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/append/append.h"
#include "kernels/cuda/append/append_kernel.cuh"
#include "kernels/cuda/append/append_params.cuh"
#include "kernels/cuda/common/host_utils.h"
#include "kernels/cuda/common/launch.h"

namespace attnd::kernels::cuda {
namespace {

constexpr char kFamily[] = "append";

absl::Status ValidateAppendArgs(const AppendArgs& a) {
  using detail::InvalidArg;
  const KvCacheShape& sh = a.kv.shape;
  const int64_t d = sh.head_dim, h = sh.num_kv_heads;
  if (a.num_tokens < 0) return InvalidArg(kFamily, "num_tokens ", a.num_tokens, " is negative");
  if (h <= 0) return InvalidArg(kFamily, "kv.shape.num_kv_heads ", h, " is not positive");
  if (sh.page_size <= 0) {
    return InvalidArg(kFamily, "kv.shape.page_size ", sh.page_size, " is not positive");
  }
  if (DTypeSize(sh.dtype) != 2) return InvalidArg(kFamily, "kv.shape.dtype is not fp16 or bf16");
  if (sh.storage == KvStorage::kFp8E4M3 && a.kv.scales == nullptr)
    return InvalidArg(kFamily, "kv.scales is null (fp8 pool with per-layer scales)");
  if (d != 64 && d != 128 && d != 256) {
    return InvalidArg(kFamily, "kv.shape.head_dim ", d, " is not 64, 128 or 256");
  }
  if (a.slot_mapping == nullptr) return InvalidArg(kFamily, "slot_mapping is null");
  if (a.k == nullptr) return InvalidArg(kFamily, "k is null");
  if (a.v == nullptr) return InvalidArg(kFamily, "v is null");
  if (a.kv.pool == nullptr) return InvalidArg(kFamily, "kv.pool is null");
  if (a.k_token_stride < h * d) {
    return InvalidArg(kFamily, "k_token_stride ", a.k_token_stride,
                      " is less than kv_heads * head_dim ", h * d);
  }
  if (a.v_token_stride < h * d) {
    return InvalidArg(kFamily, "v_token_stride ", a.v_token_stride,
                      " is less than kv_heads * head_dim ", h * d);
  }
  if (a.num_tokens * h >= (int64_t{1} << 31)) {
    return InvalidArg(kFamily, "num_tokens * kv_heads ", a.num_tokens * h,
                      " is not below 2^31");
  }
  if (sh.num_pages * sh.page_size >= (int64_t{1} << 31)) {
    return InvalidArg(kFamily, "kv.shape.num_pages * page_size ", sh.num_pages * sh.page_size,
                      " is not below 2^31");
  }
  if (!detail::Aligned16(a.k)) return InvalidArg(kFamily, "k is not 16-byte aligned");
  if (!detail::Aligned16(a.v)) return InvalidArg(kFamily, "v is not 16-byte aligned");
  if (!detail::Aligned16(a.kv.pool)) return InvalidArg(kFamily, "kv.pool is not 16-byte aligned");
  if (a.k_token_stride % 8) {
    return InvalidArg(kFamily, "k_token_stride ", a.k_token_stride, " is not a multiple of 8");
  }
  if (a.v_token_stride % 8) {
    return InvalidArg(kFamily, "v_token_stride ", a.v_token_stride, " is not a multiple of 8");
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchAppendKv(const AppendArgs& a, cudaStream_t stream) {
  if (absl::Status s = ValidateAppendArgs(a); !s.ok()) return s;
  if (a.num_tokens == 0) return absl::OkStatus();
  const KvCacheShape& sh = a.kv.shape;
  const int64_t d = sh.head_dim, h = sh.num_kv_heads;
  detail::AppendParams p{};
  p.layer_ptr = a.kv.layer_in_device;
  p.layer_elems = sh.LayerElems();
  p.kv_layer = static_cast<char*>(a.kv.pool) +
               (p.layer_ptr != nullptr ? 0 : a.kv.layer * sh.LayerElems() * sh.ElemBytes());
  p.page_stride = sh.PageElems();
  p.v_offset = sh.BlockElems();
  p.slot_stride = sh.SlotStride();
  p.head_stride = sh.HeadStride();
  p.page_div = detail::MakeFastDivmod(static_cast<uint32_t>(sh.page_size));
  p.heads_div = detail::MakeFastDivmod(static_cast<uint32_t>(h));
  p.k = static_cast<const uint16_t*>(a.k);
  p.v = static_cast<const uint16_t*>(a.v);
  p.k_ts = a.k_token_stride;
  p.v_ts = a.v_token_stride;
  p.slot_mapping = a.slot_mapping;
  p.num_rows = a.num_tokens * h;
  p.chunks_log2 = d == 64 ? 3 : d == 128 ? 4 : 5;
  p.head_dim = static_cast<int>(d);
  p.layer = static_cast<int>(a.kv.layer);
  p.scales = a.kv.scales;
  if (sh.TokenScales()) {
    p.token_scales =
        reinterpret_cast<float*>(static_cast<char*>(a.kv.pool) + sh.ScalesByteOffset());
    p.layer_scales = sh.LayerScales();
    p.page_scales = sh.PageScales();
    p.page_size = static_cast<int>(sh.page_size);
    p.scale_v_offset = static_cast<int>(h * sh.page_size);
  }
  const int64_t threads =
      ((p.num_rows + detail::kRowsPerThread - 1) / detail::kRowsPerThread) << p.chunks_log2;
  const int64_t blocks = (threads + detail::kAppendThreads - 1) / detail::kAppendThreads;
  const unsigned grid = static_cast<unsigned>(blocks);
  constexpr unsigned kThreads = detail::kAppendThreads;
  using detail::AppendKvKernel;
  using detail::Fp8TokenScaledKv;
  const bool bf16 = sh.dtype == DType::kBFloat16;
  if (sh.storage == KvStorage::kModelDType) {  // bytes move as they are: one instance
    AppendKvKernel<__half, __half><<<grid, kThreads, 0, stream>>>(p);
  } else if (sh.storage == KvStorage::kFp8E4M3) {
    if (bf16) AppendKvKernel<__nv_bfloat16, __nv_fp8_e4m3><<<grid, kThreads, 0, stream>>>(p);
    else AppendKvKernel<__half, __nv_fp8_e4m3><<<grid, kThreads, 0, stream>>>(p);
  } else {
    if (bf16) AppendKvKernel<__nv_bfloat16, Fp8TokenScaledKv><<<grid, kThreads, 0, stream>>>(p);
    else AppendKvKernel<__half, Fp8TokenScaledKv><<<grid, kThreads, 0, stream>>>(p);
  }
  return detail::CudaStatus(cudaGetLastError(), "append kernel launch");
}

}  // namespace attnd::kernels::cuda
