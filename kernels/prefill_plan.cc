#include "kernels/prefill_plan.h"

#include <algorithm>
#include <numeric>
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

bool PlanPrefill(const int32_t* qo_indptr, const int32_t* kv_len, const int32_t* kv_indptr,
                 int batch, const PrefillPlanConfig& cfg, const PrefillPlanLayout& layout,
                 int32_t* plan, std::string* error) {
  auto fail = [&](std::string msg) {
    if (error != nullptr) *error = std::move(msg);
    return false;
  };
  if (batch < 0 || batch > layout.max_batch) {
    return fail("batch " + std::to_string(batch) + " exceeds max_batch " +
                std::to_string(layout.max_batch));
  }
  if (cfg.group < 1 || cfg.num_kv_heads < 1) return fail("bad group or kv heads");
  const int64_t group = cfg.group;
  std::vector<Tile> tiles;
  for (int b = 0; b < batch; ++b) {
    const int64_t q_len = static_cast<int64_t>(qo_indptr[b + 1]) - qo_indptr[b];
    const int64_t len = kv_len[b];
    if (q_len < 0) return fail("qo_indptr decreases at " + std::to_string(b));
    if (q_len > len) {
      return fail("request " + std::to_string(b) + " has " + std::to_string(q_len) +
                  " queries but only " + std::to_string(len) + " keys");
    }
    if (q_len == 0) continue;
    const int64_t rows = q_len * group;
    if (rows > INT32_MAX) return fail("too many rows");
    const int64_t tr = rows <= kPrefillDecodeRows ? kPrefillDecodeRows : kPrefillWideRows;
    const int64_t pos0 = cfg.causal ? len - q_len : len - 1;
    for (int64_t row0 = 0; row0 < rows; row0 += tr) {
      const int64_t first_qi = row0 / group;
      const int64_t last_qi = (std::min(rows, row0 + tr) - 1) / group;
      const int64_t first_pos = pos0 + (cfg.causal ? first_qi : 0);
      const int64_t last_pos = pos0 + (cfg.causal ? last_qi : 0);
      const int64_t lo = cfg.window_left >= 0 ? std::max<int64_t>(0, first_pos - cfg.window_left)
                                              : 0;
      tiles.push_back({b, static_cast<int32_t>(row0), lo, last_pos + 1});
    }
  }
  const bool det = cfg.deterministic;
  auto count = [&](int64_t chunk) {
    int64_t n = 0;
    for (const Tile& t : tiles) n += NumPieces(t.lo, t.hi, chunk, det);
    return n;
  };
  int64_t max_len = 0;
  for (const Tile& t : tiles) max_len = std::max(max_len, t.hi - t.lo);
  int64_t chunk;
  if (det) {
    chunk = DetChunk(cfg);
  } else {
    const int64_t cols = Columns(cfg);
    const int64_t unit = kPrefillTileKeys;
    const int64_t lo_c = std::max<int64_t>(CeilDiv(cfg.min_chunk_tokens, unit), 1);
    const int64_t hi_c = std::max(CeilDiv(max_len, unit), lo_c);
    if (static_cast<int64_t>(tiles.size()) >= cols) {
      chunk = hi_c * unit;  // enough tiles to fill the device: no cuts
    } else {
      int64_t lo = lo_c, hi = hi_c;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (count(mid * unit) <= cols) hi = mid; else lo = mid + 1;
      }
      chunk = lo * unit;
    }
  }
  const int64_t num_items = count(chunk);
  if (num_items > layout.max_items) {
    return fail("the plan needs " + std::to_string(num_items) + " items, over max_items " +
                std::to_string(layout.max_items));
  }
  struct Item {
    int32_t v[kPrefillItemInts];
    int64_t cost;
  };
  std::vector<Item> items;
  items.reserve(num_items);
  int32_t* merges = plan + layout.MergesOffset();
  int64_t num_merges = 0, num_partials = 0;
  for (const Tile& t : tiles) {
    const int64_t q_len = static_cast<int64_t>(qo_indptr[t.b + 1]) - qo_indptr[t.b];
    const int64_t pos0 = cfg.causal ? kv_len[t.b] - q_len : kv_len[t.b] - 1;
    const int64_t n = NumPieces(t.lo, t.hi, chunk, det);
    int32_t slot = -1;
    if (n > 1) {
      if (num_merges >= layout.max_merges || num_partials + n > layout.max_partials) {
        return fail("the plan needs more merges or partial slots than the layout holds");
      }
      slot = static_cast<int32_t>(num_partials);
      int32_t* m = merges + kPrefillMergeInts * num_merges;
      m[0] = qo_indptr[t.b];
      m[1] = static_cast<int32_t>(q_len);
      m[2] = t.row0;
      m[3] = slot;
      m[4] = static_cast<int32_t>(n);
      m[5] = m[6] = m[7] = 0;
      ++num_merges;
      num_partials += n;
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
      items.push_back(it);
      s = e;
    }
  }
  // Longest first (stable) within each kind: CTAs are dispatched roughly in index order. Narrow
  // items (decodes: bandwidth-bound) are interleaved with wide ones (compute-bound) in
  // proportion to their total keys, so that both kinds run side by side on the device.
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
  int32_t* out = plan + layout.ItemsOffset();
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
  plan[0] = static_cast<int32_t>(items.size());
  plan[1] = static_cast<int32_t>(num_merges);
  plan[2] = static_cast<int32_t>(num_partials);
  plan[3] = batch;
  plan[4] = static_cast<int32_t>(chunk > INT32_MAX ? INT32_MAX : chunk);
  plan[5] = plan[6] = plan[7] = 0;
  return true;
}

}  // namespace attnd::kernels
