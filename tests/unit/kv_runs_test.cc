// The runs a KV pull copies: applied to random pools with shuffled page tables, they must move
// exactly the pulled (layer, token, head) elements to their places and nothing else; and they
// must be few (merged wherever both sides are contiguous). Pools must match to exchange pages,
// fp8 pools in their scales too; per-token pools move the pulled rows' scales with them.
#include "server/engine/kv_runs.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"

namespace attnd {
namespace {

using kernels::DType;
using kernels::KvCacheShape;
using kernels::KvLayout;
using kernels::KvScales;
using kernels::KvStorage;

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

// Applies the runs to random pools of Elem (the pools' element size) and checks every
// destination element.
template <typename Elem>
void CheckAgainstElementwiseCopy(const KvCacheShape& src, const KvCacheShape& dst,
                                 const KvPullShape& pull, std::mt19937& rng) {
  ASSERT_EQ(src.ElemBytes(), static_cast<int64_t>(sizeof(Elem)));
  const int64_t pages = (pull.num_tokens + src.page_size - 1) / src.page_size;
  const std::vector<int32_t> sp = ShuffledPages(src.num_pages, pages, rng);
  const std::vector<int32_t> dp = ShuffledPages(dst.num_pages, pages, rng);
  auto runs = PlanPullRuns(src, dst, pull, sp, dp);
  ASSERT_TRUE(runs.ok()) << runs.status();
  std::vector<Elem> a(static_cast<size_t>(src.TotalElems()));
  for (auto& x : a) x = static_cast<Elem>(rng());
  const Elem kPoison = static_cast<Elem>(0xdead);
  std::vector<Elem> b(static_cast<size_t>(dst.TotalElems()), kPoison);
  for (const PageRun& r : *runs) {
    ASSERT_LE(r.src_offset + r.bytes, a.size() * sizeof(Elem));
    ASSERT_LE(r.dst_offset + r.bytes, b.size() * sizeof(Elem));
    std::memcpy(reinterpret_cast<char*>(b.data()) + r.dst_offset,
                reinterpret_cast<const char*>(a.data()) + r.src_offset, r.bytes);
  }
  std::vector<Elem> want(b.size(), kPoison);
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

// Random shapes, layers and head ranges; fp8 pools (one byte an element) when `fp8`.
void CheckRandomShapes(bool fp8) {
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
    KvCacheShape src = Shape(layers, 16, src_heads, layout, ps, 4);
    KvCacheShape dst =
        Shape(pull.dst_layer_begin + pull.layer_end - pull.layer_begin + rng() % 2, 12, h1 - h0,
              layout, ps, 4);
    SCOPED_TRACE(testing::Message() << "trial " << trial);
    if (fp8) {
      src.storage = dst.storage = KvStorage::kFp8E4M3;
      CheckAgainstElementwiseCopy<uint8_t>(src, dst, pull, rng);
    } else {
      CheckAgainstElementwiseCopy<uint16_t>(src, dst, pull, rng);
    }
  }
}

TEST(KvRunsTest, RunsMoveExactlyThePulledElementsForRandomShapes) { CheckRandomShapes(false); }

// Offsets count pool elements: an fp8 pool's runs are in bytes of one-byte elements, though
// the model (and so shape.dtype) is bf16.
TEST(KvRunsTest, RunsOfFp8PoolsMoveExactlyThePulledBytesForRandomShapes) {
  CheckRandomShapes(true);
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

TEST(KvRunsTest, PoolsThatDifferInStorageAreRefusedNamingKvCacheDtype) {
  KvCacheShape model = Shape(2, 8, 4, KvLayout::kNHD);
  KvCacheShape fp8 = model;
  fp8.storage = KvStorage::kFp8E4M3;
  const KvPullShape pull{0, 2, 0, 0, 4, 5};
  for (const auto& [src, dst] : {std::pair{model, fp8}, std::pair{fp8, model}}) {
    const absl::Status s = CheckPullCompatible(src, dst, pull);
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "kv_cache_dtype")) << s;
  }
  EXPECT_TRUE(CheckPullCompatible(fp8, fp8, pull).ok());
}

// ---- per-token pools: the scales after the pages move with the pulled rows ----

// Applies the runs to a source pool of random bytes and a poisoned destination (both of
// TotalBytes(): pages, padding, scales) and checks every destination byte: the pulled rows' codes
// and their f32 scales where the destination keeps them, poison everywhere else.
void CheckPerTokenAgainstElementwiseCopy(const KvCacheShape& src, const KvCacheShape& dst,
                                         const KvPullShape& pull, std::mt19937& rng) {
  const int64_t pages = (pull.num_tokens + src.page_size - 1) / src.page_size;
  const std::vector<int32_t> sp = ShuffledPages(src.num_pages, pages, rng);
  const std::vector<int32_t> dp = ShuffledPages(dst.num_pages, pages, rng);
  auto runs = PlanPullRuns(src, dst, pull, sp, dp);
  ASSERT_TRUE(runs.ok()) << runs.status();
  std::vector<uint8_t> a(static_cast<size_t>(src.TotalBytes()));
  for (auto& x : a) x = static_cast<uint8_t>(rng());
  constexpr uint8_t kPoison = 0xa5;
  std::vector<uint8_t> b(static_cast<size_t>(dst.TotalBytes()), kPoison);
  for (const PageRun& r : *runs) {
    ASSERT_LE(r.src_offset + r.bytes, a.size());
    ASSERT_LE(r.dst_offset + r.bytes, b.size());
    std::memcpy(b.data() + r.dst_offset, a.data() + r.src_offset, r.bytes);
  }
  std::vector<uint8_t> want(b.size(), kPoison);
  for (int64_t l = pull.layer_begin; l < pull.layer_end; ++l) {
    const int64_t dl = pull.dst_layer_begin + l - pull.layer_begin;
    for (int64_t t = 0; t < pull.num_tokens; ++t) {
      const int64_t page = t / src.page_size, slot = t % src.page_size;
      for (int kv = 0; kv < 2; ++kv) {
        for (int64_t h = pull.head_begin; h < pull.head_end; ++h) {
          const int64_t dh = h - pull.head_begin;
          for (int64_t d = 0; d < src.head_dim; ++d)
            want[dst.Offset(dl, dp[page], kv, slot, dh) + d] =
                a[src.Offset(l, sp[page], kv, slot, h) + d];
          const int64_t from = src.ScalesByteOffset() + 4 * src.ScaleOffset(l, sp[page], kv, slot, h);
          const int64_t to = dst.ScalesByteOffset() + 4 * dst.ScaleOffset(dl, dp[page], kv, slot, dh);
          std::memcpy(want.data() + to, a.data() + from, 4);
        }
      }
    }
  }
  ASSERT_EQ(b, want);
}

TEST(KvRunsTest, RunsOfPerTokenPoolsMoveExactlyThePulledRowsAndTheirScalesForRandomShapes) {
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937 rng(seed);
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
    KvCacheShape src = Shape(layers, 16, src_heads, layout, ps, 4);
    KvCacheShape dst =
        Shape(pull.dst_layer_begin + pull.layer_end - pull.layer_begin + rng() % 2, 12, h1 - h0,
              layout, ps, 4);
    src.storage = dst.storage = KvStorage::kFp8E4M3PerToken;
    SCOPED_TRACE(testing::Message() << "trial " << trial);
    CheckPerTokenAgainstElementwiseCopy(src, dst, pull, rng);
  }
}

