// Tests of kernels/cpu_attention.h: dtype conversions, the paged append, the fp32 CPU attention
// against the fp64 reference, and the reference against hand-written dense softmax.
//
// Expected values are always computed here by independent means (ldexp formulas, brute-force
// nearest search, dense softmax), never hard-coded. Random cases draw a fresh seed from
// std::random_device and print it on failure.
//
// One executable, kernels_cpu_attention_test, by topic: this file holds the CPU attention against
// the fp64 reference and its edge behaviour; kernels_cpu_attention_conversions_test.cc,
// kernels_cpu_attention_append_test.cc and kernels_cpu_attention_reference_test.cc the rest, with
// the shared helpers in kernels_cpu_attention_test_util.h.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "kernels/cpu_attention.h"
#include "kernels/paged_kv.h"
#include "tests/unit/kernels_cpu_attention_fixture.h"
#include "tests/unit/kernels_cpu_attention_test_util.h"

namespace attnd::kernels::cpu_attention_test_util {
namespace {

// ---------------------------------------------------------------------------------------------
// CPU attention against the fp64 reference (the cases and their fixture are in
// kernels_cpu_attention_fixture.h).

class CpuVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(CpuVsReference, MatchesWithinOutputRounding) { ExpectMatchesReference(GetParam()); }

std::vector<Case> DtypeLayoutCases() {
  std::vector<Case> cases;
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (KvLayout l : {KvLayout::kNHD, KvLayout::kHND}) {
      for (int64_t n : {1, 7}) {
        Case c;
        c.dtype = t;
        c.layout = l;
        c.num_queries = n;
        cases.push_back(c);
      }
    }
  }
  return cases;
}
INSTANTIATE_TEST_SUITE_P(DtypesAndLayouts, CpuVsReference, ::testing::ValuesIn(DtypeLayoutCases()),
                         CaseName);

// Lengths around the page boundary: 1, page_size - 1, page_size, page_size + 1, two pages + 1.
std::vector<Case> PageSizeCases() {
  std::vector<Case> cases;
  for (int64_t ps : {1, 3, 16, 64}) {
    std::vector<int64_t> lengths = {1, ps - 1, ps, ps + 1, 2 * ps + 1};
    std::sort(lengths.begin(), lengths.end());
    lengths.erase(std::unique(lengths.begin(), lengths.end()), lengths.end());
    for (int64_t len : lengths) {
      if (len < 1) continue;
      for (KvLayout l : {KvLayout::kNHD, KvLayout::kHND}) {
        Case c;
        c.dtype = DType::kFloat32;
        c.layout = l;
        c.page_size = ps;
        c.head_dim = 64;
        c.group = 2;
        c.kv_len = len;
        c.num_queries = std::min<int64_t>(len, 3);
        cases.push_back(c);
      }
    }
  }
  return cases;
}
INSTANTIATE_TEST_SUITE_P(PageSizesAndLengths, CpuVsReference, ::testing::ValuesIn(PageSizeCases()),
                         CaseName);

// 64/128/256 are the served sizes; 13 and 72 exercise the vector loops' scalar tails.
std::vector<Case> HeadDimCases() {
  std::vector<Case> cases;
  for (int64_t d : {13, 64, 72, 128, 256}) {
    for (DType t : {DType::kFloat32, DType::kFloat16}) {
      Case c;
      c.dtype = t;
      c.head_dim = d;
      c.kv_len = 77;
      c.num_queries = 5;
      cases.push_back(c);
    }
  }
  return cases;
}
INSTANTIATE_TEST_SUITE_P(HeadDims, CpuVsReference, ::testing::ValuesIn(HeadDimCases()), CaseName);

std::vector<Case> GqaCases() {
  std::vector<Case> cases;
  for (int64_t g : {1, 4, 8}) {
    for (int64_t n : {1, 5}) {
      for (KvLayout l : {KvLayout::kNHD, KvLayout::kHND}) {
        Case c;
        c.dtype = DType::kFloat32;
        c.layout = l;
        c.group = g;
        c.kv_heads = 2;
        c.kv_len = 50;
        c.num_queries = n;
        cases.push_back(c);
      }
    }
  }
  return cases;
}
INSTANTIATE_TEST_SUITE_P(GqaGroups, CpuVsReference, ::testing::ValuesIn(GqaCases()), CaseName);

// Decode over long sequences: many key chunks, so the online rescaling is exercised.
std::vector<Case> LongCases() {
  std::vector<Case> cases;
  for (DType t : {DType::kFloat32, DType::kBFloat16}) {
    for (int64_t len : {1000, 1037}) {
      Case c;
      c.dtype = t;
      c.group = 8;
      c.kv_len = len;
      c.layout = len == 1000 ? KvLayout::kNHD : KvLayout::kHND;
      cases.push_back(c);
    }
  }
  Case wide;
  wide.dtype = DType::kFloat16;
  wide.head_dim = 256;
  wide.page_size = 64;
  wide.kv_len = 999;
  cases.push_back(wide);
  return cases;
}
INSTANTIATE_TEST_SUITE_P(LongSequences, CpuVsReference, ::testing::ValuesIn(LongCases()), CaseName);

// Many new queries: a whole prompt, a chunk of a prompt after a cached prefix, and counts that
// straddle the CPU kernel's query tiles.
std::vector<Case> PrefillCases() {
  std::vector<Case> cases;
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {200, 200}, {1000, 64}, {70, 33}, {40, 40}};
  for (auto [len, n] : shapes) {
    for (DType t : {DType::kFloat32, DType::kBFloat16}) {
      Case c;
      c.dtype = t;
      c.kv_len = len;
      c.num_queries = n;
      c.group = len == 1000 ? 4 : 1;
      c.page_size = len == 70 ? 3 : 16;
      c.layout = t == DType::kFloat32 ? KvLayout::kHND : KvLayout::kNHD;
      cases.push_back(c);
    }
  }
  return cases;
}
INSTANTIATE_TEST_SUITE_P(Prefill, CpuVsReference, ::testing::ValuesIn(PrefillCases()), CaseName);

