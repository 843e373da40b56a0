// The fixed device memory one device's attention launches work in, made once at start-up: the
// planners' configs and layouts for this device and model, and buffers sized by the kernels'
// own workspace planners (DecodeWorkspaceFor, PrefillWorkspaceFor) within --cuda_workspace_mb.
// A batch the layouts cannot hold is refused when it is planned, never faulted.
#ifndef ATTND_SERVER_CUDA_WORKSPACES_H_
#define ATTND_SERVER_CUDA_WORKSPACES_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/decode_plan.h"
#include "kernels/paged_kv.h"
#include "kernels/prefill_plan.h"
#include "server/config/config.h"
#include "server/cuda/cuda_check.h"

namespace attnd {

class Workspaces {
 public:
  // On a thread bound to `device`. Zeroes the merge counters on `stream`; the caller
  // synchronizes it before the first launch.
  static absl::StatusOr<std::unique_ptr<Workspaces>> Create(const ServerConfig& config,
                                                            int device, cudaStream_t stream);
  Workspaces(const Workspaces&) = delete;
  Workspaces& operator=(const Workspaces&) = delete;

  const kernels::DecodePlanConfig& decode_config(bool deterministic) const {
    return decode_config_[deterministic ? 1 : 0];
  }
  const kernels::PrefillPlanConfig& prefill_config(bool deterministic) const {
    return prefill_config_[deterministic ? 1 : 0];
  }
  const kernels::DecodePlanLayout& decode_layout() const { return decode_layout_; }
  const kernels::PrefillPlanLayout& prefill_layout() const { return prefill_layout_; }
  // Ints of the largest plan (decode or prefill): the size of a host staging buffer.
  int64_t plan_ints() const { return plan_ints_; }
  int64_t max_pages_per_seq() const { return max_pages_per_seq_; }
  // Device memory held, for the start-up log.
  size_t bytes() const { return bytes_; }

  int32_t* plan() const { return static_cast<int32_t*>(plan_.get()); }
  int32_t* indices() const { return static_cast<int32_t*>(indices_.get()); }
  int64_t* slots() const { return static_cast<int64_t*>(slots_.get()); }

  // A decode launch over q/out rows [batch][qo_heads][head_dim] with the page table at
  // indices() and the plan at plan(). Eager launches and every captured graph take their
  // arguments from here, so both compute the same bits.
  kernels::cuda::DecodeArgs DecodeArgs(const kernels::cuda::PagedKv& kv,
                                       const kernels::AttentionOptions& options, int batch,
                                       bool deterministic, const void* q, void* out,
                                       float* lse) const;
  // A causal prefill launch over ragged q/out rows [total][qo_heads][head_dim] with a plan of
  // num_items items and num_merges merges at plan().
  kernels::cuda::PrefillArgs PrefillArgs(const kernels::cuda::PagedKv& kv,
                                         const kernels::AttentionOptions& options,
                                         const void* q, void* out, float* lse, int64_t num_items,
                                         int64_t num_merges) const;

 private:
  Workspaces() = default;
  absl::Status MakeConfigs(const ServerConfig& config, int device);
  absl::Status Allocate(const ServerConfig& config, cudaStream_t stream);

  // Constant after construction.
  kernels::DecodePlanConfig decode_config_[2];    // [deterministic]
  kernels::PrefillPlanConfig prefill_config_[2];  // [deterministic]
  kernels::DecodePlanLayout decode_layout_;
  kernels::PrefillPlanLayout prefill_layout_;
  int64_t plan_ints_ = 0;
  int64_t max_pages_per_seq_ = 0;
  size_t bytes_ = 0;
  DeviceBuffer plan_, indices_, slots_, counters_;
  DeviceBuffer decode_partial_out_, decode_partial_lse_;
  DeviceBuffer prefill_partial_out_, prefill_partial_lse_, prefill_counters_;
};

}  // namespace attnd

#endif  // ATTND_SERVER_CUDA_WORKSPACES_H_
