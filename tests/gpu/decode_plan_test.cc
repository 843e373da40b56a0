// CPU test of the split-KV planner (runs in CI, no GPU).
#include "kernels/decode_plan.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

namespace attnd::kernels {
namespace {

struct Plan {
  std::vector<int32_t> buf;
  DecodePlanLayout layout;
  int32_t num_items() const { return buf[0]; }
  int32_t chunk() const { return buf[1]; }
  const int32_t* indptr() const { return buf.data() + layout.IndptrOffset(); }
  const int32_t* items() const { return buf.data() + layout.ItemsOffset(); }
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

Plan MakePlan(const std::vector<int32_t>& lens, const DecodePlanConfig& cfg, int grid_x,
              int max_batch, int64_t max_items) {
  Plan p;
  p.layout.max_batch = max_batch;
  p.layout.max_items = max_items;
  p.buf.assign(p.layout.TotalInts(), -7);
  int64_t used = 0;
  std::string err;
  EXPECT_TRUE(PlanDecode(lens.data(), static_cast<int>(lens.size()), grid_x, cfg, p.layout,
                         p.buf.data(), &used, &err))
      << err;
  EXPECT_EQ(used, p.layout.UsedInts(p.num_items()));
  return p;
}

// Every visible key of every request is covered exactly once, items are request-major with
// chunks in order, and each request has at least one item.
void CheckCovers(const Plan& p, const std::vector<int32_t>& lens, int64_t window_left) {
  const int batch = static_cast<int>(lens.size());
  ASSERT_EQ(p.buf[2], batch);
  ASSERT_EQ(p.indptr()[0], 0);
  ASSERT_EQ(p.indptr()[batch], p.num_items());
  ASSERT_GT(p.chunk(), 0);
  ASSERT_EQ(p.chunk() % 64, 0);
  for (int b = 0; b < batch; ++b) {
    const int64_t vis = VisibleKeys(lens[b], window_left);
    const int n = p.indptr()[b + 1] - p.indptr()[b];
    ASSERT_GE(n, 1);
    ASSERT_EQ(n, vis == 0 ? 1 : (vis + p.chunk() - 1) / p.chunk()) << "request " << b;
    for (int c = 0; c < n; ++c) {
      const int i = p.indptr()[b] + c;
      EXPECT_EQ(p.items()[2 * i], b);
      EXPECT_EQ(p.items()[2 * i + 1], c);
    }
  }
}

TEST(DecodePlan, GridCoversBucketAndFillsDevice) {
  const DecodePlanConfig cfg = Config(false);
  EXPECT_EQ(DecodeGridX(1, cfg), 33);
  EXPECT_EQ(DecodeGridX(16, cfg), 33);
  EXPECT_EQ(DecodeGridX(64, cfg), 64);
  EXPECT_EQ(DecodeGridX(256, cfg), 256);
}

TEST(DecodePlan, SplitsSmallBatchesToFillTheGrid) {
  const DecodePlanConfig cfg = Config(false);
  const int grid = DecodeGridX(1, cfg);
  const std::vector<int32_t> lens = {4096};
  const Plan p = MakePlan(lens, cfg, grid, 1, MaxDecodeItems(1, 4096, cfg));
  CheckCovers(p, lens, -1);
  EXPECT_LE(p.num_items(), grid);
  EXPECT_EQ(p.chunk(), 128);  // 32 items of 128 keys: the smallest chunk that fits 33 CTAs
  EXPECT_EQ(p.num_items(), 32);
}

TEST(DecodePlan, LargeBatchIsNotSplit) {
  const DecodePlanConfig cfg = Config(false);
  std::vector<int32_t> lens(256, 1024);
  const int grid = DecodeGridX(256, cfg);
  const Plan p = MakePlan(lens, cfg, grid, 256, MaxDecodeItems(256, 1024, cfg));
  CheckCovers(p, lens, -1);
  EXPECT_EQ(p.num_items(), 256);
}

TEST(DecodePlan, PaddedEntriesGetOneItem) {
  const DecodePlanConfig cfg = Config(false);
  const std::vector<int32_t> lens = {0, 5, 0, 3000, 0};
  const int grid = DecodeGridX(8, cfg);
  const Plan p = MakePlan(lens, cfg, grid, 8, MaxDecodeItems(8, 4096, cfg));
  CheckCovers(p, lens, -1);
  EXPECT_LE(p.num_items(), grid);
}

TEST(DecodePlan, DeterministicChunkIgnoresTheBatch) {
  const DecodePlanConfig cfg = Config(true);
  std::mt19937 rng(1);
  std::vector<int32_t> batch(256);
  for (auto& l : batch) l = static_cast<int32_t>(rng() % 40000);
  batch[17] = 5000;
  const Plan big = MakePlan(batch, cfg, DecodeGridX(256, cfg), 256,
                            MaxDecodeItems(256, 40000, cfg));
  CheckCovers(big, batch, -1);
  const std::vector<int32_t> alone = {5000};
  const Plan one = MakePlan(alone, cfg, DecodeGridX(1, cfg), 1, MaxDecodeItems(1, 40000, cfg));
  CheckCovers(one, alone, -1);
  EXPECT_EQ(big.chunk(), one.chunk());
  EXPECT_EQ(big.indptr()[18] - big.indptr()[17], one.num_items());
  EXPECT_GT(big.num_items(), DecodeGridX(256, cfg));  // CTAs loop over items
}

TEST(DecodePlan, SlidingWindowLimitsTheWork) {
  DecodePlanConfig cfg = Config(true);
  cfg.window_left = 1000;
  const std::vector<int32_t> lens = {50000, 10, 1001, 1002};
  const Plan p = MakePlan(lens, cfg, DecodeGridX(4, cfg), 4, MaxDecodeItems(4, 50000, cfg));
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
      std::vector<int32_t> lens(batch);
      for (auto& l : lens) l = static_cast<int32_t>(rng() % (max_len + 1));
      const int grid = DecodeGridX(batch, cfg);
      const Plan p = MakePlan(lens, cfg, grid, batch, MaxDecodeItems(batch, max_len, cfg));
      CheckCovers(p, lens, cfg.window_left);
      if (!cfg.deterministic) EXPECT_LE(p.num_items(), grid);
    }
  }
}

TEST(DecodePlan, RejectsWhatDoesNotFit) {
  const DecodePlanConfig cfg = Config(true);
  DecodePlanLayout layout{2, 3};
  std::vector<int32_t> buf(layout.TotalInts());
  std::string err;
  const std::vector<int32_t> lens = {4096, 4096};
  EXPECT_FALSE(PlanDecode(lens.data(), 2, 64, cfg, layout, buf.data(), nullptr, &err));
  EXPECT_NE(err.find("max_items"), std::string::npos) << err;
  const std::vector<int32_t> three = {1, 1, 1};
  EXPECT_FALSE(PlanDecode(three.data(), 3, 64, cfg, layout, buf.data(), nullptr, &err));
  EXPECT_NE(err.find("max_batch"), std::string::npos) << err;
  EXPECT_FALSE(PlanDecode(lens.data(), 2, 1, cfg, layout, buf.data(), nullptr, &err));
  EXPECT_NE(err.find("grid_x"), std::string::npos) << err;
}

}  // namespace
}  // namespace attnd::kernels