// Raw logits with standard deviation sqrt(head_dim) against a cap of 10, so tanh saturates for
// many keys and an implementation without the cap would fail.
std::vector<Case> SoftCapCases() {
  std::vector<Case> cases;
  for (DType t : {DType::kFloat32, DType::kBFloat16}) {
    for (int64_t n : {1, 20}) {
      Case c;
      c.dtype = t;
      c.head_dim = 64;
      c.sm_scale = 1.0f;
      c.soft_cap = 10.0f;
      c.kv_len = 300;
      c.num_queries = n;
      cases.push_back(c);
    }
  }
  return cases;
}
INSTANTIATE_TEST_SUITE_P(SoftCap, CpuVsReference, ::testing::ValuesIn(SoftCapCases()), CaseName);

std::vector<Case> WindowCases() {
  std::vector<Case> cases;
  for (int64_t w : {0, 1, 15, 100}) {
    for (int64_t n : {1, 40}) {
      Case c;
      c.dtype = DType::kFloat32;
      c.page_size = 3;
      c.window = w;
      c.kv_len = 300;
      c.num_queries = n;
      c.layout = w % 2 ? KvLayout::kHND : KvLayout::kNHD;
      cases.push_back(c);
    }
  }
  Case capped;
  capped.dtype = DType::kBFloat16;
  capped.window = 31;
  capped.soft_cap = 20.0f;
  capped.sm_scale = 0.5f;
  capped.kv_len = 500;
  capped.num_queries = 70;
  cases.push_back(capped);
  return cases;
}
INSTANTIATE_TEST_SUITE_P(SlidingWindow, CpuVsReference, ::testing::ValuesIn(WindowCases()),
                         CaseName);

// Logits spread over tens of units (stddev 3 inputs): the softmax is dominated by few keys and
// exp() of unshifted logits would overflow float.
std::vector<Case> PeakedCases() {
  Case c;
  c.dtype = DType::kFloat32;
  c.stddev = 3.0f;
  c.sm_scale = 1.0f;
  c.head_dim = 64;
  c.kv_len = 500;
  c.num_queries = 8;
  return {c};
}
INSTANTIATE_TEST_SUITE_P(PeakedSoftmax, CpuVsReference, ::testing::ValuesIn(PeakedCases()),
                         CaseName);

// fp8 pools with per-layer scales (random per call).
INSTANTIATE_TEST_SUITE_P(Fp8Pool, CpuVsReference,
                         ::testing::ValuesIn(Fp8Cases(KvStorage::kFp8E4M3)), CaseName);

// ---------------------------------------------------------------------------------------------
// CPU attention edge behaviour.

