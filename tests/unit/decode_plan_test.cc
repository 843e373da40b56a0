// CPU test of the split-KV planner and its workspace sizes (runs in CI, no GPU).
#include "kernels/decode_plan.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

namespace attnd::kernels {
namespace {

struct Plan {
  std::vector<int32_t> buf;
  DecodePlanLayout layout;
  int32_t num_items() const { return buf[0]; }
  int32_t share() const { return buf[1]; }
  const int32_t* item_indptr() const { return buf.data() + layout.ItemIndptrOffset(); }
  const int32_t* item(int i) const { return buf.data() + layout.ItemsOffset() + 4 * i; }
};

DecodePlanConfig Config(bool det) {
  DecodePlanConfig cfg;
  cfg.num_sms = 132;
  cfg.ctas_per_sm = 2;
  cfg.kv_head_blocks = 8;
  cfg.deterministic = det;
  cfg.fixed_chunk_tokens = 1024;
  return cfg;
}

std::vector<int32_t> Indptr(const std::vector<int32_t>& lens, int page) {
  std::vector<int32_t> p(1, 0);
  for (int32_t l : lens) p.push_back(p.back() + (l + page - 1) / page);
  return p;
}

Plan MakePlan(const std::vector<int32_t>& lens, const DecodePlanConfig& cfg, int64_t max_len) {
  Plan p;
  const int batch = static_cast<int>(lens.size());
  p.layout = MakeDecodePlanLayout(batch, max_len, cfg);
  p.buf.assign(p.layout.TotalInts(), -7);
  int64_t used = 0;
  std::string err;
  const std::vector<int32_t> indptr = Indptr(lens, 16);
  EXPECT_TRUE(PlanDecode(lens.data(), indptr.data(), batch, DecodeGridX(batch, cfg), cfg,
                         p.layout, p.buf.data(), &used, &err))
      << err;
  EXPECT_EQ(used, p.layout.UsedInts(p.num_items()));
  EXPECT_EQ(p.layout.ItemsOffset() % 4, 0);
  return p;
}

// Every visible key of every request is covered exactly once, in order; items are request-major;
// columns take contiguous runs of items; every request has at least one item.
void CheckCovers(const Plan& p, const std::vector<int32_t>& lens, int64_t window_left) {
  const int batch = static_cast<int>(lens.size());
  const std::vector<int32_t> indptr = Indptr(lens, 16);
  ASSERT_EQ(p.buf[2], batch);
  ASSERT_EQ(p.item_indptr()[0], 0);
  ASSERT_EQ(p.item_indptr()[batch], p.num_items());
  for (int b = 0; b < batch; ++b) {
    const int64_t vis = VisibleKeys(lens[b], window_left);
    const int begin = p.item_indptr()[b], end = p.item_indptr()[b + 1];
    ASSERT_GE(end - begin, 1) << "request " << b;
    int64_t pos = lens[b] - vis;
    for (int i = begin; i < end; ++i) {
      EXPECT_EQ(p.item(i)[0], b);
      EXPECT_EQ(p.item(i)[1], pos) << "request " << b << " item " << i;
      EXPECT_GE(p.item(i)[2], p.item(i)[1]);
      EXPECT_EQ(p.item(i)[3], indptr[b]);
      pos = p.item(i)[2];
    }
    EXPECT_EQ(pos, lens[b]) << "request " << b;
  }
}

TEST(DecodePlan, GridCoversBucketAndFillsDevice) {
  const DecodePlanConfig cfg = Config(false);
  EXPECT_EQ(DecodeGridX(1, cfg), 33);
  EXPECT_EQ(DecodeGridX(16, cfg), 33);
  EXPECT_EQ(DecodeGridX(64, cfg), 64);
  EXPECT_EQ(DecodeGridX(256, cfg), 256);
}

TEST(DecodePlan, LargeBatchIsNotSplit) {
  const std::vector<int32_t> lens(256, 1024);
  const Plan p = MakePlan(lens, Config(false), 1024);
  CheckCovers(p, lens, -1);
  EXPECT_EQ(p.num_items(), 256);
}

TEST(DecodePlan, SmallBatchFillsTheGrid) {
  const std::vector<int32_t> lens(16, 4096);
  const Plan p = MakePlan(lens, Config(false), 4096);
  CheckCovers(p, lens, -1);
  EXPECT_EQ(p.num_items(), 32);
  EXPECT_EQ(p.share(), 2048);
}

TEST(DecodePlan, SingleRequestIsSplitAcrossTheGrid) {
  const std::vector<int32_t> lens = {4096};
  const Plan p = MakePlan(lens, Config(false), 4096);
  CheckCovers(p, lens, -1);
  EXPECT_EQ(p.share(), 128);
  EXPECT_EQ(p.num_items(), 32);
}

TEST(DecodePlan, PaddedEntriesGetOneEmptyItem) {
  const std::vector<int32_t> lens = {0, 5, 0, 3000, 0};
  const Plan p = MakePlan(lens, Config(false), 4096);
  CheckCovers(p, lens, -1);
  EXPECT_EQ(p.item_indptr()[1] - p.item_indptr()[0], 1);
  EXPECT_EQ(p.item(0)[1], p.item(0)[2]);
}

TEST(DecodePlan, DeterministicItemsIgnoreTheBatch) {
  const DecodePlanConfig cfg = Config(true);
  std::mt19937 rng(1);
  std::vector<int32_t> batch(256);
  for (auto& l : batch) l = static_cast<int32_t>(rng() % 40000);
  batch[17] = 5000;
  const Plan big = MakePlan(batch, cfg, 40000);
  CheckCovers(big, batch, -1);
  const std::vector<int32_t> alone = {5000};
  const Plan one = MakePlan(alone, cfg, 40000);
  CheckCovers(one, alone, -1);
  const int first = big.item_indptr()[17];
  ASSERT_EQ(big.item_indptr()[18] - first, one.num_items());
  for (int i = 0; i < one.num_items(); ++i) {
    EXPECT_EQ(big.item(first + i)[1], one.item(i)[1]);
    EXPECT_EQ(big.item(first + i)[2], one.item(i)[2]);
  }
}

TEST(DecodePlan, SlidingWindowLimitsTheWork) {
  DecodePlanConfig cfg = Config(true);
  cfg.window_left = 1000;
  const std::vector<int32_t> lens = {50000, 10, 1001, 1002};
  const Plan p = MakePlan(lens, cfg, 50000);
  CheckCovers(p, lens, 1000);
  EXPECT_EQ(p.num_items(), 4);
}

TEST(DecodePlan, RandomBatchesFitTheirLayout) {
  std::mt19937 rng(7);
  for (int det = 0; det < 2; ++det) {
    DecodePlanConfig cfg = Config(det != 0);
    cfg.fixed_chunk_tokens = 512;
    for (int trial = 0; trial < 200; ++trial) {
      const int batch = 1 + static_cast<int>(rng() % 300);
      const int max_len = 1 + static_cast<int>(rng() % 70000);
      cfg.window_left = (rng() % 3 == 0) ? static_cast<int64_t>(rng() % 5000) : -1;
      cfg.kv_head_blocks = 1 + static_cast<int>(rng() % 16);
      std::vector<int32_t> lens(batch);
      for (auto& l : lens) l = static_cast<int32_t>(rng() % (max_len + 1));
      const Plan p = MakePlan(lens, cfg, max_len);
      CheckCovers(p, lens, cfg.window_left);
    }
  }
}

TEST(DecodePlan, RejectsWhatDoesNotFit) {
  const DecodePlanConfig cfg = Config(true);
  DecodePlanLayout layout{2, 40};
  std::vector<int32_t> buf(layout.TotalInts());
  std::string err;
  const std::vector<int32_t> lens = {40000, 40000}, indptr = {0, 2500, 5000};
  EXPECT_FALSE(PlanDecode(lens.data(), indptr.data(), 2, 33, cfg, layout, buf.data(), nullptr, &err));
  EXPECT_NE(err.find("max_items"), std::string::npos) << err;
  const std::vector<int32_t> three = {1, 1, 1}, indptr3 = {0, 1, 2, 3};
  EXPECT_FALSE(PlanDecode(three.data(), indptr3.data(), 3, 33, cfg, layout, buf.data(), nullptr, &err));
  EXPECT_NE(err.find("max_batch"), std::string::npos) << err;
  EXPECT_FALSE(PlanDecode(lens.data(), indptr.data(), 2, 1, cfg, layout, buf.data(), nullptr, &err));
  EXPECT_NE(err.find("grid_x"), std::string::npos) << err;
}

// Each buffer of the workspace, in bytes, straight from the layout; more requests or longer
// ones need more.
TEST(DecodePlan, WorkspaceSizesFollowTheLayout) {
  const DecodePlanConfig cfg = Config(true);
  const DecodePlanLayout small = MakeDecodePlanLayout(16, 8192, cfg);
  const DecodeWorkspaceSizes w = DecodeWorkspaceFor(small, cfg, 32, 128);
  EXPECT_EQ(w.plan_bytes, small.TotalInts() * 4);
  EXPECT_EQ(w.partial_out_bytes, small.max_items * 32 * 128 * 4);
  EXPECT_EQ(w.partial_lse_bytes, small.max_items * 32 * 4);
  EXPECT_EQ(w.counter_bytes, 16 * cfg.kv_head_blocks * 4);
  EXPECT_EQ(w.Total(), w.plan_bytes + w.partial_out_bytes + w.partial_lse_bytes + w.counter_bytes);
  for (const DecodePlanLayout& bigger :
       {MakeDecodePlanLayout(64, 8192, cfg), MakeDecodePlanLayout(16, 65536, cfg)}) {
    const DecodeWorkspaceSizes b = DecodeWorkspaceFor(bigger, cfg, 32, 128);
    EXPECT_GT(b.plan_bytes, w.plan_bytes);
    EXPECT_GT(b.partial_out_bytes, w.partial_out_bytes);
    EXPECT_GT(b.partial_lse_bytes, w.partial_lse_bytes);
    EXPECT_GE(b.counter_bytes, w.counter_bytes);
    EXPECT_GT(b.Total(), w.Total());
  }
}

// The partial states (fp32 rows and lse of every query head) fit the budget; a budget above
// what the layout needs changes nothing.
TEST(DecodePlan, WorkspaceFitCapsThePartialStatesToTheBudget) {
  const DecodePlanConfig cfg = Config(true);
  const int64_t qo = 32, dim = 128, row_bytes = (qo * dim + qo) * 4;
  const DecodePlanLayout full = MakeDecodePlanLayout(8, 200000, cfg);
  ASSERT_GT(full.max_items, 2 * DecodeGridX(8, cfg));
  const int64_t budget = row_bytes * (full.max_items / 2) + row_bytes - 1;
  const DecodePlanLayout fit = FitDecodePlanLayout(8, 200000, cfg, qo, dim, budget);
  EXPECT_EQ(fit.max_batch, 8);
  EXPECT_EQ(fit.max_items, full.max_items / 2);
  const DecodeWorkspaceSizes w = DecodeWorkspaceFor(fit, cfg, qo, dim);
  EXPECT_LE(w.partial_out_bytes + w.partial_lse_bytes, budget);
  EXPECT_GT(w.partial_out_bytes + w.partial_lse_bytes, budget - row_bytes);
  EXPECT_EQ(FitDecodePlanLayout(8, 200000, cfg, qo, dim, int64_t{1} << 40).max_items,
            full.max_items);
}

// However small the budget, the layout keeps one item per grid column: the kernel reads item y
// of column y, and a non-deterministic plan of a full bucket needs them all.
TEST(DecodePlan, WorkspaceFitNeverGoesBelowTheGrid) {
  for (int max_batch : {1, 8, 700}) {
    const DecodePlanConfig cfg = Config(false);
    const DecodePlanLayout fit = FitDecodePlanLayout(max_batch, 4096, cfg, 32, 128, 0);
    EXPECT_EQ(fit.max_items, DecodeGridX(max_batch, cfg)) << max_batch;
    const std::vector<int32_t> lens(max_batch, 4096);
    const std::vector<int32_t> indptr = Indptr(lens, 16);
    std::vector<int32_t> buf(fit.TotalInts());
    std::string err;
    EXPECT_TRUE(PlanDecode(lens.data(), indptr.data(), max_batch, DecodeGridX(max_batch, cfg), cfg,
                           fit, buf.data(), nullptr, &err))
        << err;
  }
}

}  // namespace
}  // namespace attnd::kernels
