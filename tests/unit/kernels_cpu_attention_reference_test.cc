// Tests of kernels/cpu_attention.h: the fp64 reference attention itself, against dense math
// written out here (a hand-written softmax, and uniform keys whose output is a plain mean), and
// its reading of an fp8 pool against an fp32 pool of the dequantized values.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cpu_attention.h"
#include "kernels/paged_kv.h"
#include "tests/unit/kernels_cpu_attention_test_util.h"

namespace attnd::kernels::cpu_attention_test_util {
namespace {

// ---------------------------------------------------------------------------------------------
// The reference itself, against dense math written out here.

TEST(Reference, MatchesHandWrittenDenseSoftmaxOnOnePage) {
  // One sequence of 5 tokens in page 2 of layer 1 (of 2 layers, 3 pages), 2 query heads sharing
  // one kv head, head_dim 3, the last 2 positions as queries; fp32 so inputs are exact.
  KvCacheShape shape;
  shape.num_layers = 2;
  shape.num_pages = 3;
  shape.page_size = 8;
  shape.num_kv_heads = 1;
  shape.head_dim = 3;
  shape.layout = KvLayout::kHND;
  shape.dtype = DType::kFloat32;
  const double keys[5][3] = {{1, 0, 0}, {0, 1, 0}, {0, 0, 1}, {1, 1, 0}, {-1, 0.5, 2}};
  const double values[5][3] = {{1, 2, 3}, {-1, 0, 4}, {0.5, 0.5, 0.5}, {2, -2, 0}, {3, 1, -1}};
  const double queries[2][2][3] = {{{0.3, -0.2, 1.0}, {1.5, 0.0, -0.5}},
                                   {{-0.7, 0.4, 0.1}, {0.2, 0.9, 0.6}}};
  std::vector<float> pool(shape.TotalElems(), std::numeric_limits<float>::quiet_NaN());
  // Written with plain index arithmetic for HND ([layer][page][kv][head][slot][dim]), not Offset.
  for (int t = 0; t < 5; ++t) {
    for (int x = 0; x < 3; ++x) {
      const int64_t page_base = (1 * 3 + 2) * 2 * 8 * 3;
      pool[page_base + t * 3 + x] = static_cast<float>(keys[t][x]);
      pool[page_base + 8 * 3 + t * 3 + x] = static_cast<float>(values[t][x]);
    }
  }
  std::vector<float> q;
  for (auto& query : queries)
    for (auto& head : query)
      for (double x : head) q.push_back(static_cast<float>(x));
  const int32_t table[1] = {2};
  SequenceView seq{table, 5, 2};
  AttentionOptions opts;
  opts.num_qo_heads = 2;
  opts.sm_scale = 0.75f;

  std::vector<double> out, lse;
  ReferencePagedAttention(pool.data(), shape, 1, seq, opts, q.data(), &out, &lse);

  for (int i = 0; i < 2; ++i) {
    const int sees = 4 + i;  // query i is at position 3 + i and sees keys 0..3+i
    for (int h = 0; h < 2; ++h) {
      // Plain softmax, no max subtraction: the logits here are small.
      double e[5], z = 0;
      for (int j = 0; j < sees; ++j) {
        const double dot = queries[i][h][0] * keys[j][0] + queries[i][h][1] * keys[j][1] +
                           queries[i][h][2] * keys[j][2];
        e[j] = std::exp(0.75 * dot);
        z += e[j];
      }
      for (int x = 0; x < 3; ++x) {
        double want = 0;
        for (int j = 0; j < sees; ++j) want += e[j] / z * values[j][x];
        EXPECT_NEAR(out[(i * 2 + h) * 3 + x], want, 1e-6) << i << " " << h << " " << x;
      }
      EXPECT_NEAR(lse[i * 2 + h], std::log(z), 1e-6);
    }
  }
}

// Identical keys (per kv head) give every visible key the same weight: the output is the mean of
// the visible values of the query head's own kv head (h / group), and lse is the (capped) logit
// plus log(count), for causal, windowed and soft-capped attention alike.
TEST(Reference, UniformKeysGiveTheMeanOfVisibleValuesOfTheGroupsKvHead) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  constexpr int64_t kLen = 19, kQueries = 6, kDim = 16, kKvHeads = 2, kQoHeads = 4;
  for (auto [window, cap] : std::vector<std::pair<int64_t, double>>{{-1, 0}, {4, 0}, {-1, 0.5}}) {
    KvCacheShape shape;
    shape.num_layers = 1;
    shape.num_pages = 6;
    shape.page_size = 4;
    shape.num_kv_heads = kKvHeads;
    shape.head_dim = kDim;
    shape.layout = KvLayout::kHND;
    shape.dtype = DType::kFloat32;
    const auto table = ShuffledPageTable(5, shape.num_pages, rng);
    std::normal_distribution<float> dist;
    // key[head] is the one key of that kv head; k and v are [len][kv_heads][dim].
    std::vector<std::vector<float>> key(kKvHeads, std::vector<float>(kDim));
    for (auto& head : key)
      for (auto& x : head) x = dist(rng);
    std::vector<float> k, v, q;
    for (int64_t t = 0; t < kLen; ++t) {
      for (int64_t h = 0; h < kKvHeads; ++h) {
        k.insert(k.end(), key[h].begin(), key[h].end());
        for (int64_t x = 0; x < kDim; ++x) v.push_back(dist(rng));
      }
    }
    for (int64_t i = 0; i < kQueries * kQoHeads * kDim; ++i) q.push_back(dist(rng));
    std::vector<float> pool(shape.TotalElems());
    CpuAppendKv(pool.data(), shape, 0, table.data(), 0, kLen, k.data(), v.data());
    AttentionOptions opts;
    opts.num_qo_heads = kQoHeads;
    opts.sm_scale = 0.25f;
    opts.logits_soft_cap = static_cast<float>(cap);
    opts.window_left = window;
    std::vector<double> out, lse;
    ReferencePagedAttention(pool.data(), shape, 0, SequenceView{table.data(), kLen, kQueries}, opts,
                            q.data(), &out, &lse);
    SCOPED_TRACE("window " + std::to_string(window) + " cap " + std::to_string(cap));
    for (int64_t i = 0; i < kQueries; ++i) {
      const int64_t pos = kLen - kQueries + i;
      const int64_t first = window < 0 ? 0 : std::max<int64_t>(0, pos - window);
      const int64_t count = pos - first + 1;
      for (int64_t h = 0; h < kQoHeads; ++h) {
        const int64_t kvh = h / (kQoHeads / kKvHeads);
        const float* qrow = &q[(i * kQoHeads + h) * kDim];
        double logit = 0;
        for (int64_t x = 0; x < kDim; ++x) logit += static_cast<double>(qrow[x]) * key[kvh][x];
        logit *= 0.25;
        if (cap > 0) logit = cap * std::tanh(logit / cap);
        EXPECT_NEAR(lse[i * kQoHeads + h], logit + std::log(static_cast<double>(count)), 1e-9);
        for (int64_t x = 0; x < kDim; ++x) {
          double mean = 0;
          for (int64_t t = first; t <= pos; ++t) mean += v[(t * kKvHeads + kvh) * kDim + x];
          EXPECT_NEAR(out[(i * kQoHeads + h) * kDim + x], mean / count, 1e-9)
              << "query " << i << " head " << h;
        }
      }
    }
  }
}

// An fp8 pool stands for scale * code. With scales of at most 11 significant bits every such
// product is exact in float, so an fp32 pool can hold exactly those values, written here from
// the codes by Fp8Value, and the reference must give the same doubles from either pool.
TEST(Reference, ReadsAnFp8PoolAsTheLayersScalesTimesTheCodes) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  KvCacheShape fp8;
  fp8.num_layers = 2;
  fp8.num_pages = 8;
  fp8.page_size = 5;
  fp8.num_kv_heads = 2;
  fp8.head_dim = 12;
  fp8.layout = rng() % 2 ? KvLayout::kHND : KvLayout::kNHD;
  fp8.dtype = DType::kFloat32;
  fp8.storage = KvStorage::kFp8E4M3;
  KvCacheShape f32 = fp8;
  f32.storage = KvStorage::kModelDType;
  std::uniform_int_distribution<int> odd(0, 1023), octave(-8, 2), code(0, 255);
  const auto few_bit_scale = [&] { return std::ldexp(2.0f * odd(rng) + 1, octave(rng) - 10); };
  const KvScales scales{few_bit_scale(), few_bit_scale()};
  const int64_t layer = 1;

