// Host-side work planner for the CUDA batch prefill kernel. Plain C++ (no CUDA): it runs on the
// host every step, and CI tests it without a GPU.
//
// A batch is ragged: request b has q_len[b] = qo_indptr[b+1] - qo_indptr[b] new queries, the
// last q_len[b] of its kv_len[b] positions (kv_len >= q_len). For one kv head the kernel sees a
// request's queries as rows: row R = qi * group + g (query qi, query head g of the GQA group), so
// one tile of rows reuses each K/V tile for the whole group. A request with at most
// kDecodeRows rows (decodes, short speculative chunks) is one 16-row "narrow" tile whose four
// warps split the keys; longer requests are cut into 128-row "wide" tiles whose four warps split
// the rows (FlashAttention-2). A tile sees keys [lo, hi): hi is one past its last query's
// position (causal), lo is 0 or the sliding window's start for its first query.
//
// A work item is (tile, keys [t0, t1)); the grid is kv_heads x grid_y CTAs and column y runs
// items y, y + grid_y, ... (the Hopper kernel given work counters instead runs a persistent grid
// whose CTAs take (item, kv head) units in this order). Items are sorted by cost (keys), longest
// first, so that the hardware's in-order dispatch of CTAs (or the counter) gives a longest-first
// greedy schedule. A tile cut into several items
// ("pieces") writes fp32 partial states into consecutive partial slots, merged in key order by a
// second kernel (one "merge" per cut tile); an uncut tile writes the output directly.
//
// Non-deterministic mode cuts tiles only when the batch has too few items to fill the device:
// the smallest chunk (a multiple of the key tile, at least min_chunk_tokens) whose items fit in
// ceil(slots / kv_heads) columns. Deterministic mode cuts every tile at absolute key positions
// that are multiples of fixed_chunk_tokens, whatever the batch, so a request's items, their
// keys, their order within a tile and the merge order depend on that request alone: its output
// is bitwise the same whatever shares the batch.
//
// Plan buffer (int32, fixed size, PrefillPlanLayout):
//   [0] num_items [1] num_merges [2] num_partials [3] batch [4] chunk [5..7] reserved
//   items  at ItemsOffset(),  8 ints each: {q_start, q_len, pos0, row0, t0, t1, page_off, slot}
//   merges at MergesOffset(), 8 ints each: {q_start, q_len, row0, first_slot, n, 0, 0, 0}
// pos0: position of query 0 (kv_len - q_len; kv_len - 1 when not causal: every query sees all
// keys); row0: first row of the tile; page_off: kv_indptr[b]; slot: partial slot, -1 = direct.
#ifndef ATTND_KERNELS_PREFILL_PLAN_H_
#define ATTND_KERNELS_PREFILL_PLAN_H_

#include <cstdint>
#include <string>

namespace attnd::kernels {

inline constexpr int kPrefillPlanHeaderInts = 8;
inline constexpr int kPrefillItemInts = 8;
inline constexpr int kPrefillMergeInts = 8;
// Rows of a wide tile (4 warps x 32, or 2 warpgroups x 64).
inline constexpr int kPrefillWideRows = 128;
inline constexpr int kPrefillDecodeRows = 16;  // a request of at most this many rows is narrow
inline constexpr int kPrefillTileKeys = 64;   // keys per pipeline stage

struct PrefillPlanConfig {
  int num_sms = 132;
  int ctas_per_sm = 2;      // prefill kernel occupancy (MakePrefillPlanConfig)
  int num_kv_heads = 8;
  int group = 4;            // qo heads per kv head
  bool causal = true;       // false: every query sees all kv_len keys (benchmarks, encoders)
  int64_t window_left = -1;
  int min_chunk_tokens = 512;  // non-deterministic mode: never cut finer than this
  bool deterministic = false;
  int fixed_chunk_tokens = 1024;  // deterministic mode, rounded up to a multiple of 64
};

struct PrefillPlanLayout {
  int max_batch = 0;
  int64_t max_items = 0;
  int64_t max_merges = 0;
  int64_t max_partials = 0;

  int64_t ItemsOffset() const { return kPrefillPlanHeaderInts; }
  int64_t MergesOffset() const { return ItemsOffset() + kPrefillItemInts * max_items; }
  int64_t TotalInts() const { return MergesOffset() + kPrefillMergeInts * max_merges; }
  // What a plan of num_items items and num_merges merges uses: the header and items from 0,
  // the merges from MergesOffset(). Only these ints change from call to call.
  int64_t HeadAndItemsInts(int64_t num_items) const {
    return ItemsOffset() + kPrefillItemInts * num_items;
  }
  int64_t MergeInts(int64_t num_merges) const { return kPrefillMergeInts * num_merges; }
};

// A layout that serves, in either mode, any batch of at most max_batch requests with at most
// max_total_q queries together and at most max_kv_len keys each.
PrefillPlanLayout MakePrefillPlanLayout(int max_batch, int64_t max_total_q, int64_t max_kv_len,
                                        const PrefillPlanConfig& cfg);

// Device bytes of each buffer of a prefill workspace (cuda::PrefillWorkspace) for a layout: the
// plan (layout.TotalInts() ints) and the fp32 partial states of layout.max_partials slots, each
// num_kv_heads x kPrefillWideRows rows of head_dim values and one lse, and the work
// counters.
struct PrefillWorkspaceSizes {
  int64_t plan_bytes = 0, partial_out_bytes = 0, partial_lse_bytes = 0;
  int64_t counter_bytes = 8;  // the Hopper kernel's work counters (2 ints, zeroed once)
  int64_t Total() const;
};
PrefillWorkspaceSizes PrefillWorkspaceFor(const PrefillPlanLayout& layout, int64_t num_kv_heads,
                                          int64_t head_dim);

// MakePrefillPlanLayout with its partial slots capped to budget_bytes. Batches that would need
// more are refused by PlanPrefill, not faulted.
PrefillPlanLayout FitPrefillPlanLayout(int max_batch, int64_t max_total_q, int64_t max_kv_len,
                                       const PrefillPlanConfig& cfg, int64_t num_kv_heads,
                                       int64_t head_dim, int64_t budget_bytes);

// Plans a batch from host copies of qo_indptr (batch + 1), kv_len (batch) and kv_indptr
// (batch + 1, offsets into the kernel's kv_indices). Writes the header, the items and the
// merges into `plan` (which holds layout.TotalInts() ints) and returns true; on a batch that does
// not fit the layout (or q_len > kv_len) returns false with the reason in *error.
bool PlanPrefill(const int32_t* qo_indptr, const int32_t* kv_len, const int32_t* kv_indptr,
                 int batch, const PrefillPlanConfig& cfg, const PrefillPlanLayout& layout,
                 int32_t* plan, std::string* error);

}  // namespace attnd::kernels

#endif  // ATTND_KERNELS_PREFILL_PLAN_H_
