// Batch decode over a paged KV cache: split-KV work items from a host plan
// (kernels/decode_plan.h), merged in item order.
#ifndef ATTND_KERNELS_CUDA_DECODE_DECODE_H_
#define ATTND_KERNELS_CUDA_DECODE_DECODE_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/common/paged_kv_args.h"
#include "kernels/decode_plan.h"
#include "kernels/paged_kv.h"

namespace attnd::kernels::cuda {

// One query token per request: q [batch][qo_heads][head_dim] (strides in elements, 16-byte
// aligned rows), over the request's kv_len[b] keys, the query being the last of them (position
// kv_len[b] - 1, so the step's own K/V must be appended first). Page table, CSR: the pages of
// request b, in order, are kv_indices[kv_indptr[b] ...], each holding page_size positions.
// kv_len[b] == 0 (a padded entry) yields a zero output row and lse = -inf. lse (optional,
// [batch][qo_heads] fp32) is the natural log of the softmax denominator.
//
// The lengths and page-table offsets reach the kernel through the plan (kernels/decode_plan.h),
// which the host computes from its copies of kv_len and kv_indptr and copies into `plan` before
// the launch (under a graph: into the same buffer before each replay); the kernel reads
// kv_indices, the plan and q from device memory and nothing else of the batch. The sliding
// window is applied by the planner (DecodePlanConfig::window_left must equal
// opts.window_left): the plan only covers visible keys.
// partial_out / partial_lse hold layout.max_items * qo_heads * head_dim and
// layout.max_items * qo_heads floats. A request split into several items is merged, in item
// order: by default by the CTA that finishes its last item (one launch); `counters`
// (layout.max_batch * cfg.kv_head_blocks ints) must be zeroed once when allocated, and every
// launch leaves them zeroed. With `deterministic` (which must match the plan's config) a second
// kernel, launched as a programmatic dependent, does the merges instead: with many items per
// CTA that is cheaper than fusing (fused, measured on an H200 with bf16: from 1% faster to 5%
// slower at B16-B256, 23% slower at B32 L32768). Both give the same bits for a given plan
// whatever the rest of the batch. Launches that share a workspace must be ordered (one stream).
// DecodeWorkspaceFor (kernels/decode_plan.h) gives the bytes of each buffer.
struct DecodeWorkspace {
  const int32_t* plan = nullptr;  // DecodePlanLayout::TotalInts() ints, on the device
  DecodePlanLayout layout;
  int grid_x = 0;                 // DecodeGridX(batch bucket, config) the plan was made for
  float* partial_out = nullptr;
  float* partial_lse = nullptr;
  int* counters = nullptr;
  int kv_head_blocks = 0;  // DecodePlanConfig::kv_head_blocks of the config (checked)
};

struct DecodeArgs {
  PagedKv kv;
  AttentionOptions opts;  // num_qo_heads a multiple of kv heads; sm_scale; soft cap; window
  int batch = 0;  // requests, padded entries included (the bucket size under a graph); the
                  // plan must have been made for exactly this many entries
  const void* q = nullptr;
  int64_t q_stride_b = 0, q_stride_h = 0;
  void* out = nullptr;
  int64_t out_stride_b = 0, out_stride_h = 0;
  float* lse = nullptr;
  const int32_t* kv_indices = nullptr;
  DecodeWorkspace ws;
  bool deterministic = false;  // the plan was made with DecodePlanConfig::deterministic
  // Launch as a programmatic dependent (PDL) of the previous kernel on the stream: the CTAs
  // start and read the plan and page table while that kernel finishes, and wait for it
  // (griddepcontrol.wait) before touching q, the KV pages, the outputs or the workspace.
  bool overlap_previous = true;
};

// InvalidArgumentError naming the argument and its limit for arguments the kernel cannot take
// (checked before anything is launched); InternalError for a failed launch.
absl::Status LaunchBatchDecode(const DecodeArgs& args, cudaStream_t stream);

// Planner config for a device and model: SM count and the decode kernel's occupancy. Call once
// at start-up (it queries the device, which it makes current for the call and then restores),
// then set deterministic / fixed_chunk_tokens as wanted.
// The pool's shape gives the dtype, storage, head_dim, kv heads and layout (num_pages is not
// read): a head_dim-64 NHD pool of an even number of kv heads and groups of up to 4 runs two
// heads a CTA, so kv_head_blocks is half the kv heads.
absl::StatusOr<DecodePlanConfig> MakeDecodePlanConfig(int device, const KvCacheShape& shape,
                                                      int64_t num_qo_heads,
                                                      int64_t window_left);

}  // namespace attnd::kernels::cuda

#endif  // ATTND_KERNELS_CUDA_DECODE_DECODE_H_