TEST(CpuPagedAttention, NullLseIsAllowedAndGivesTheSameOutput) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  Case c;
  c.num_queries = 9;
  Fixture f(c, rng);
  std::vector<uint8_t> with(f.OutElems() * 2), without(f.OutElems() * 2);
  std::vector<float> lse(c.num_queries * f.opts.num_qo_heads);
  CpuPagedAttention(f.pool.data(), f.shape, f.layer, f.seq, f.opts, f.q.data(), with.data(),
                    lse.data());
  CpuPagedAttention(f.pool.data(), f.shape, f.layer, f.seq, f.opts, f.q.data(), without.data(),
                    nullptr);
  EXPECT_EQ(with, without);
}

TEST(CpuPagedAttention, ZeroQueriesIsANoOp) {
  KvCacheShape shape;
  shape.num_layers = 1;
  shape.num_pages = 1;
  shape.page_size = 4;
  shape.num_kv_heads = 1;
  shape.head_dim = 8;
  AttentionOptions opts;
  opts.num_qo_heads = 1;
  opts.sm_scale = 1.0f;
  SequenceView seq;  // kv_len 0, num_queries 0, no page table
  std::vector<uint8_t> out(16, 0x5A);
  float lse = 7.0f;
  CpuPagedAttention(nullptr, shape, 0, seq, opts, nullptr, out.data(), &lse);
  EXPECT_EQ(out, std::vector<uint8_t>(16, 0x5A));
  EXPECT_EQ(lse, 7.0f);
}

// A model-dtype pool stores K and V unscaled: the scales are ignored, to the bit, by both paths.
TEST(CpuPagedAttention, ModelDTypePoolIgnoresTheScales) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  Case c;
  c.num_queries = 3;
  Fixture f(c, rng);
  const KvScales scales{3.0f, 0.25f};
  std::vector<uint8_t> plain(f.OutElems() * 2), scaled(f.OutElems() * 2);
  std::vector<float> plain_lse(c.num_queries * f.opts.num_qo_heads), scaled_lse(plain_lse.size());
  CpuPagedAttention(f.pool.data(), f.shape, f.layer, f.seq, f.opts, f.q.data(), plain.data(),
                    plain_lse.data());
  CpuPagedAttention(f.pool.data(), f.shape, f.layer, f.seq, f.opts, f.q.data(), scaled.data(),
                    scaled_lse.data(), scales);
  EXPECT_EQ(plain, scaled);
  EXPECT_EQ(plain_lse, scaled_lse);
  std::vector<double> ref_plain, ref_scaled;
  ReferencePagedAttention(f.pool.data(), f.shape, f.layer, f.seq, f.opts, f.q.data(), &ref_plain,
                          nullptr);
  ReferencePagedAttention(f.pool.data(), f.shape, f.layer, f.seq, f.opts, f.q.data(), &ref_scaled,
                          nullptr, scales);
  EXPECT_EQ(ref_plain, ref_scaled);
}

// Sanity of the quantization as a whole: the same K and V in an fp8 pool and in a bf16 pool give
// outputs apart by no more than fp8's rounding allows. One fp8 value is off by at most 2^-4 of
// itself (3 mantissa bits, nothing saturates or goes subnormal much at these scales); allow that
// once for K's effect on the weights and once for V.
TEST(CpuPagedAttention, Fp8PoolStaysWithinQuantizationErrorOfABf16Pool) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  Case c;
  c.dtype = DType::kBFloat16;
  c.kv_len = 300;
  c.num_queries = 4;
  Fixture f(c, rng);  // the bf16 pool
  KvCacheShape fp8_shape = f.shape;
  fp8_shape.storage = KvStorage::kFp8E4M3;
  std::uniform_real_distribution<float> octave(-5.0f, 1.0f);
  const KvScales scales{std::exp2(octave(rng)), std::exp2(octave(rng))};
  std::vector<uint8_t> fp8_pool(fp8_shape.TotalBytes());
  CpuAppendKv(fp8_pool.data(), fp8_shape, f.layer, f.table.data(), 0, c.kv_len, f.k.data(),
              f.v.data(), scales);

  const int64_t rows = c.num_queries * f.opts.num_qo_heads;
  std::vector<uint8_t> out_bf16(f.OutElems() * 2), out_fp8(f.OutElems() * 2);
  std::vector<float> lse_bf16(rows), lse_fp8(rows);
  CpuPagedAttention(f.pool.data(), f.shape, f.layer, f.seq, f.opts, f.q.data(), out_bf16.data(),
                    lse_bf16.data());
  CpuPagedAttention(fp8_pool.data(), fp8_shape, f.layer, f.seq, f.opts, f.q.data(), out_fp8.data(),
                    lse_fp8.data(), scales);
  std::vector<double> bf16_values(f.OutElems());
  for (int64_t i = 0; i < f.OutElems(); ++i) {
    bf16_values[i] = LoadAsFloat(out_bf16.data(), i, DType::kBFloat16);
  }
  const double error = RelativeError(out_fp8.data(), DType::kBFloat16, bf16_values);
  EXPECT_LT(error, 2 * std::ldexp(1.0, -4));
  EXPECT_GT(error, 0.0) << "an fp8 pool that matches bf16 exactly did not quantize";
  for (int64_t i = 0; i < rows; ++i) {
    EXPECT_NEAR(lse_fp8[i], lse_bf16[i], 2 * std::ldexp(1.0, -4) * (1 + std::fabs(lse_bf16[i])));
  }
}

