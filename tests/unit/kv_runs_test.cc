// The runs a KV pull copies: applied to random pools with shuffled page tables, they must move
// exactly the pulled (layer, token, head) elements to their places and nothing else; and they
// must be few (merged wherever both sides are contiguous).
#include "server/engine/kv_runs.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace attnd {
namespace {

using kernels::DType;
using kernels::KvCacheShape;
using kernels::KvLayout;

KvCacheShape Shape(int64_t layers, int64_t pages, int64_t heads, KvLayout layout,
                   int64_t page_size = 4, int64_t dim = 8) {
  KvCacheShape s;
  s.num_layers = layers;
  s.num_pages = pages;
  s.page_size = page_size;
  s.num_kv_heads = heads;
  s.head_dim = dim;
  s.layout = layout;
  s.dtype = DType::kBFloat16;
  return s;
}

std::vector<int32_t> ShuffledPages(int64_t pool_pages, int64_t n, std::mt19937& rng) {
  std::vector<int32_t> all(static_cast<size_t>(pool_pages));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(static_cast<size_t>(n));
  return all;
}

// Applies the runs to random 16-bit pools and checks every destination element.
void CheckAgainstElementwiseCopy(const KvCacheShape& src, const KvCacheShape& dst,
                                 const KvPullShape& pull, std::mt19937& rng) {
  const int64_t pages = (pull.num_tokens + src.page_size - 1) / src.page_size;
  const std::vector<int32_t> sp = ShuffledPages(src.num_pages, pages, rng);
  const std::vector<int32_t> dp = ShuffledPages(dst.num_pages, pages, rng);
  auto runs = PlanPullRuns(src, dst, pull, sp, dp);
  ASSERT_TRUE(runs.ok()) << runs.status();
  std::vector<uint16_t> a(static_cast<size_t>(src.TotalElems()));
  for (auto& x : a) x = static_cast<uint16_t>(rng());
  const uint16_t kPoison = 0xdead;
  std::vector<uint16_t> b(static_cast<size_t>(dst.TotalElems()), kPoison);
  for (const PageRun& r : *runs) {
    ASSERT_LE(r.src_offset + r.bytes, a.size() * 2);
    ASSERT_LE(r.dst_offset + r.bytes, b.size() * 2);
    std::memcpy(reinterpret_cast<char*>(b.data()) + r.dst_offset,
                reinterpret_cast<const char*>(a.data()) + r.src_offset, r.bytes);
  }
  std::vector<uint16_t> want(b.size(), kPoison);
  for (int64_t l = pull.layer_begin; l < pull.layer_end; ++l)
    for (int64_t t = 0; t < pull.num_tokens; ++t)
      for (int kv = 0; kv < 2; ++kv)
        for (int64_t h = pull.head_begin; h < pull.head_end; ++h)
          for (int64_t d = 0; d < src.head_dim; ++d) {
            const int64_t page = t / src.page_size, slot = t % src.page_size;
            want[dst.Offset(pull.dst_layer_begin + l - pull.layer_begin, dp[page], kv, slot,
                            h - pull.head_begin) + d] =
                a[src.Offset(l, sp[page], kv, slot, h) + d];
          }
  ASSERT_EQ(b, want);
}

TEST(KvRunsTest, RunsMoveExactlyThePulledElementsForRandomShapes) {
  std::mt19937 rng(20261129);
  for (int trial = 0; trial < 200; ++trial) {
    const KvLayout layout = trial % 2 ? KvLayout::kHND : KvLayout::kNHD;
    const int64_t src_heads = 1 + rng() % 8;
    const int64_t h0 = rng() % src_heads;
    const int64_t h1 = h0 + 1 + rng() % (src_heads - h0);
    const int64_t ps = 1 + rng() % 6;
    const int64_t layers = 1 + rng() % 3;
    KvPullShape pull;
    pull.layer_begin = rng() % layers;
    pull.layer_end = pull.layer_begin + 1 + rng() % (layers - pull.layer_begin);
    pull.dst_layer_begin = rng() % 2;
    pull.head_begin = h0;
    pull.head_end = h1;
    pull.num_tokens = 1 + rng() % 30;
    const KvCacheShape src = Shape(layers, 16, src_heads, layout, ps, 4);
    const KvCacheShape dst =
        Shape(pull.dst_layer_begin + pull.layer_end - pull.layer_begin + rng() % 2, 12, h1 - h0,
              layout, ps, 4);
    SCOPED_TRACE(testing::Message() << "trial " << trial);
    CheckAgainstElementwiseCopy(src, dst, pull, rng);
  }
}

TEST(KvRunsTest, AWholeSequenceIsOneRunPerLayerAndPageWhenPagesAreScattered) {
  const KvCacheShape s = Shape(3, 64, 4, KvLayout::kNHD);
  const KvPullShape pull{0, 3, 0, 0, 4, 4 * 10};  // 10 full pages
  const std::vector<int32_t> sp = {5, 9, 1, 40, 33, 2, 7, 60, 11, 20};
  const std::vector<int32_t> dp = {8, 3, 50, 12, 0, 41, 6, 19, 30, 44};
  auto runs = PlanPullRuns(s, s, pull, sp, dp);
  ASSERT_TRUE(runs.ok());
  EXPECT_EQ(runs->size(), 3u * 10u);  // K and V of a page are adjacent on both sides
}

TEST(KvRunsTest, PagesConsecutiveOnBothSidesMergeIntoOneRunPerLayer) {
  const KvCacheShape s = Shape(2, 64, 4, KvLayout::kHND);
  const KvPullShape pull{0, 2, 0, 0, 4, 4 * 16};
  std::vector<int32_t> sp(16), dp(16);
  std::iota(sp.begin(), sp.end(), 3);
  std::iota(dp.begin(), dp.end(), 40);
  auto runs = PlanPullRuns(s, s, pull, sp, dp);
  ASSERT_TRUE(runs.ok());
  EXPECT_EQ(runs->size(), 2u);
}

TEST(KvRunsTest, AnHndHeadRangeIsOneRunPerFullPageAndKv) {
  const KvCacheShape src = Shape(1, 32, 8, KvLayout::kHND);
  const KvCacheShape dst = Shape(1, 32, 4, KvLayout::kHND);
  const KvPullShape pull{0, 1, 0, 4, 8, 4 * 5};  // 5 full pages
  const std::vector<int32_t> sp = {9, 2, 30, 14, 6}, dp = {1, 17, 5, 22, 8};
  auto runs = PlanPullRuns(src, dst, pull, sp, dp);
  ASSERT_TRUE(runs.ok());
  EXPECT_EQ(runs->size(), 5u * 2u);
}

TEST(KvRunsTest, PoolsThatDifferInPageSizeHeadDimDtypeOrLayoutAreRefusedNamingIt) {
  const KvCacheShape base = Shape(2, 8, 4, KvLayout::kNHD);
  const KvPullShape pull{0, 2, 0, 0, 4, 5};
  KvCacheShape other = base;
  other.page_size = 8;
  EXPECT_NE(CheckPullCompatible(base, other, pull).message().find("page_size"), std::string::npos);
  other = base;
  other.head_dim = 16;
  EXPECT_NE(CheckPullCompatible(base, other, pull).message().find("head_dim"), std::string::npos);
  other = base;
  other.dtype = DType::kFloat16;
  EXPECT_NE(CheckPullCompatible(base, other, pull).message().find("dtype"), std::string::npos);
  other = base;
  other.layout = KvLayout::kHND;
  EXPECT_NE(CheckPullCompatible(base, other, pull).message().find("kv_layout"), std::string::npos);
  other = base;
  other.num_kv_heads = 2;
  EXPECT_NE(CheckPullCompatible(base, other, pull).message().find("head_begin"), std::string::npos);
  EXPECT_TRUE(CheckPullCompatible(base, base, pull).ok());
}

TEST(KvRunsTest, RangesOutsideEitherModelAreRefusedNamingTheField) {
  const KvCacheShape s = Shape(2, 8, 4, KvLayout::kNHD);
  EXPECT_NE(CheckPullCompatible(s, s, {0, 3, 0, 0, 4, 5}).message().find("layer_end"),
            std::string::npos);
  EXPECT_NE(CheckPullCompatible(s, s, {0, 2, 1, 0, 4, 5}).message().find("dst_layer_begin"),
            std::string::npos);
  EXPECT_NE(CheckPullCompatible(s, s, {0, 2, 0, 2, 6, 5}).message().find("head_end"),
            std::string::npos);
  EXPECT_NE(CheckPullCompatible(s, s, {0, 2, 0, 0, 4, 0}).message().find("num_tokens"),
            std::string::npos);
}

TEST(KvRunsTest, PageIdsOutsideEitherPoolAreRefused) {
  const KvCacheShape s = Shape(1, 8, 4, KvLayout::kNHD);
  const KvPullShape pull{0, 1, 0, 0, 4, 8};
  EXPECT_FALSE(PlanPullRuns(s, s, pull, std::vector<int32_t>{0, 8}, std::vector<int32_t>{0, 1}).ok());
  EXPECT_FALSE(PlanPullRuns(s, s, pull, std::vector<int32_t>{0, 1}, std::vector<int32_t>{-1, 1}).ok());
  EXPECT_FALSE(PlanPullRuns(s, s, pull, std::vector<int32_t>{0}, std::vector<int32_t>{0, 1}).ok());
}

}  // namespace
}  // namespace attnd
