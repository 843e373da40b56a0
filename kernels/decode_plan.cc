#include "kernels/decode_plan.h"

#include <algorithm>

namespace attnd::kernels {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Items of one request for a chunk size: at least one, so that a padded (length 0) entry still
// gets a CTA that writes its zero output and -inf lse.
int64_t ItemsOf(int64_t visible, int64_t chunk) {
  return visible <= 0 ? 1 : CeilDiv(visible, chunk);
}

int64_t DetChunk(const DecodePlanConfig& cfg) {
  const int64_t tile = std::max(cfg.tile_tokens, 1);
  return CeilDiv(std::max<int64_t>(cfg.fixed_chunk_tokens, 1), tile) * tile;
}

}  // namespace

int DecodeGridX(int batch_bucket, const DecodePlanConfig& cfg) {
  const int64_t slots =
      static_cast<int64_t>(std::max(cfg.num_sms, 1)) * std::max(cfg.ctas_per_sm, 1);
  const int64_t fill = CeilDiv(slots, std::max(cfg.kv_head_blocks, 1));
  return static_cast<int>(std::max<int64_t>({fill, batch_bucket, 1}));
}

int64_t VisibleKeys(int64_t kv_len, int64_t window_left) {
  if (kv_len <= 0) return 0;
  return window_left >= 0 ? std::min(kv_len, window_left + 1) : kv_len;
}

int64_t MaxDecodeItems(int max_batch, int64_t max_kv_len, const DecodePlanConfig& cfg) {
  const int64_t grid = DecodeGridX(max_batch, cfg);
  if (!cfg.deterministic) return grid;
  const int64_t visible = VisibleKeys(max_kv_len, cfg.window_left);
  return std::max(grid, static_cast<int64_t>(max_batch) * ItemsOf(visible, DetChunk(cfg)));
}

DecodePlanLayout MakeDecodePlanLayout(int max_batch, int64_t max_kv_len,
                                      const DecodePlanConfig& cfg) {
  DecodePlanConfig det = cfg, nondet = cfg;
  det.deterministic = true;
  nondet.deterministic = false;
  DecodePlanLayout layout;
  layout.max_batch = max_batch;
  layout.max_items = std::max(MaxDecodeItems(max_batch, max_kv_len, det),
                              MaxDecodeItems(max_batch, max_kv_len, nondet));
  return layout;
}

int64_t DecodeWorkspaceSizes::Total() const {
  return plan_bytes + partial_out_bytes + partial_lse_bytes + counter_bytes;
}

DecodeWorkspaceSizes DecodeWorkspaceFor(const DecodePlanLayout& layout,
                                        const DecodePlanConfig& cfg, int64_t num_qo_heads,
                                        int64_t head_dim) {
  DecodeWorkspaceSizes w;
  w.plan_bytes = layout.TotalInts() * 4;
  w.partial_out_bytes = layout.max_items * num_qo_heads * head_dim * 4;
  w.partial_lse_bytes = layout.max_items * num_qo_heads * 4;
  w.counter_bytes = static_cast<int64_t>(layout.max_batch) * cfg.kv_head_blocks * 4;
  return w;
}

DecodePlanLayout FitDecodePlanLayout(int max_batch, int64_t max_kv_len,
                                     const DecodePlanConfig& cfg, int64_t num_qo_heads,
                                     int64_t head_dim, int64_t budget_bytes) {
  DecodePlanLayout layout = MakeDecodePlanLayout(max_batch, max_kv_len, cfg);
  // One item's partial state: an fp32 row and an lse per query head.
  const int64_t row_bytes = (num_qo_heads * head_dim + num_qo_heads) * 4;
  if (row_bytes <= 0) return layout;
  layout.max_items = std::max<int64_t>(DecodeGridX(max_batch, cfg),
                                       std::min(layout.max_items, budget_bytes / row_bytes));
  return layout;
}

bool PlanDecode(const int32_t* kv_len, const int32_t* kv_indptr, int batch, int grid_x,
                const DecodePlanConfig& cfg, const DecodePlanLayout& layout, int32_t* plan,
                int64_t* used_ints, std::string* error) {
  auto fail = [&](std::string msg) {
    if (error != nullptr) *error = std::move(msg);
    return false;
  };
  if (batch < 0 || batch > layout.max_batch) {
    return fail("batch " + std::to_string(batch) + " exceeds the plan's max_batch " +
                std::to_string(layout.max_batch));
  }
  if (grid_x < batch || grid_x < 1) {
    return fail("grid_x " + std::to_string(grid_x) + " is smaller than the batch " +
                std::to_string(batch));
  }
  if (grid_x > layout.max_items) {
    return fail("grid_x " + std::to_string(grid_x) + " exceeds max_items " +
                std::to_string(layout.max_items));
  }
  const int64_t tile = std::max(cfg.tile_tokens, 1);
  int64_t max_visible = 0;
  for (int b = 0; b < batch; ++b) {
    if (kv_len[b] < 0) return fail("kv_len[" + std::to_string(b) + "] is negative");
    max_visible = std::max(max_visible, VisibleKeys(kv_len[b], cfg.window_left));
  }
  auto count = [&](int64_t chunk) {
    int64_t n = 0;
    for (int b = 0; b < batch; ++b) n += ItemsOf(VisibleKeys(kv_len[b], cfg.window_left), chunk);
    return n;
  };

  int64_t chunk;
  if (cfg.deterministic) {
    chunk = DetChunk(cfg);
  } else {
    // The smallest chunk (in tiles, at least min_chunk_tokens) whose items fit one per column.
    // With chunk >= max_visible every request is one item, and batch <= grid_x.
    const int64_t lo_chunk = std::max<int64_t>(CeilDiv(cfg.min_chunk_tokens, tile), 1);
    int64_t lo = lo_chunk, hi = std::max(CeilDiv(max_visible, tile), lo_chunk);
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (count(mid * tile) <= grid_x) hi = mid; else lo = mid + 1;
    }
    chunk = lo * tile;
  }
  if (chunk > INT32_MAX) return fail("chunk size overflows int32");
  const int64_t num_items = count(chunk);
  if (num_items > layout.max_items) {
    return fail("the plan needs " + std::to_string(num_items) + " items, over max_items " +
                std::to_string(layout.max_items));
  }

  plan[0] = static_cast<int32_t>(num_items);
  plan[1] = static_cast<int32_t>(chunk);
  plan[2] = batch;
  plan[3] = 0;
  int32_t* item_indptr = plan + layout.ItemIndptrOffset();
  int32_t* items = plan + layout.ItemsOffset();
  int64_t i = 0;
  for (int b = 0; b < batch; ++b) {
    item_indptr[b] = static_cast<int32_t>(i);
    const int64_t len = std::max<int64_t>(kv_len[b], 0);
    const int64_t vis = VisibleKeys(len, cfg.window_left);
    const int64_t n = ItemsOf(vis, chunk);
    for (int64_t c = 0; c < n; ++c, ++i) {
      const int64_t t0 = len - vis + c * chunk;
      items[4 * i] = b;
      items[4 * i + 1] = static_cast<int32_t>(t0);
      items[4 * i + 2] = static_cast<int32_t>(std::min(t0 + chunk, len));
      items[4 * i + 3] = kv_indptr[b];
    }
  }
  item_indptr[batch] = static_cast<int32_t>(i);
  if (used_ints != nullptr) *used_ints = layout.UsedInts(num_items);
  return true;
}

}  // namespace attnd::kernels
