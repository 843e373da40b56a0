// CUDA kernels of attnd: paged-KV append, batch decode (split-KV + merge). Host launchers only
// check arguments and dispatch; every launch goes on the caller's stream, and the caller makes
// the stream's device current (the kernels never pick a device). Pointers are device pointers
// unless a comment says host. Every launcher is CUDA-graph safe: what changes from step to step
// (lengths, page tables, the split plan, slot mappings) is read from device memory, and the grid
// depends only on the batch size passed in.
#ifndef ATTND_KERNELS_CUDA_ATTENTION_CUDA_H_
#define ATTND_KERNELS_CUDA_ATTENTION_CUDA_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/decode_plan.h"
#include "kernels/paged_kv.h"
#include "kernels/prefill_plan.h"

namespace attnd::kernels::cuda {

// One layer of a device's KV pool (layout of KvCacheShape: [layers][pages][2][page block]).
struct PagedKv {
  void* pool = nullptr;  // base of the whole pool, 16-byte aligned
  KvCacheShape shape;    // dtype fp16 or bf16; head_dim 64, 128 or 256
  int64_t layer = 0;
  // When set (append and decode), the layer is read from this device int when the kernel runs
  // and `layer` is ignored: one captured CUDA graph then serves every layer.
  const int32_t* layer_in_device = nullptr;
};

// ---- Append -------------------------------------------------------------------------------
// Writes num_tokens tokens' K and V, each [num_tokens][kv_heads][head_dim] (heads contiguous,
// tokens `*_token_stride` elements apart, a multiple of 8), into their page slots. slot_mapping
// [num_tokens] holds page * page_size + slot for each token; a negative entry skips the token
// (padding in a graph bucket). Two tokens must not name the same slot.
struct AppendArgs {
  PagedKv kv;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_token_stride = 0;
  int64_t v_token_stride = 0;
  const int64_t* slot_mapping = nullptr;
  int64_t num_tokens = 0;
};
cudaError_t LaunchAppendKv(const AppendArgs& args, cudaStream_t stream);

// ---- Batch decode -------------------------------------------------------------------------
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
// CTA that is cheaper than fusing. Both give the same bits for a given plan whatever the rest
// of the batch. Launches that share a workspace must be ordered (one stream).
struct DecodeWorkspace {
  const int32_t* plan = nullptr;  // DecodePlanLayout::TotalInts() ints, on the device
  DecodePlanLayout layout;
  int grid_x = 0;                 // DecodeGridX(batch bucket, config) the plan was made for
  float* partial_out = nullptr;
  float* partial_lse = nullptr;
  int* counters = nullptr;
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
cudaError_t LaunchBatchDecode(const DecodeArgs& args, cudaStream_t stream);

// Planner config for a device and model: SM count and the decode kernel's occupancy. Call once
// at start-up (it queries the device), then set deterministic / fixed_chunk_tokens as wanted.
cudaError_t MakeDecodePlanConfig(int device, DType dtype, int64_t head_dim, int64_t num_qo_heads,
                                 int64_t num_kv_heads, int64_t window_left,
                                 DecodePlanConfig* cfg);

// ---- Merge of partial attention states ----------------------------------------------------
// out[b][h] = merge over items i in [indptr[b], indptr[b+1]) (in that order) of the fp32
// partial states (partial_out[i][h][:], partial_lse[i][h] in log2 units). Requests with fewer
// than two items are left alone. Used by batch decode; exposed for prefill.
struct MergeArgs {
  int batch = 0;
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  DType dtype = DType::kBFloat16;
  const int32_t* indptr = nullptr;
  const float* partial_out = nullptr;
  const float* partial_lse = nullptr;
  void* out = nullptr;
  int64_t out_stride_b = 0, out_stride_h = 0;
  float* lse = nullptr;  // natural log, optional
  // Launch as a programmatic dependent of the previous kernel on the stream (which must call
  // griddepcontrol.launch_dependents or exit); the merge waits for it before reading.
  bool programmatic = false;
};
cudaError_t LaunchMergeStates(const MergeArgs& args, cudaStream_t stream);


// ---- Batch prefill ------------------------------------------------------------------------
// Ragged queries: request b's q_len = qo_indptr[b+1] - qo_indptr[b] queries are rows
// [qo_indptr[b], qo_indptr[b+1]) of q [total_q][qo_heads][head_dim] (strides in elements,
// multiples of 8), the last q_len of its kv_len positions (their K/V appended first), attending
// causally (and within opts.window_left) over the request's pages: kv_indices[kv_indptr[b] ...],
// CSR as in decode. Items with q_len 1 (decodes) and long chunks mix freely in one launch.
// The work comes from a plan (kernels/prefill_plan.h) made on the host from host copies of
// qo_indptr, kv_len and kv_indptr and copied to `ws.plan` before the launch (graph-safe: the
// grid is kv_heads x ws.grid_y whatever the plan). PrefillPlanConfig::causal and window_left
// must equal `causal` and opts.window_left. Cut tiles write fp32 partials (ws.partial_out:
// layout.max_partials * kv_heads * 64 * head_dim floats, ws.partial_lse: layout.max_partials *
// kv_heads * 64) merged in key order by a second kernel launched as a programmatic dependent;
// with a deterministic plan the output is bitwise independent of the rest of the batch.
// lse (optional, [total_q][qo_heads] fp32): natural log of the softmax denominator.
struct PrefillWorkspace {
  const int32_t* plan = nullptr;  // PrefillPlanLayout::TotalInts() ints, on the device
  PrefillPlanLayout layout;
  int grid_y = 0;  // CTA columns (<= 65535): the plan's num_items for one CTA per item, or a
                   // fixed number (e.g. layout.max_items) under a graph; columns loop over items
  float* partial_out = nullptr;
  float* partial_lse = nullptr;
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
  PrefillKernel kernel = PrefillKernel::kAuto;  // kHopper where unavailable: cudaErrorNotSupported
};
cudaError_t LaunchBatchPrefill(const PrefillArgs& args, cudaStream_t stream);

// Planner config for a device and model (SM count, the prefill kernel's occupancy); set
// deterministic / fixed_chunk_tokens afterwards as wanted.
cudaError_t MakePrefillPlanConfig(int device, DType dtype, int64_t head_dim, int64_t num_qo_heads,
                                  int64_t num_kv_heads, int64_t window_left, bool causal,
                                  PrefillPlanConfig* cfg,
                                  PrefillKernel kernel = PrefillKernel::kAuto);

// Whether `device` runs the Hopper prefill kernel for head_dim (kAuto's choice).
bool HopperPrefillAvailable(int device, int64_t head_dim);

// ---- Copies for graphs --------------------------------------------------------------------
// One copy of `bytes` bytes (0: none); an array of these lives in device memory and is read when
// the kernel runs, so a graph captured once copies whatever the host wrote there before replay.
struct IndirectCopy {
  const void* src;
  void* dst;
  uint64_t bytes;
};
cudaError_t LaunchIndirectCopies(const IndirectCopy* copies, int count, cudaStream_t stream);

// Copies two ranges of a pinned host block to the device, their sizes read from pinned host
// memory when the kernel runs: header[0] bytes from offset 0 and header[2] bytes from offset
// header[1] (offsets and sizes multiples of 4). A graph that starts with it takes each call's
// arguments with no host copy call of its own.
cudaError_t LaunchHostRangesCopy(const uint32_t* header, const void* src, void* dst,
                                 cudaStream_t stream);

// ---- Testing aid ----------------------------------------------------------------------------
// Launches a kernel that traps: the device's context takes a sticky error. Only for tests of
// fault handling.
cudaError_t LaunchFaultingKernel(cudaStream_t stream);

}  // namespace attnd::kernels::cuda

#endif  // ATTND_KERNELS_CUDA_ATTENTION_CUDA_H_
