#include "server/cuda/kv_staging.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace attnd {

absl::StatusOr<std::unique_ptr<KvStaging>> KvStaging::Create(
    const kernels::KvCacheShape& pool_shape, absl::Span<const kernels::KvScales> initial,
    cudaStream_t stream) {
  std::unique_ptr<KvStaging> s(new KvStaging(pool_shape, stream));
  s->host_scales_.assign(static_cast<size_t>(pool_shape.num_layers), kernels::KvScales{});
  std::copy_n(initial.begin(), std::min(initial.size(), s->host_scales_.size()),
              s->host_scales_.begin());
  auto scales = AllocateDevice(std::max<size_t>(s->host_scales_.size(), 1) * 8, "KV scales");
  if (!scales.ok()) return scales.status();
  s->scales_ = *std::move(scales);
  if (absl::Status st = s->SetScales(0, s->host_scales_); !st.ok()) return st;
  return s;
}

absl::Status KvStaging::SetScales(int64_t layer_begin,
                                  absl::Span<const kernels::KvScales> scales) {
  if (layer_begin < 0 || layer_begin + static_cast<int64_t>(scales.size()) > shape_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer_begin: layers [", layer_begin, ", ",
                                                   layer_begin + scales.size(),
                                                   ") are not all in the pool's ",
                                                   shape_.num_layers));
  }
  std::copy(scales.begin(), scales.end(), host_scales_.begin() + layer_begin);
  static_assert(sizeof(kernels::KvScales) == 8, "device scales are [layers][2] floats");
  // From pageable memory: staged before the call returns, so host_scales_ may change after.
  ATTND_CUDA_RETURN(cudaMemcpyAsync(static_cast<kernels::KvScales*>(scales_.get()) + layer_begin,
                                    host_scales_.data() + layer_begin,
                                    scales.size() * sizeof(kernels::KvScales),
                                    cudaMemcpyHostToDevice, stream_),
                    "upload KV scales");
  return absl::OkStatus();
}

// Grows by doubling; the old buffers are freed once the stream's work on them is done.
absl::Status KvStaging::GrowStage(int64_t num_pages) {
  if (num_pages <= stage_pages_) return absl::OkStatus();
  const int64_t pages = std::max(num_pages, 2 * stage_pages_);
  ATTND_CUDA_RETURN(cudaStreamSynchronize(stream_), "fp8 staging: wait before growing");
  stage_.reset();
  identity_.reset();
  stage_pages_ = 0;
  const size_t bytes = static_cast<size_t>(pages * shape_.PageElems()) *
                       kernels::DTypeSize(shape_.dtype);
  auto stage = AllocateDevice(bytes, "fp8 prefill staging pool");
  if (!stage.ok()) return stage.status();
  auto identity = AllocateDevice(static_cast<size_t>(pages) * 4, "fp8 staging page ids");
  if (!identity.ok()) return identity.status();
  std::vector<int32_t> ids(static_cast<size_t>(pages));
  std::iota(ids.begin(), ids.end(), 0);
  ATTND_CUDA_RETURN(cudaMemcpy(identity->get(), ids.data(), ids.size() * 4,
                               cudaMemcpyHostToDevice),
                    "fp8 staging page ids");
  stage_ = *std::move(stage);
  identity_ = *std::move(identity);
  stage_pages_ = pages;
  return absl::OkStatus();
}

absl::StatusOr<kernels::cuda::PagedKv> KvStaging::StagePages(const kernels::cuda::PagedKv& kv,
                                                             const int32_t* pages,
                                                             int64_t num_pages) {
  if (absl::Status s = GrowStage(std::max<int64_t>(num_pages, 1)); !s.ok()) return s;
  kernels::cuda::DequantizePagesArgs a;
  a.kv = kv;
  a.kv.scales = device_scales();
  a.pages = pages;
  a.num_pages = num_pages;
  a.dst = stage_.get();
  if (absl::Status s = kernels::cuda::LaunchDequantizePages(a, stream_); !s.ok()) return s;
  kernels::cuda::PagedKv staged;
  staged.pool = stage_.get();
  staged.shape = shape_;
  staged.shape.num_layers = 1;
  staged.shape.num_pages = stage_pages_;
  staged.shape.storage = kernels::KvStorage::kModelDType;
  staged.layer = 0;
  return staged;
}

absl::StatusOr<void*> KvStaging::Scratch(size_t bytes) {
  if (bytes > scratch_bytes_) {
    ATTND_CUDA_RETURN(cudaStreamSynchronize(stream_), "fp8 scratch: wait before growing");
    scratch_.reset();
    scratch_bytes_ = 0;
    auto scratch = AllocateDevice(bytes, "fp8 transfer scratch");
    if (!scratch.ok()) return scratch.status();
    scratch_ = *std::move(scratch);
    scratch_bytes_ = bytes;
  }
  return scratch_.get();
}

}  // namespace attnd