  std::vector<uint8_t> fp8_pool(fp8.TotalBytes());
  std::vector<float> f32_pool(f32.TotalElems());
  for (int64_t page = 0; page < fp8.num_pages; ++page) {
    for (int kv = 0; kv < 2; ++kv) {
      const double scale = kv == 0 ? scales.k : scales.v;
      for (int64_t slot = 0; slot < fp8.page_size; ++slot) {
        for (int64_t h = 0; h < fp8.num_kv_heads; ++h) {
          for (int64_t x = 0; x < fp8.head_dim; ++x) {
            uint8_t c = static_cast<uint8_t>(code(rng));
            if ((c & 0x7f) == 0x7f) c = 0;  // no NaN: the values must be comparable
            const int64_t at = fp8.Offset(layer, page, kv, slot, h) + x;
            fp8_pool[at] = c;
            f32_pool[at] = static_cast<float>(scale * Fp8Value(c));
            ASSERT_EQ(f32_pool[at], scale * Fp8Value(c)) << "not exact in float";
          }
        }
      }
    }
  }
  const auto table = ShuffledPageTable(6, fp8.num_pages, rng);
  const SequenceView seq{table.data(), 27, 4};
  AttentionOptions opts;
  opts.num_qo_heads = 4;
  opts.sm_scale = 0.3f;
  const auto q =
      RandomTensor(seq.num_queries * opts.num_qo_heads * fp8.head_dim, DType::kFloat32, 1.0f, rng);

  std::vector<double> from_fp8, from_f32, lse_fp8, lse_f32;
  ReferencePagedAttention(fp8_pool.data(), fp8, layer, seq, opts, q.data(), &from_fp8, &lse_fp8,
                          scales);
  ReferencePagedAttention(f32_pool.data(), f32, layer, seq, opts, q.data(), &from_f32, &lse_f32);
  EXPECT_EQ(from_fp8, from_f32);
  EXPECT_EQ(lse_fp8, lse_f32);
}

}  // namespace
}  // namespace attnd::kernels::cpu_attention_test_util
