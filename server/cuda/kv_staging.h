// What an fp8 pool needs besides its pages: the per-layer scales on the device, a model-dtype
// staging pool that prefill reads (the prefill kernels take 16-bit K/V), and the scratch that
// KV export and import convert through. One per CUDA backend, used from its worker only.
#ifndef ATTND_SERVER_CUDA_KV_STAGING_H_
#define ATTND_SERVER_CUDA_KV_STAGING_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/paged_kv.h"
#include "server/cuda/cuda_check.h"

namespace attnd {

class KvStaging {
 public:
  // `initial` holds the scales layers start with (missing layers: 1 and 1). The scales live in
  // device memory, [layers][2], so that kernels and captured graphs read the current ones.
  static absl::StatusOr<std::unique_ptr<KvStaging>> Create(
      const kernels::KvCacheShape& pool_shape, absl::Span<const kernels::KvScales> initial,
      cudaStream_t stream);

  const float* device_scales() const { return static_cast<const float*>(scales_.get()); }
  kernels::KvScales scales(int64_t layer) const { return host_scales_[layer]; }
  // Ordered on `stream` with the kernels around it.
  absl::Status SetScales(int64_t layer_begin, absl::Span<const kernels::KvScales> scales);

  // Pages pages[0, num_pages) (device ints) of layer kv.layer, dequantized into a staging pool
  // of one layer whose page i holds pages[i]; returns that pool (its page ids are identity()).
  absl::StatusOr<kernels::cuda::PagedKv> StagePages(const kernels::cuda::PagedKv& kv,
                                                    const int32_t* pages, int64_t num_pages);
  const int32_t* identity() const { return static_cast<const int32_t*>(identity_.get()); }

  // Device scratch of at least `bytes`, valid until the next call.
  absl::StatusOr<void*> Scratch(size_t bytes);

 private:
  KvStaging(const kernels::KvCacheShape& shape, cudaStream_t stream)
      : shape_(shape), stream_(stream) {}
  absl::Status GrowStage(int64_t num_pages);

  // Constant after construction.
  const kernels::KvCacheShape shape_;
  const cudaStream_t stream_;
  DeviceBuffer scales_;

  // Guarded by the backend's worker (one call at a time).
  std::vector<kernels::KvScales> host_scales_;
  DeviceBuffer stage_, identity_, scratch_;
  int64_t stage_pages_ = 0;
  size_t scratch_bytes_ = 0;
};

}  // namespace attnd

#endif  // ATTND_SERVER_CUDA_KV_STAGING_H_
