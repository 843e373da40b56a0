// Host-side split-KV planner for the CUDA batch decode kernel. Plain C++ (no CUDA): it runs on
// the host every step, and CI tests it without a GPU.
//
// The decode kernel runs a fixed grid of kv_head_blocks x grid_x CTAs for a batch-size bucket
// (grid_x = DecodeGridX(bucket): at least one column per request, and enough to fill the
// device). A plan cuts the batch's keys into work items; item i is (request b, keys [t0, t1),
// offset of b's page list in kv_indices). Column y processes items y, y + grid_x, ... for every
// kv head block, so a plan may hold more items than there are columns (deterministic mode with
// long sequences), and columns without an item exit at once. Items are request-major, chunks in
// order, so the items of request b are [item_indptr[b], item_indptr[b+1]).
//
// Non-deterministic mode picks the smallest chunk (a multiple of the tile, at least
// min_chunk_tokens) whose items fit one per column: a short batch of long sequences is split to
// fill the device, a long batch is not split at all. Deterministic mode cuts every request into
// chunks of exactly fixed_chunk_tokens keys from its first visible key, whatever the batch;
// which column runs an item depends on the batch, and that changes no bit of the result. A
// request with one item is written straight to the output; one with several writes fp32
// partial states that are merged in item order.
//
// (Tried and measured worse on an H200: a persistent grid of exactly one CTA per resident slot
// with the keys split evenly across columns, cutting requests anywhere. It kept every slot busy
// to the end but lost 1-4% to the extra per-item restarts and merges.)
//
// The plan lives in one int32 buffer of fixed size (DecodePlanLayout), so a CUDA graph captured
// once per bucket reads whatever plan the host copied there before the replay:
//   [0] num_items  [1] chunk_tokens  [2] batch  [3] reserved
//   [ItemIndptrOffset(), + max_batch + 1)  item_indptr
//   [ItemsOffset(), + 4 * max_items)       items: {b, t0, t1, kv_indptr[b]}, 16-byte aligned
// Only the first UsedInts() ints change from step to step.
#ifndef ATTND_KERNELS_DECODE_PLAN_H_
#define ATTND_KERNELS_DECODE_PLAN_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace attnd::kernels {

inline constexpr int kDecodePlanHeaderInts = 4;
inline constexpr int kDecodePlanItemInts = 4;

struct DecodePlanConfig {
  int num_sms = 132;           // multiprocessors of the device
  int ctas_per_sm = 2;         // decode kernel occupancy (MakeDecodePlanConfig)
  int kv_head_blocks = 8;      // CTAs per item: kv_heads * ceil(group / 16)
  int tile_tokens = 64;        // keys per CTA pipeline step; chunks are multiples of it
  int min_chunk_tokens = 128;  // non-deterministic mode: never split finer than this
  bool deterministic = false;
  // Deterministic mode: every request is split into chunks of exactly this many keys (rounded
  // up to a multiple of tile_tokens), whatever the batch.
  int fixed_chunk_tokens = 1024;
  int64_t window_left = -1;  // sliding window, as in AttentionOptions
};

struct DecodePlanLayout {
  int max_batch = 0;
  int64_t max_items = 0;

  int64_t ItemIndptrOffset() const { return kDecodePlanHeaderInts; }
  int64_t ItemsOffset() const { return (ItemIndptrOffset() + max_batch + 1 + 3) / 4 * 4; }
  int64_t TotalInts() const { return ItemsOffset() + kDecodePlanItemInts * max_items; }
  int64_t UsedInts(int64_t num_items) const {
    return ItemsOffset() + kDecodePlanItemInts * num_items;
  }
};

// Columns of the grid for a bucket: at least one per request, and enough to fill the device.
int DecodeGridX(int batch_bucket, const DecodePlanConfig& cfg);

// Number of visible keys of a request of length kv_len under a window.
int64_t VisibleKeys(int64_t kv_len, int64_t window_left);

// Items a plan can need for batches of up to max_batch requests of up to max_kv_len keys in
// the config's mode (at least DecodeGridX: the kernel reads item y of column y early).
int64_t MaxDecodeItems(int max_batch, int64_t max_kv_len, const DecodePlanConfig& cfg);

// A layout for a bucket, sized for either mode.
DecodePlanLayout MakeDecodePlanLayout(int max_batch, int64_t max_kv_len,
                                      const DecodePlanConfig& cfg);

// Device bytes of each buffer of a decode workspace (cuda::DecodeWorkspace) for a layout: the
// plan (layout.TotalInts() ints), the fp32 partial states of layout.max_items items
// (num_qo_heads x head_dim values and num_qo_heads lse each) and the merge counters
// (layout.max_batch x cfg.kv_head_blocks ints).
struct DecodeWorkspaceSizes {
  int64_t plan_bytes = 0, partial_out_bytes = 0, partial_lse_bytes = 0, counter_bytes = 0;
  int64_t Total() const;
};
DecodeWorkspaceSizes DecodeWorkspaceFor(const DecodePlanLayout& layout,
                                        const DecodePlanConfig& cfg, int64_t num_qo_heads,
                                        int64_t head_dim);

// The layout for batches of up to max_batch requests of up to max_kv_len keys with its partial
// states capped to budget_bytes (never fewer items than DecodeGridX(max_batch, cfg)).
// Batches that would need more items than the cap are refused by PlanDecode, not faulted.
DecodePlanLayout FitDecodePlanLayout(int max_batch, int64_t max_kv_len,
                                     const DecodePlanConfig& cfg, int64_t num_qo_heads,
                                     int64_t head_dim, int64_t budget_bytes);

// Plans a batch. kv_len and kv_indptr: host copies of the batch's lengths (0 for padded
// entries) and page-table offsets (batch + 1 entries, as passed to the kernel's kv_indices).
// grid_x: DecodeGridX. Writes the plan's first UsedInts() ints into `plan` (which must hold
// layout.TotalInts()) and returns true; on a batch that does not fit the layout, returns false
// and says why in *error, writing nothing.
bool PlanDecode(const int32_t* kv_len, const int32_t* kv_indptr, int batch, int grid_x,
                const DecodePlanConfig& cfg, const DecodePlanLayout& layout, int32_t* plan,
                int64_t* used_ints, std::string* error);

}  // namespace attnd::kernels

#endif  // ATTND_KERNELS_DECODE_PLAN_H_
