#include "kernels/prefill_plan.h"

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

namespace attnd::kernels {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t DetChunk(const PrefillPlanConfig& cfg) {
  return CeilDiv(std::max<int64_t>(cfg.fixed_chunk_tokens, 1), kPrefillTileKeys) *
         kPrefillTileKeys;
}

int64_t Columns(const PrefillPlanConfig& cfg) {
  const int64_t slots =
      static_cast<int64_t>(std::max(cfg.num_sms, 1)) * std::max(cfg.ctas_per_sm, 1);
  return CeilDiv(slots, std::max(cfg.num_kv_heads, 1));
}

struct Tile {
  int b;
  int32_t row0;
  int64_t lo, hi;  // keys [lo, hi)
};

// Pieces of [lo, hi): deterministic cuts at multiples of chunk; otherwise equal chunks from lo.
int64_t NumPieces(int64_t lo, int64_t hi, int64_t chunk, bool det) {
  if (hi <= lo) return 1;
  if (det) return (hi - 1) / chunk - lo / chunk + 1;
  return CeilDiv(hi - lo, chunk);
}

bool Fail(std::string* error, std::string msg) {
  if (error != nullptr) *error = std::move(msg);
  return false;
}

// The tiles of a batch: each request's rows cut into narrow or wide tiles, with the keys each
// tile sees.
bool CutTiles(const int32_t* qo_indptr, const int32_t* kv_len, int batch,
              const PrefillPlanConfig& cfg, std::vector<Tile>* tiles, std::string* error) {
  const int64_t group = cfg.group;
  for (int b = 0; b < batch; ++b) {
    const int64_t q_len = static_cast<int64_t>(qo_indptr[b + 1]) - qo_indptr[b];
    const int64_t len = kv_len[b];
    if (q_len < 0) return Fail(error, "qo_indptr decreases at " + std::to_string(b));
    if (q_len > len) {
      return Fail(error, "request " + std::to_string(b) + " has " + std::to_string(q_len) +
                             " queries but only " + std::to_string(len) + " keys");
    }
    if (q_len == 0) continue;
    const int64_t rows = q_len * group;
    if (rows > INT32_MAX) return Fail(error, "too many rows");
    const int64_t tr = rows <= kPrefillDecodeRows ? kPrefillDecodeRows : kPrefillWideRows;
    const int64_t pos0 = cfg.causal ? len - q_len : len - 1;
    for (int64_t row0 = 0; row0 < rows; row0 += tr) {
      const int64_t first_qi = row0 / group;
      const int64_t last_qi = (std::min(rows, row0 + tr) - 1) / group;
      const int64_t first_pos = pos0 + (cfg.causal ? first_qi : 0);
      const int64_t last_pos = pos0 + (cfg.causal ? last_qi : 0);
      const int64_t lo = cfg.window_left >= 0 ? std::max<int64_t>(0, first_pos - cfg.window_left)
                                              : 0;
      tiles->push_back({b, static_cast<int32_t>(row0), lo, last_pos + 1});
    }
  }
  return true;
}

int64_t CountPieces(const std::vector<Tile>& tiles, int64_t chunk, bool det) {
  int64_t n = 0;
  for (const Tile& t : tiles) n += NumPieces(t.lo, t.hi, chunk, det);
  return n;
}

// Deterministic mode: the fixed chunk. Otherwise the smallest chunk (in key tiles, at least
// min_chunk_tokens) whose pieces fit the columns, or no cut when the tiles fill them already.
int64_t ChooseChunk(const std::vector<Tile>& tiles, const PrefillPlanConfig& cfg) {
  if (cfg.deterministic) return DetChunk(cfg);
  int64_t max_len = 0;
  for (const Tile& t : tiles) max_len = std::max(max_len, t.hi - t.lo);
  const int64_t cols = Columns(cfg);
  const int64_t unit = kPrefillTileKeys;
  const int64_t lo_c = std::max<int64_t>(CeilDiv(cfg.min_chunk_tokens, unit), 1);
  const int64_t hi_c = std::max(CeilDiv(max_len, unit), lo_c);
  if (static_cast<int64_t>(tiles.size()) >= cols) return hi_c * unit;
  int64_t lo = lo_c, hi = hi_c;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (CountPieces(tiles, mid * unit, false) <= cols) hi = mid; else lo = mid + 1;
  }
  return lo * unit;
}

