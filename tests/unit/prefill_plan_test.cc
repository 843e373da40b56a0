// CPU test of the batch prefill planner and its workspace sizes (runs in CI, no GPU).
#include "kernels/prefill_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <vector>

namespace attnd::kernels {
namespace {

struct Req {
  int32_t q_len, kv_len;
};

struct Planned {
  PrefillPlanLayout layout;
  std::vector<int32_t> buf;
  std::vector<int32_t> qo_indptr, kv_indptr;
  const int32_t* item(int i) const { return buf.data() + layout.ItemsOffset() + 8 * i; }
  const int32_t* merge(int i) const { return buf.data() + layout.MergesOffset() + 8 * i; }
};

Planned Plan(const std::vector<Req>& reqs, const PrefillPlanConfig& cfg, int64_t max_kv = 0) {
  Planned p;
  p.qo_indptr.assign(1, 0);
  p.kv_indptr.assign(1, 0);
  std::vector<int32_t> lens;
  int64_t mk = max_kv;
  for (const Req& r : reqs) {
    p.qo_indptr.push_back(p.qo_indptr.back() + r.q_len);
    p.kv_indptr.push_back(p.kv_indptr.back() + (r.kv_len + 15) / 16);
    lens.push_back(r.kv_len);
    mk = std::max<int64_t>(mk, r.kv_len);
  }
  const int batch = static_cast<int>(reqs.size());
  p.layout = MakePrefillPlanLayout(batch, p.qo_indptr.back(), mk, cfg);
  p.buf.assign(p.layout.TotalInts(), -7);
  std::string err;
  EXPECT_TRUE(PlanPrefill(p.qo_indptr.data(), lens.data(), p.kv_indptr.data(), batch, cfg,
                          p.layout, p.buf.data(), &err))
      << err;
  return p;
}

PrefillPlanConfig Config(bool det, int group = 4, int64_t window = -1, bool causal = true) {
  PrefillPlanConfig c;
  c.num_sms = 132;
  c.ctas_per_sm = 2;
  c.num_kv_heads = 8;
  c.group = group;
  c.deterministic = det;
  c.fixed_chunk_tokens = 512;
  c.window_left = window;
  c.causal = causal;
  return c;
}

// Every row of every request is in exactly one tile, every tile's visible keys are covered once
// in order by its items, cut tiles use consecutive slots in key order and have one merge.
void CheckPlan(const Planned& p, const std::vector<Req>& reqs, const PrefillPlanConfig& cfg) {
  const int n = p.buf[0];
  const int nm = p.buf[1];
  ASSERT_LE(n, p.layout.max_items);
  ASSERT_LE(nm, p.layout.max_merges);
  // (q_start, row0) -> pieces (t0, t1, slot)
  std::map<std::pair<int, int>, std::vector<std::tuple<int, int, int>>> tiles;
  int64_t prev_cost[2] = {INT64_MAX, INT64_MAX};  // wide, narrow
  for (int i = 0; i < n; ++i) {
    const int32_t* it = p.item(i);
    tiles[{it[0], it[3]}].push_back({it[4], it[5], it[7]});
    const int kind = it[1] * cfg.group <= kPrefillDecodeRows ? 1 : 0;
    EXPECT_LE(it[5] - it[4], prev_cost[kind]) << "items of a kind sorted longest first";
    prev_cost[kind] = it[5] - it[4];
    EXPECT_LT(it[4], it[5]);
  }
  int merges_seen = 0;
  for (size_t b = 0; b < reqs.size(); ++b) {
    const int q_len = reqs[b].q_len, len = reqs[b].kv_len;
    const int rows = q_len * cfg.group;
    const int tr = rows <= kPrefillDecodeRows ? kPrefillDecodeRows : kPrefillWideRows;
    for (int row0 = 0; row0 < rows; row0 += tr) {
      auto itr = tiles.find({p.qo_indptr[b], row0});
      ASSERT_NE(itr, tiles.end()) << "request " << b << " row " << row0;
      auto pieces = itr->second;
      std::sort(pieces.begin(), pieces.end());
      const int last_qi = (std::min(rows, row0 + tr) - 1) / cfg.group;
      const int first_qi = row0 / cfg.group;
      const int pos0 = cfg.causal ? len - q_len : len - 1;
      const int hi = pos0 + (cfg.causal ? last_qi : 0) + 1;
      const int lo = cfg.window_left >= 0
                         ? std::max<int>(0, pos0 + (cfg.causal ? first_qi : 0) - cfg.window_left)
                         : 0;
      EXPECT_EQ(std::get<0>(pieces.front()), lo);
      EXPECT_EQ(std::get<1>(pieces.back()), hi);
      for (size_t j = 1; j < pieces.size(); ++j) {
        EXPECT_EQ(std::get<1>(pieces[j - 1]), std::get<0>(pieces[j]));
        EXPECT_EQ(std::get<2>(pieces[j]), std::get<2>(pieces[j - 1]) + 1);
        if (cfg.deterministic) {
          EXPECT_EQ(std::get<0>(pieces[j]) % 512, 0);
        }
      }
      if (pieces.size() == 1) {
        EXPECT_EQ(std::get<2>(pieces[0]), -1);
      } else {
        bool found = false;
        for (int m = 0; m < nm; ++m) {
          const int32_t* mg = p.merge(m);
          if (mg[0] == p.qo_indptr[b] && mg[2] == row0) {
            found = true;
            EXPECT_EQ(mg[1], q_len);
            EXPECT_EQ(mg[3], std::get<2>(pieces[0]));
            EXPECT_EQ(mg[4], static_cast<int>(pieces.size()));
          }
        }
        EXPECT_TRUE(found);
        ++merges_seen;
      }
      tiles.erase(itr);
    }
  }
  EXPECT_TRUE(tiles.empty()) << "items outside any request";
  EXPECT_EQ(merges_seen, nm);
}

TEST(PrefillPlan, CoversEveryRowAndKeyInBothModes) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 40; ++trial) {
    std::vector<Req> reqs;
    const int batch = 1 + rng() % 12;
    for (int b = 0; b < batch; ++b) {
      const int kv = 1 + rng() % 5000;
      const int q = rng() % 3 == 0 ? 1 : 1 + rng() % kv;
      reqs.push_back({q, kv});
    }
    for (bool det : {false, true}) {
      for (int64_t window : {int64_t{-1}, int64_t{300}}) {
        for (int group : {1, 4, 5}) {
          for (bool causal : {true, false}) {
            const PrefillPlanConfig cfg = Config(det, group, window, causal);
            Planned p = Plan(reqs, cfg);
            CheckPlan(p, reqs, cfg);
          }
        }
      }
    }
  }
}

