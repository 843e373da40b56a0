// Batch prefill over a paged KV cache: ragged queries, causal, mixed prefill and decode items
// from a host plan (kernels/prefill_plan.h).
#ifndef ATTND_KERNELS_CUDA_PREFILL_PREFILL_H_
#define ATTND_KERNELS_CUDA_PREFILL_PREFILL_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/common/paged_kv_args.h"
#include "kernels/paged_kv.h"
#include "kernels/prefill_plan.h"

namespace attnd::kernels::cuda {

// Ragged queries: request b's q_len = qo_indptr[b+1] - qo_indptr[b] queries are rows
// [qo_indptr[b], qo_indptr[b+1]) of q [total_q][qo_heads][head_dim] (strides in elements,
// multiples of 8), the last q_len of its kv_len positions (their K/V appended first), attending
// causally (and within opts.window_left) over the request's pages: kv_indices[kv_indptr[b] ...],
// CSR as in decode. Items with q_len 1 (decodes) and long chunks mix freely in one launch.
// The work comes from a plan (kernels/prefill_plan.h) made on the host from host copies of
// qo_indptr, kv_len and kv_indptr and copied to `ws.plan` before the launch (graph-safe: the
// grid is kv_heads x ws.grid_y whatever the plan). PrefillPlanConfig::causal and window_left
// must equal `causal` and opts.window_left. Cut tiles write fp32 partials (ws.partial_out:
// layout.max_partials * kv_heads * 128 * head_dim floats, ws.partial_lse: layout.max_partials *
// kv_heads * 128; PrefillWorkspaceFor in kernels/prefill_plan.h) merged in key order by a second
// kernel launched as a programmatic dependent; with a deterministic plan the output is bitwise
// independent of the rest of the batch.
// lse (optional, [total_q][qo_heads] fp32): natural log of the softmax denominator.
struct PrefillWorkspace {
  const int32_t* plan = nullptr;  // PrefillPlanLayout::TotalInts() ints, on the device
  PrefillPlanLayout layout;
  int grid_y = 0;  // CTA columns (1 to 65535): the plan's num_items for one CTA per item, or a
                   // fixed number (e.g. layout.max_items) under a graph; columns loop over items
  float* partial_out = nullptr;
  float* partial_lse = nullptr;
  // 2 ints (PrefillWorkspaceSizes::counter_bytes), zero before the first launch; every launch
  // leaves them zero. Given, the Hopper kernel runs a persistent grid (a CTA per resident slot)
  // whose CTAs take (item, kv head) units in plan order from them (measured on an H200: prompts
  // 0.6-3.5% faster, head_dim 64 most); null, a CTA per unit. The portable kernel ignores them.
  int* work_counters = nullptr;
};

// Which prefill kernel runs. kAuto: the Hopper kernel (wgmma, sm_90a) where the device and the
// build have it and head_dim <= 128, else the portable one (mma.sync m16n8k16, any sm_80+).
enum class PrefillKernel { kAuto, kPortable, kHopper };

struct PrefillArgs {
  PagedKv kv;
  AttentionOptions opts;
  bool causal = true;  // false: every query sees all of its request's keys (benchmarks)
  const void* q = nullptr;
  int64_t q_stride_n = 0, q_stride_h = 0;
  void* out = nullptr;
  int64_t out_stride_n = 0, out_stride_h = 0;
  float* lse = nullptr;
  const int32_t* kv_indices = nullptr;
  PrefillWorkspace ws;
  // false when the host knows the plan has no merges (plan[1] == 0): skips the merge launch.
  bool may_merge = true;
  PrefillKernel kernel = PrefillKernel::kAuto;  // kHopper where unavailable: an error
  // false when the host knows every request is narrow (num_new * group <= kPrefillDecodeRows,
  // e.g. deterministic one-token Prefill calls): the Hopper kernel then runs without the
  // ping-pong of its wide tiles, whose code costs narrow items 1-3%. Either is correct.
  bool wide_items = true;
};

// InvalidArgumentError naming the argument and its limit for arguments the kernels cannot take
// (checked before anything is launched); UnimplementedError or FailedPreconditionError saying
// why when kHopper is asked for where the Hopper kernel is absent; InternalError for a failed
// launch.
absl::Status LaunchBatchPrefill(const PrefillArgs& args, cudaStream_t stream);

// Planner config for a device and model (SM count, the prefill kernel's occupancy); set
// deterministic / fixed_chunk_tokens afterwards as wanted. Errors as LaunchBatchPrefill's.
absl::StatusOr<PrefillPlanConfig> MakePrefillPlanConfig(
    int device, DType dtype, int64_t head_dim, int64_t num_qo_heads, int64_t num_kv_heads,
    int64_t window_left, bool causal, PrefillKernel kernel = PrefillKernel::kAuto);

// Whether `device` runs the Hopper prefill kernel for head_dim (kAuto's choice).
bool HopperPrefillAvailable(int device, int64_t head_dim);

}  // namespace attnd::kernels::cuda

#endif  // ATTND_KERNELS_CUDA_PREFILL_PREFILL_H_