struct Item {
  int32_t v[kPrefillItemInts];
  int64_t cost;
};

// The items of every tile (its pieces, in key order) and the merge of each cut tile, written
// to the plan's merges.
bool CutItems(const std::vector<Tile>& tiles, int64_t chunk, const int32_t* qo_indptr,
              const int32_t* kv_len, const int32_t* kv_indptr, const PrefillPlanConfig& cfg,
              const PrefillPlanLayout& layout, int32_t* plan, std::vector<Item>* items,
              int64_t* num_merges, int64_t* num_partials, std::string* error) {
  const bool det = cfg.deterministic;
  int32_t* merges = plan + layout.MergesOffset();
  for (const Tile& t : tiles) {
    const int64_t q_len = static_cast<int64_t>(qo_indptr[t.b + 1]) - qo_indptr[t.b];
    const int64_t pos0 = cfg.causal ? kv_len[t.b] - q_len : kv_len[t.b] - 1;
    const int64_t n = NumPieces(t.lo, t.hi, chunk, det);
    int32_t slot = -1;
    if (n > 1) {
      if (*num_merges >= layout.max_merges || *num_partials + n > layout.max_partials) {
        return Fail(error, "the plan needs more merges or partial slots than the layout holds");
      }
      slot = static_cast<int32_t>(*num_partials);
      int32_t* m = merges + kPrefillMergeInts * *num_merges;
      m[0] = qo_indptr[t.b];
      m[1] = static_cast<int32_t>(q_len);
      m[2] = t.row0;
      m[3] = slot;
      m[4] = static_cast<int32_t>(n);
      m[5] = m[6] = m[7] = 0;
      ++*num_merges;
      *num_partials += n;
    }
    int64_t s = t.lo;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t e = det ? std::min(t.hi, (s / chunk + 1) * chunk) : std::min(t.hi, s + chunk);
      Item it;
      it.v[0] = qo_indptr[t.b];
      it.v[1] = static_cast<int32_t>(q_len);
      it.v[2] = static_cast<int32_t>(pos0);
      it.v[3] = t.row0;
      it.v[4] = static_cast<int32_t>(s);
      it.v[5] = static_cast<int32_t>(e);
      it.v[6] = kv_indptr[t.b];
      it.v[7] = n > 1 ? slot + static_cast<int32_t>(i) : -1;
      it.cost = e - s;
      items->push_back(it);
      s = e;
    }
  }
  return true;
}

// Longest first (stable) within each kind: CTAs are dispatched roughly in index order. Narrow
// items (decodes: bandwidth-bound) are interleaved with wide ones (compute-bound) in
// proportion to their total keys, so that both kinds run side by side on the device.
void WriteItems(const std::vector<Item>& items, int64_t group, int32_t* out) {
  auto longest_first = [](const Item& a, const Item& b) { return a.cost > b.cost; };
  std::vector<Item> wide, narrow;
  int64_t wide_total = 0, narrow_total = 0;
  for (const Item& it : items) {
    if (static_cast<int64_t>(it.v[1]) * group <= kPrefillDecodeRows) {
      narrow.push_back(it);
      narrow_total += it.cost;
    } else {
      wide.push_back(it);
      wide_total += it.cost;
    }
  }
  std::stable_sort(wide.begin(), wide.end(), longest_first);
  std::stable_sort(narrow.begin(), narrow.end(), longest_first);
  size_t iw = 0, in = 0, k = 0;
  int64_t wide_done = 0, narrow_done = 0;
  while (iw < wide.size() || in < narrow.size()) {
    // Take from the kind that has used the smaller share of its keys (cross-multiplied).
    const bool take_wide =
        in == narrow.size() ||
        (iw < wide.size() && static_cast<double>(wide_done) * narrow_total <=
                                 static_cast<double>(narrow_done) * wide_total);
    const Item& it = take_wide ? wide[iw++] : narrow[in++];
    (take_wide ? wide_done : narrow_done) += it.cost;
    std::copy(it.v, it.v + kPrefillItemInts, out + kPrefillItemInts * k++);
  }
}

}  // namespace