TEST(PrefillPlan, LongBatchIsNotCutShortBatchIs) {
  Planned big = Plan({{4096, 4096}}, Config(false));
  EXPECT_EQ(big.buf[1], 0);  // 128 tiles x 8 heads fill the device: no merges
  EXPECT_EQ(big.buf[0], 4096 * 4 / kPrefillWideRows);
  Planned small = Plan({{4, 32768}}, Config(false));
  EXPECT_GT(small.buf[0], 1);
  EXPECT_LE(small.buf[0], (132 * 2 + 7) / 8);
  EXPECT_EQ(small.buf[1], 1);
}

TEST(PrefillPlan, DecodesAreInterleavedWithChunkTiles) {
  std::vector<Req> reqs = {{2048, 4096}};
  for (int i = 0; i < 128; ++i) reqs.push_back({1, 4096});
  Planned p = Plan(reqs, Config(false));
  const int chunk_tiles = 2048 * 4 / kPrefillWideRows;
  ASSERT_EQ(p.buf[0], chunk_tiles + 128);
  // The first half of the items holds about half of the decodes, not all or none of them.
  const int half = (chunk_tiles + 128) / 2;
  int narrow_in_first_half = 0;
  for (int i = 0; i < half; ++i) narrow_in_first_half += p.item(i)[1] == 1;
  EXPECT_GT(narrow_in_first_half, 64 - 24);
  EXPECT_LT(narrow_in_first_half, 64 + 24);
}

TEST(PrefillPlan, DeterministicItemsDependOnTheRequestAlone) {
  const PrefillPlanConfig cfg = Config(true);
  auto items_of = [](const Planned& p, int q_start, int page_off) {
    std::vector<std::vector<int32_t>> v;
    for (int i = 0; i < p.buf[0]; ++i) {
      const int32_t* it = p.item(i);
      if (it[0] != q_start) continue;
      EXPECT_EQ(it[6], page_off);
      v.push_back({it[1], it[2], it[3], it[4], it[5]});
    }
    std::sort(v.begin(), v.end());
    return v;
  };
  Planned alone = Plan({{464, 2000}}, cfg);
  std::vector<Req> mixed;
  for (int i = 0; i < 50; ++i) mixed.push_back({1, 100 + 37 * i});
  mixed.push_back({464, 2000});
  mixed.push_back({512, 1024});
  Planned in_batch = Plan(mixed, cfg);
  EXPECT_EQ(items_of(alone, 0, 0), items_of(in_batch, in_batch.qo_indptr[50], in_batch.kv_indptr[50]));
}

