// Tests of kernels/cpu_attention.h: the fp64 reference attention itself, against dense math
// written out here (a hand-written softmax, and uniform keys whose output is a plain mean).
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

}  // namespace
}  // namespace attnd::kernels::cpu_attention_test_util