// Queries beyond the sequence's start (num_queries > kv_len) see no key: their rows are zero and
// their lse is -inf, in the CPU path and in the reference alike.
TEST(CpuPagedAttention, QueryWithNoVisibleKeyGivesZeroAndMinusInfinityLse) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  Case c;
  c.dtype = DType::kFloat32;
  c.kv_len = 2;
  c.num_queries = 2;
  Fixture f(c, rng);
  f.seq.num_queries = 4;  // queries at positions -2, -1, 0, 1
  f.q = RandomTensor(4 * f.opts.num_qo_heads * c.head_dim, c.dtype, 1.0f, rng);
  const int64_t elems = f.OutElems();
  std::vector<float> out(elems, std::numeric_limits<float>::quiet_NaN());
  std::vector<float> lse(4 * f.opts.num_qo_heads, std::numeric_limits<float>::quiet_NaN());
  CpuPagedAttention(f.pool.data(), f.shape, f.layer, f.seq, f.opts, f.q.data(), out.data(),
                    lse.data());
  std::vector<double> ref_out, ref_lse;
  ReferencePagedAttention(f.pool.data(), f.shape, f.layer, f.seq, f.opts, f.q.data(), &ref_out,
                          &ref_lse);
  const int64_t blind = 2 * f.opts.num_qo_heads;  // rows of the two blind queries
  for (int64_t i = 0; i < blind * c.head_dim; ++i) {
    ASSERT_EQ(out[i], 0.0f) << i;
    ASSERT_EQ(ref_out[i], 0.0) << i;
  }
  for (int64_t i = 0; i < blind; ++i) {
    EXPECT_EQ(lse[i], -std::numeric_limits<float>::infinity());
    EXPECT_EQ(ref_lse[i], -std::numeric_limits<double>::infinity());
  }
  EXPECT_LT(RelativeError(out.data(), c.dtype, ref_out), 1e-5);
  ExpectLseMatches(lse, ref_lse);
}

// Head ranges run on separate threads must compose to exactly the single call's bits.
TEST(CpuPagedAttention, KvHeadRangesOnThreadsComposeToTheFullCall) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  Case c;
  c.kv_heads = 4;
  c.group = 2;
  c.kv_len = 150;
  c.num_queries = 6;
  Fixture f(c, rng);
  const int64_t bytes = f.OutElems() * 2;
  std::vector<uint8_t> whole(bytes), split(bytes);
  std::vector<float> whole_lse(c.num_queries * f.opts.num_qo_heads);
  std::vector<float> split_lse(whole_lse.size());
  CpuPagedAttention(f.pool.data(), f.shape, f.layer, f.seq, f.opts, f.q.data(), whole.data(),
                    whole_lse.data());
  std::vector<std::thread> threads;
  for (int64_t b : {0, 1, 3}) {
    const int64_t e = b == 0 ? 1 : b == 1 ? 3 : 4;
    threads.emplace_back([&, b, e] {
      CpuPagedAttentionKvHeads(f.pool.data(), f.shape, f.layer, f.seq, f.opts, f.q.data(),
                               split.data(), split_lse.data(), b, e);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(whole, split);
  EXPECT_EQ(whole_lse, split_lse);
}

}  // namespace
}  // namespace attnd::kernels::cpu_attention_test_util
