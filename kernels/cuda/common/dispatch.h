// The one list of (dtype, head_dim) pairs every kernel family is instantiated for.
#ifndef ATTND_KERNELS_CUDA_COMMON_DISPATCH_H_
#define ATTND_KERNELS_CUDA_COMMON_DISPATCH_H_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "kernels/cuda/common/device_utils.cuh"
#include "kernels/paged_kv.h"

namespace attnd::kernels::cuda::detail {

inline const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return "fp16";
    case DType::kBFloat16: return "bf16";
    case DType::kFloat32: return "fp32";
    case DType::kFloat8E4M3: return "fp8_e4m3";
  }
  return "unknown";
}

// Returns F<T, D>::Run(args...) (an absl::Status) for a model's dtype and head_dim;
// InvalidArgumentError naming `family` for a pair with no kernel.
template <template <typename, int> class F, typename... Args>
absl::Status DispatchDTypeHeadDim(absl::string_view family, DType dtype, int64_t head_dim,
                                  Args&&... args) {
  if (dtype == DType::kBFloat16) {
    switch (head_dim) {
      case 64: return F<__nv_bfloat16, 64>::Run(args...);
      case 128: return F<__nv_bfloat16, 128>::Run(args...);
      case 256: return F<__nv_bfloat16, 256>::Run(args...);
    }
  } else if (dtype == DType::kFloat16) {
    switch (head_dim) {
      case 64: return F<__half, 64>::Run(args...);
      case 128: return F<__half, 128>::Run(args...);
      case 256: return F<__half, 256>::Run(args...);
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(family, ": no kernel for dtype ",
                                                 DTypeName(dtype), " and head_dim ", head_dim,
                                                 " (fp16 or bf16; head_dim 64, 128 or 256)"));
}

// Returns F<T, KV, D>::Run(args...) for a pool's model dtype T, storage KV (T itself,
// __nv_fp8_e4m3, or Fp8TokenScaledKv) and head_dim.
template <template <typename, typename, int> class F>
struct WithKvStorage {
  template <typename T, int D>
  struct Model {
    template <typename Arg0, typename... Args>
    static absl::Status Run(KvStorage storage, Arg0&& arg0, Args&&... args) {
      if (storage == KvStorage::kFp8E4M3) return F<T, __nv_fp8_e4m3, D>::Run(arg0, args...);
      if (storage == KvStorage::kFp8E4M3PerToken)
        return F<T, Fp8TokenScaledKv, D>::Run(arg0, args...);
      return F<T, T, D>::Run(arg0, args...);
    }
  };
};

template <template <typename, typename, int> class F, typename... Args>
absl::Status DispatchKvHeadDim(absl::string_view family, const KvCacheShape& shape,
                               Args&&... args) {
  return DispatchDTypeHeadDim<WithKvStorage<F>::template Model>(family, shape.dtype,
                                                                shape.head_dim, shape.storage,
                                                                args...);
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_COMMON_DISPATCH_H_