TEST(PrefillPlan, RejectsMoreQueriesThanKeysAndOverfullLayouts) {
  std::vector<int32_t> qo = {0, 10}, kv = {5}, kvi = {0, 1};
  PrefillPlanConfig cfg = Config(false);
  PrefillPlanLayout layout = MakePrefillPlanLayout(1, 10, 5, cfg);
  std::vector<int32_t> buf(layout.TotalInts());
  std::string err;
  EXPECT_FALSE(PlanPrefill(qo.data(), kv.data(), kvi.data(), 1, cfg, layout, buf.data(), &err));
  EXPECT_NE(err.find("queries"), std::string::npos);
  EXPECT_FALSE(PlanPrefill(qo.data(), kv.data(), kvi.data(), 2, cfg, layout, buf.data(), &err));
  // Empty batch and zero-length requests plan to nothing.
  std::vector<int32_t> qo0 = {0, 0}, kv0 = {0};
  EXPECT_TRUE(PlanPrefill(qo0.data(), kv0.data(), kvi.data(), 1, cfg, layout, buf.data(), &err));
  EXPECT_EQ(buf[0], 0);
}

// Each buffer of the workspace, in bytes, straight from the layout: a partial slot holds a wide
// tile's rows of every kv head. More requests, queries or keys need more.
TEST(PrefillPlan, WorkspaceSizesFollowTheLayout) {
  const PrefillPlanConfig cfg = Config(true);
  const PrefillPlanLayout small = MakePrefillPlanLayout(8, 4096, 8192, cfg);
  const PrefillWorkspaceSizes w = PrefillWorkspaceFor(small, 8, 128);
  EXPECT_EQ(w.plan_bytes, small.TotalInts() * 4);
  EXPECT_EQ(w.partial_out_bytes, small.max_partials * 8 * kPrefillWideRows * 128 * 4);
  EXPECT_EQ(w.partial_lse_bytes, small.max_partials * 8 * kPrefillWideRows * 4);
  EXPECT_EQ(w.counter_bytes, 2 * 4);  // the Hopper kernel's two work counters
  EXPECT_EQ(w.Total(),
            w.plan_bytes + w.partial_out_bytes + w.partial_lse_bytes + w.counter_bytes);
  for (const PrefillPlanLayout& bigger :
       {MakePrefillPlanLayout(64, 4096, 8192, cfg), MakePrefillPlanLayout(8, 16384, 8192, cfg),
        MakePrefillPlanLayout(8, 4096, 65536, cfg)}) {
    const PrefillWorkspaceSizes b = PrefillWorkspaceFor(bigger, 8, 128);
    EXPECT_GT(b.plan_bytes, w.plan_bytes);
    EXPECT_GT(b.partial_out_bytes, w.partial_out_bytes);
    EXPECT_GT(b.partial_lse_bytes, w.partial_lse_bytes);
    EXPECT_GT(b.Total(), w.Total());
  }
}

// The partial slots fit the budget; the items and merges (the plan) are not capped, and a
// budget above what the layout needs changes nothing.
TEST(PrefillPlan, WorkspaceFitCapsThePartialSlotsToTheBudget) {
  const PrefillPlanConfig cfg = Config(true);
  const int64_t kv = 8, dim = 128, slot_bytes = kv * kPrefillWideRows * (dim + 1) * 4;
  const PrefillPlanLayout full = MakePrefillPlanLayout(8, 4096, 65536, cfg);
  ASSERT_GT(full.max_partials, 10);
  const int64_t budget = slot_bytes * 10 + slot_bytes - 1;
  const PrefillPlanLayout fit = FitPrefillPlanLayout(8, 4096, 65536, cfg, kv, dim, budget);
  EXPECT_EQ(fit.max_partials, 10);
  EXPECT_EQ(fit.max_batch, full.max_batch);
  EXPECT_EQ(fit.max_items, full.max_items);
  EXPECT_EQ(fit.max_merges, full.max_merges);
  const PrefillWorkspaceSizes w = PrefillWorkspaceFor(fit, kv, dim);
  EXPECT_LE(w.partial_out_bytes + w.partial_lse_bytes, budget);
  EXPECT_EQ(FitPrefillPlanLayout(8, 4096, 65536, cfg, kv, dim, int64_t{1} << 40).max_partials,
            full.max_partials);
  // A plan that needs more slots than the cap is refused, not written past the buffers.
  std::vector<int32_t> qo = {0, 4096}, lens = {65536}, kvi = {0, 4096};
  std::vector<int32_t> buf(fit.TotalInts());
  std::string err;
  EXPECT_FALSE(PlanPrefill(qo.data(), lens.data(), kvi.data(), 1, cfg, fit, buf.data(), &err));
  EXPECT_NE(err.find("partial slots"), std::string::npos) << err;
}

}  // namespace
}  // namespace attnd::kernels
