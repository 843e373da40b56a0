// Launchers of the fp8 conversions: check the arguments, dispatch on the model dtype.
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/common/host_utils.h"
#include "kernels/cuda/common/launch.h"
#include "kernels/cuda/convert/convert.h"
#include "kernels/cuda/convert/convert_kernel.cuh"

namespace attnd::kernels::cuda {
namespace {

constexpr char kFamily[] = "convert";

unsigned Blocks(int64_t threads) {
  return static_cast<unsigned>((threads + detail::kConvertThreads - 1) / detail::kConvertThreads);
}

absl::Status CheckModelDType(DType dtype, const char* name) {
  if (dtype == DType::kBFloat16 || dtype == DType::kFloat16) return absl::OkStatus();
  return detail::InvalidArg(kFamily, name, " is not fp16 or bf16");
}

}  // namespace

absl::Status LaunchDequantizePages(const DequantizePagesArgs& a, cudaStream_t stream) {
  using detail::InvalidArg;
  const KvCacheShape& sh = a.kv.shape;
  if (!sh.Fp8()) return InvalidArg(kFamily, "kv.shape.storage is not fp8");
  if (absl::Status s = CheckModelDType(sh.dtype, "kv.shape.dtype"); !s.ok()) return s;
  if (a.kv.pool == nullptr || a.pages == nullptr || a.dst == nullptr)
    return InvalidArg(kFamily, "kv.pool, pages and dst must be set");
  if (!sh.TokenScales() && a.kv.scales == nullptr)
    return InvalidArg(kFamily, "kv.scales is null (fp8 pool with per-layer scales)");
  if (a.kv.layer < 0 || a.kv.layer >= sh.num_layers)
    return InvalidArg(kFamily, "kv.layer ", a.kv.layer, " is outside the pool's layers");
  if (sh.BlockElems() % 16 != 0)
    return InvalidArg(kFamily, "kv.shape's page block of ", sh.BlockElems(),
                      " elements is not a multiple of 16");
  if (!detail::Aligned16(a.kv.pool) || !detail::Aligned16(a.dst))
    return InvalidArg(kFamily, "kv.pool and dst must be 16-byte aligned");
  if (a.num_pages < 0) return InvalidArg(kFamily, "num_pages ", a.num_pages, " is negative");
  if (a.num_pages == 0) return absl::OkStatus();
  detail::DequantizePagesParams p{};
  p.src_layer = static_cast<const uint8_t*>(a.kv.pool) + a.kv.layer * sh.LayerElems();
  p.pages = a.pages;
  p.num_pages = a.num_pages;
  p.page_elems = sh.PageElems();
  p.block_elems = sh.BlockElems();
  p.scales = a.kv.scales;
  p.layer = static_cast<int>(a.kv.layer);
  p.dst = a.dst;
  if (sh.TokenScales()) {
    p.token_scales = reinterpret_cast<const float*>(static_cast<const char*>(a.kv.pool) +
                                                    sh.ScalesByteOffset()) +
                     a.kv.layer * sh.LayerScales();
    p.page_scales = sh.PageScales();
    p.heads = static_cast<int>(sh.num_kv_heads);
    p.page_size = static_cast<int>(sh.page_size);
    p.head_dim = static_cast<int>(sh.head_dim);
    p.hnd = sh.layout == KvLayout::kHND;
  }
  const unsigned grid = Blocks(a.num_pages * sh.PageElems() / 16);
  if (sh.dtype == DType::kBFloat16) {
    detail::DequantizePagesKernel<__nv_bfloat16><<<grid, detail::kConvertThreads, 0, stream>>>(p);
  } else {
    detail::DequantizePagesKernel<__half><<<grid, detail::kConvertThreads, 0, stream>>>(p);
  }
  return detail::CudaStatus(cudaGetLastError(), "dequantize pages launch");
}

absl::Status LaunchConvertKv(const ConvertKvArgs& a, cudaStream_t stream) {
  using detail::InvalidArg;
  if (absl::Status s = CheckModelDType(a.dtype, "dtype"); !s.ok()) return s;
  if (a.src == nullptr || a.dst == nullptr) return InvalidArg(kFamily, "src and dst must be set");
  if (!detail::Aligned16(a.src) || !detail::Aligned16(a.dst))
    return InvalidArg(kFamily, "src and dst must be 16-byte aligned");
  if (a.n < 0 || a.n % 8 != 0) return InvalidArg(kFamily, "n ", a.n, " is not a multiple of 8");
  if (!(a.scale > 0.0f)) return InvalidArg(kFamily, "scale ", a.scale, " is not positive");
  if (a.row_scales != nullptr) {
    if (a.head_dim != 64 && a.head_dim != 128 && a.head_dim != 256)
      return InvalidArg(kFamily, "head_dim ", a.head_dim, " is not 64, 128 or 256");
    if (a.heads <= 0 || a.tokens < 0 || a.n != a.tokens * a.heads * a.head_dim)
      return InvalidArg(kFamily, "n ", a.n, " is not tokens ", a.tokens, " * heads ", a.heads,
                        " * head_dim ", a.head_dim);
  }
  if (a.n == 0) return absl::OkStatus();
  const detail::ConvertKvParams p{a.src,      a.dst,
                                  a.n,        a.scale,
                                  a.row_scales, static_cast<int>(a.head_dim),
                                  static_cast<int>(a.heads), a.tokens};
  const bool bf16 = a.dtype == DType::kBFloat16;
  if (a.to_fp8) {
    const unsigned grid = Blocks(a.n / 8);
    if (bf16) {
      detail::ConvertKvKernel<__nv_bfloat16, true><<<grid, detail::kConvertThreads, 0, stream>>>(p);
    } else {
      detail::ConvertKvKernel<__half, true><<<grid, detail::kConvertThreads, 0, stream>>>(p);
    }
  } else {
    const unsigned grid = Blocks((a.n + 15) / 16);
    if (bf16) {
      detail::ConvertKvKernel<__nv_bfloat16, false><<<grid, detail::kConvertThreads, 0, stream>>>(p);
    } else {
      detail::ConvertKvKernel<__half, false><<<grid, detail::kConvertThreads, 0, stream>>>(p);
    }
  }
  return detail::CudaStatus(cudaGetLastError(), "convert KV launch");
}

}  // namespace attnd::kernels::cuda