PrefillPlanLayout MakePrefillPlanLayout(int max_batch, int64_t max_total_q, int64_t max_kv_len,
                                        const PrefillPlanConfig& cfg) {
  PrefillPlanLayout l;
  l.max_batch = max_batch;
  const int64_t tiles =
      max_batch + CeilDiv(max_total_q * std::max(cfg.group, 1), kPrefillWideRows);
  const int64_t det = tiles * (CeilDiv(std::max<int64_t>(max_kv_len, 1), DetChunk(cfg)) + 1);
  l.max_items = std::max({det, tiles, Columns(cfg)});
  l.max_merges = tiles;
  l.max_partials = l.max_items;
  return l;
}

int64_t PrefillWorkspaceSizes::Total() const {
  return plan_bytes + partial_out_bytes + partial_lse_bytes + counter_bytes;
}

PrefillWorkspaceSizes PrefillWorkspaceFor(const PrefillPlanLayout& layout, int64_t num_kv_heads,
                                          int64_t head_dim) {
  const int64_t rows = layout.max_partials * num_kv_heads * kPrefillWideRows;
  PrefillWorkspaceSizes w;
  w.plan_bytes = layout.TotalInts() * 4;
  w.partial_out_bytes = rows * head_dim * 4;
  w.partial_lse_bytes = rows * 4;
  return w;
}

PrefillPlanLayout FitPrefillPlanLayout(int max_batch, int64_t max_total_q, int64_t max_kv_len,
                                       const PrefillPlanConfig& cfg, int64_t num_kv_heads,
                                       int64_t head_dim, int64_t budget_bytes) {
  PrefillPlanLayout layout = MakePrefillPlanLayout(max_batch, max_total_q, max_kv_len, cfg);
  // One partial slot: a wide tile's fp32 rows and lse for every kv head.
  const int64_t slot_bytes = num_kv_heads * kPrefillWideRows * (head_dim + 1) * 4;
  if (slot_bytes <= 0) return layout;
  layout.max_partials = std::min(layout.max_partials, budget_bytes / slot_bytes);
  return layout;
}

bool PlanPrefill(const int32_t* qo_indptr, const int32_t* kv_len, const int32_t* kv_indptr,
                 int batch, const PrefillPlanConfig& cfg, const PrefillPlanLayout& layout,
                 int32_t* plan, std::string* error) {
  if (batch < 0 || batch > layout.max_batch) {
    return Fail(error, "batch " + std::to_string(batch) + " exceeds max_batch " +
                           std::to_string(layout.max_batch));
  }
  if (cfg.group < 1 || cfg.num_kv_heads < 1) return Fail(error, "bad group or kv heads");
  std::vector<Tile> tiles;
  if (!CutTiles(qo_indptr, kv_len, batch, cfg, &tiles, error)) return false;
  const int64_t chunk = ChooseChunk(tiles, cfg);
  const int64_t num_items = CountPieces(tiles, chunk, cfg.deterministic);
  if (num_items > layout.max_items) {
    return Fail(error, "the plan needs " + std::to_string(num_items) + " items, over max_items " +
                           std::to_string(layout.max_items));
  }
  std::vector<Item> items;
  items.reserve(num_items);
  int64_t num_merges = 0, num_partials = 0;
  if (!CutItems(tiles, chunk, qo_indptr, kv_len, kv_indptr, cfg, layout, plan, &items,
                &num_merges, &num_partials, error)) {
    return false;
  }
  WriteItems(items, cfg.group, plan + layout.ItemsOffset());
  plan[0] = static_cast<int32_t>(items.size());
  plan[1] = static_cast<int32_t>(num_merges);
  plan[2] = static_cast<int32_t>(num_partials);
  plan[3] = batch;
  plan[4] = static_cast<int32_t>(chunk > INT32_MAX ? INT32_MAX : chunk);
  plan[5] = plan[6] = plan[7] = 0;
  return true;
}

}  // namespace attnd::kernels