// An HND head range (4 of 8 heads) over 4 full pages and a partial one, pages scattered: the
// K/V rows take one run per full page and K/V plus one per head and K/V of the last page, and the
// scales the same again ([kv][head][slot]: a full page's head range is contiguous, the last
// page's rows of each head are).
TEST(KvRunsTest, APerTokenPullAddsOneScaleRunPerFullPageAndKvAndOnePerHeadOfTheLastPage) {
  KvCacheShape src = Shape(1, 32, 8, KvLayout::kHND);
  KvCacheShape dst = Shape(1, 32, 4, KvLayout::kHND);
  src.storage = dst.storage = KvStorage::kFp8E4M3PerToken;
  const int64_t full_pages = 4, heads = 4;
  const KvPullShape pull{0, 1, 0, 4, 8, 4 * full_pages + 3};
  const std::vector<int32_t> sp = {9, 2, 30, 14, 6}, dp = {1, 17, 5, 22, 8};
  auto runs = PlanPullRuns(src, dst, pull, sp, dp);
  ASSERT_TRUE(runs.ok()) << runs.status();
  const size_t kv_runs = 2 * (full_pages + heads);
  EXPECT_EQ(runs->size(), 2 * kv_runs);
  uint64_t scale_bytes = 0;
  for (const PageRun& r : *runs)
    if (r.src_offset >= static_cast<uint64_t>(src.ScalesByteOffset())) scale_bytes += r.bytes;
  EXPECT_EQ(scale_bytes, 4u * 2 * heads * pull.num_tokens);
}

