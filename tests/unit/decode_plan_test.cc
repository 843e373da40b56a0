// CPU test of the split-KV planner (runs in CI, no GPU).
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

}  // namespace
}  // namespace attnd::kernels
