#include "server/cuda/workspaces.h"

#include <algorithm>

namespace attnd {

absl::StatusOr<std::unique_ptr<Workspaces>> Workspaces::Create(const ServerConfig& config,
                                                               int device, cudaStream_t stream) {
  std::unique_ptr<Workspaces> w(new Workspaces());
  if (absl::Status s = w->MakeConfigs(config, device); !s.ok()) return s;
  if (absl::Status s = w->Allocate(config, stream); !s.ok()) return s;
  return w;
}

absl::Status Workspaces::MakeConfigs(const ServerConfig& config, int device) {
  const ModelShape& m = config.model;
  auto decode = kernels::cuda::MakeDecodePlanConfig(device, m.CacheShape(0), m.num_qo_heads,
                                                    m.window_left);
  if (!decode.ok()) return Annotate(decode.status(), "decode plan config");
  decode_config_[0] = decode_config_[1] = *decode;
  decode_config_[1].deterministic = true;
  auto prefill = kernels::cuda::MakePrefillPlanConfig(device, m.dtype, m.head_dim,
                                                      m.num_qo_heads, m.num_kv_heads,
                                                      m.window_left, /*causal=*/true);
  if (!prefill.ok()) return Annotate(prefill.status(), "prefill plan config");
  prefill_config_[0] = prefill_config_[1] = *prefill;
  prefill_config_[1].deterministic = true;

  // Partial states are the workspaces that grow with context: a quarter of the budget for
  // decode, the rest for prefill. The layouts serve either mode.
  const int max_batch = static_cast<int>(config.max_batch_size);
  const int64_t budget = config.cuda_workspace_mb << 20;
  decode_layout_ = kernels::FitDecodePlanLayout(max_batch, config.max_seq_len, decode_config_[0],
                                                m.num_qo_heads, m.head_dim, budget / 4);
  prefill_layout_ = kernels::FitPrefillPlanLayout(
      max_batch, config.max_tokens_per_request, config.max_seq_len, prefill_config_[0],
      m.num_kv_heads, m.head_dim, budget * 3 / 4);
  max_pages_per_seq_ = (config.max_seq_len + m.page_size - 1) / m.page_size;
  return absl::OkStatus();
}

absl::Status Workspaces::Allocate(const ServerConfig& config, cudaStream_t stream) {
  const ModelShape& m = config.model;
  const kernels::DecodeWorkspaceSizes decode =
      kernels::DecodeWorkspaceFor(decode_layout_, decode_config_[0], m.num_qo_heads, m.head_dim);
  const kernels::PrefillWorkspaceSizes prefill =
      kernels::PrefillWorkspaceFor(prefill_layout_, m.num_kv_heads, m.head_dim);
  plan_ints_ = std::max(decode.plan_bytes, prefill.plan_bytes) / 4;
  const int64_t max_pages = config.max_batch_size * max_pages_per_seq_;
  struct Want {
    DeviceBuffer* dst;
    int64_t bytes;
    const char* what;
  };
  // One plan buffer serves both kernels: launches on the device's stream are ordered.
  const Want wants[] = {
      {&plan_, plan_ints_ * 4, "plans"},
      {&indices_, max_pages * 4, "page tables"},
      {&slots_, config.max_tokens_per_request * 8, "slot mappings"},
      {&counters_, decode.counter_bytes, "merge counters"},
      {&decode_partial_out_, decode.partial_out_bytes, "decode partial outputs"},
      {&decode_partial_lse_, decode.partial_lse_bytes, "decode partial lse"},
      {&prefill_partial_out_, prefill.partial_out_bytes, "prefill partial outputs"},
      {&prefill_partial_lse_, prefill.partial_lse_bytes, "prefill partial lse"},
      {&prefill_counters_, prefill.counter_bytes, "prefill work counters"},
  };
  for (const Want& want : wants) {
    auto buffer = AllocateDevice(static_cast<size_t>(want.bytes), want.what);
    if (!buffer.ok()) return buffer.status();
    *want.dst = *std::move(buffer);
    bytes_ += static_cast<size_t>(want.bytes);
  }
  // The decode kernel leaves the counters zeroed after every launch; they start zeroed.
  ATTND_CUDA_RETURN(cudaMemsetAsync(counters_.get(), 0, static_cast<size_t>(decode.counter_bytes),
                                    stream),
                    "zero merge counters");
  // So does the Hopper prefill kernel its work counters.
  ATTND_CUDA_RETURN(cudaMemsetAsync(prefill_counters_.get(), 0,
                                    static_cast<size_t>(prefill.counter_bytes), stream),
                    "zero prefill work counters");
  return absl::OkStatus();
}

kernels::cuda::DecodeArgs Workspaces::DecodeArgs(const kernels::cuda::PagedKv& kv,
                                                 const kernels::AttentionOptions& options,
                                                 int batch, bool deterministic, const void* q,
                                                 void* out, float* lse) const {
  const int64_t head_dim = kv.shape.head_dim;
  const int64_t row = options.num_qo_heads * head_dim;
  kernels::cuda::DecodeArgs a;
  a.kv = kv;
  a.opts = options;
  a.batch = batch;
  a.q = q;
  a.q_stride_b = row;
  a.q_stride_h = head_dim;
  a.out = out;
  a.out_stride_b = row;
  a.out_stride_h = head_dim;
  a.lse = lse;
  a.kv_indices = indices();
  a.ws.plan = plan();
  a.ws.layout = decode_layout_;
  a.ws.grid_x = kernels::DecodeGridX(batch, decode_config(deterministic));
  a.ws.partial_out = static_cast<float*>(decode_partial_out_.get());
  a.ws.partial_lse = static_cast<float*>(decode_partial_lse_.get());
  a.ws.counters = static_cast<int*>(counters_.get());
  a.ws.kv_head_blocks = decode_config(deterministic).kv_head_blocks;
  a.deterministic = deterministic;
  return a;
}

kernels::cuda::PrefillArgs Workspaces::PrefillArgs(const kernels::cuda::PagedKv& kv,
                                                   const kernels::AttentionOptions& options,
                                                   const void* q, void* out, float* lse,
                                                   int64_t num_items, int64_t num_merges) const {
  const int64_t head_dim = kv.shape.head_dim;
  const int64_t row = options.num_qo_heads * head_dim;
  kernels::cuda::PrefillArgs a;
  a.kv = kv;
  a.opts = options;
  a.causal = true;
  a.q = q;
  a.q_stride_n = row;
  a.q_stride_h = head_dim;
  a.out = out;
  a.out_stride_n = row;
  a.out_stride_h = head_dim;
  a.lse = lse;
  a.kv_indices = indices();
  a.ws.plan = plan();
  a.ws.layout = prefill_layout_;
  // One CTA column per item, within the grid's limit (columns loop over the rest).
  a.ws.grid_y = static_cast<int>(std::min<int64_t>(std::max<int64_t>(num_items, 1), 65535));
  a.ws.partial_out = static_cast<float*>(prefill_partial_out_.get());
  a.ws.partial_lse = static_cast<float*>(prefill_partial_lse_.get());
  a.ws.work_counters = static_cast<int*>(prefill_counters_.get());
  a.may_merge = num_merges > 0;
  return a;
}

}  // namespace attnd