TEST(KvRunsTest, PoolsThatDifferInPerTokenScalesAreRefusedNamingBothStorages) {
  KvCacheShape fp8 = Shape(2, 8, 4, KvLayout::kNHD);
  fp8.storage = KvStorage::kFp8E4M3;
  KvCacheShape token = fp8;
  token.storage = KvStorage::kFp8E4M3PerToken;
  const KvPullShape pull{0, 2, 0, 0, 4, 5};
  const std::string names[2] = {"fp8_e4m3", "fp8_per_token"};
  for (const auto& [src, dst] : {std::pair{fp8, token}, std::pair{token, fp8}}) {
    const absl::Status s = CheckPullCompatible(src, dst, pull);
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "kv_cache_dtype")) << s;
    const bool token_source = src.TokenScales();
    EXPECT_TRUE(absl::StrContains(s.message(), "the source's pool stores " + names[token_source]))
        << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "this server's " + names[!token_source])) << s;
  }
  EXPECT_TRUE(CheckPullCompatible(token, token, pull).ok());
}

// ---- fp8 scales ----

std::vector<KvScales> RandomScales(std::mt19937& rng, size_t n) {
  std::uniform_real_distribution<float> exponent(-6.0f, 3.0f);
  std::vector<KvScales> scales(n);
  for (KvScales& s : scales) s = {std::exp2(exponent(rng)), std::exp2(exponent(rng))};
  return scales;
}

TEST(KvRunsTest, EqualScalesAtTheLayersAPullFillsAreAccepted) {
  std::mt19937 rng(20261130);
  for (int trial = 0; trial < 50; ++trial) {
    const std::vector<KvScales> src_all = RandomScales(rng, 6);
    const int64_t begin = rng() % 6, count = 1 + rng() % (6 - begin);
    const int64_t dst_begin = rng() % 3;
    // The destination's other layers differ: only the filled ones count.
    std::vector<KvScales> dst = RandomScales(rng, static_cast<size_t>(dst_begin + count + 2));
    std::copy(src_all.begin() + begin, src_all.begin() + begin + count, dst.begin() + dst_begin);
    const std::vector<KvScales> src(src_all.begin() + begin, src_all.begin() + begin + count);
    EXPECT_TRUE(CheckPullScales(src, begin, dst, dst_begin).ok()) << "trial " << trial;
  }
}

TEST(KvRunsTest, AScaleThatDiffersAtAFilledLayerIsRefusedNamingBothLayersAndValues) {
  std::mt19937 rng(20261131);
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t count = 1 + rng() % 4, src_begin = rng() % 3, dst_begin = rng() % 3;
    const std::vector<KvScales> src = RandomScales(rng, static_cast<size_t>(count));
    std::vector<KvScales> dst = RandomScales(rng, static_cast<size_t>(dst_begin + count));
    std::copy(src.begin(), src.end(), dst.begin() + dst_begin);
    const int64_t at = rng() % count;
    const bool k = trial % 2 == 0;
    float& changed = k ? dst[dst_begin + at].k : dst[dst_begin + at].v;
    // One ulp apart: equal scales are equal bits; printing rounds, comparing must not.
    changed = trial % 4 < 2 ? std::nextafter(changed, 1e9f) : changed * 2.0f;
    const absl::Status s = CheckPullScales(src, src_begin, dst, dst_begin);
    SCOPED_TRACE(testing::Message() << "trial " << trial << ": " << s);
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_TRUE(absl::StartsWith(s.message(), k ? "k_scale: " : "v_scale: "));
    const float want = k ? src[at].k : src[at].v;
    EXPECT_TRUE(absl::StrContains(
        s.message(), absl::StrFormat("the source's layer %d has %.9g", src_begin + at, want)));
    EXPECT_TRUE(absl::StrContains(
        s.message(), absl::StrFormat("this server's layer %d has %.9g", dst_begin + at, changed)));
  }
}

TEST(KvRunsTest, ScalesForLayersPastTheDestinationsAreRefused) {
  const std::vector<KvScales> src(3), dst(4);
  EXPECT_EQ(CheckPullScales(src, 0, dst, 2).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(CheckPullScales(src, 0, dst, 1).ok());
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
