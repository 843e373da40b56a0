// Tests of kernels/cpu_attention.h on kFp8E4M3PerToken pools: append quantizes each (token, kv
// head) row of K and of V with its own scale, max |x| / 448 (1 for an all-zero row), stored after
// the pages; the fp32 attention and the fp64 reference read each row as its scale times its codes;
// and, the point of the storage, rows of very different magnitudes keep their precision where
// one per-layer scale fitted to the largest loses the small ones.
//
// Expected codes and scales are computed here from that rule and the brute-force e4m3 search of
// the test util, and scale positions from the documented layout [layers][pages][2][kv_heads]
// [page_size] after the 256-aligned end of the pages, never through the code under test.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu_attention.h"
#include "kernels/paged_kv.h"
#include "tests/unit/kernels_cpu_attention_fixture.h"
#include "tests/unit/kernels_cpu_attention_test_util.h"

namespace attnd::kernels::cpu_attention_test_util {
namespace {

// ---------------------------------------------------------------------------------------------
// The rule, written out independently.

// Byte of the pool where the scale of (layer, page, kv, slot, head) lives.
int64_t ScaleByte(const KvCacheShape& s, int64_t layer, int64_t page, int kv, int64_t slot,
                  int64_t head) {
  const int64_t pages_end = s.num_layers * s.num_pages * 2 * s.page_size * s.num_kv_heads *
                            s.head_dim;  // one byte per fp8 element
  const int64_t base = (pages_end + 255) / 256 * 256;
  return base +
         4 * ((((layer * s.num_pages + page) * 2 + kv) * s.num_kv_heads + head) * s.page_size +
              slot);
}

float ScaleIn(const std::vector<uint8_t>& pool, int64_t byte) {
  float f;
  std::memcpy(&f, pool.data() + byte, sizeof(f));
  return f;
}

// What append stores for one row of n model-dtype values x: the scale and the codes.
struct QuantizedRow {
  float scale;
  std::vector<uint8_t> codes;
};

QuantizedRow ExpectedRow(const std::vector<float>& x) {
  float amax = 0.0f;
  for (float v : x) {
    if (std::fabs(v) > amax) amax = std::fabs(v);  // false for NaN: NaN is skipped
  }
  QuantizedRow r;
  r.scale = amax > 0.0f ? amax / 448.0f : 1.0f;
  for (float v : x) {
    const float q = v / r.scale;
    r.codes.push_back(std::isnan(q) ? uint8_t{0x7f} : NearestFp8(q));
  }
  return r;
}

// Row (token t, head h) of a [tokens][heads][d] tensor of `dtype`, as floats.
std::vector<float> RowOf(const std::vector<uint8_t>& tensor, DType dtype, int64_t heads, int64_t d,
                         int64_t t, int64_t h) {
  std::vector<float> row(d);
  for (int64_t x = 0; x < d; ++x) row[x] = LoadAsFloat(tensor.data(), (t * heads + h) * d + x, dtype);
  return row;
}

// Values whose magnitude varies by row over 2^-10 .. 2^10 (and by element within a row), so rows
// get scales far apart and some elements quantize to subnormals or zero within their row.
std::vector<uint8_t> RowsOfRandomMagnitude(int64_t rows, int64_t d, DType dtype,
                                           std::mt19937& rng) {
  std::vector<uint8_t> bytes(rows * d * DTypeSize(dtype));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> octave(-10.0f, 10.0f), spread(-6.0f, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float magnitude = std::exp2(octave(rng));
    for (int64_t x = 0; x < d; ++x) {
      StoreFromFloat(bytes.data(), r * d + x, dtype,
                     magnitude * normal(rng) * std::exp2(spread(rng)));
    }
  }
  return bytes;
}

KvCacheShape PerTokenShape(KvLayout layout, DType dtype) {
  KvCacheShape shape;
  shape.num_layers = 2;
  shape.num_pages = 7;
  shape.page_size = 4;
  shape.num_kv_heads = 3;
  shape.head_dim = 12;
  shape.layout = layout;
  shape.dtype = dtype;
  shape.storage = KvStorage::kFp8E4M3PerToken;
  return shape;
}

// The pool after two appends of k and v (tokens [0, total), the second starting mid-page) into
// layer 1 through `table`, the pool poisoned with 0xAB first.
std::vector<uint8_t> AppendTwice(const KvCacheShape& shape, const std::vector<int32_t>& table,
                                 int64_t total, const std::vector<uint8_t>& k,
                                 const std::vector<uint8_t>& v) {
  std::vector<uint8_t> pool(shape.TotalBytes(), 0xAB);
  const int64_t bytes_per_token = shape.num_kv_heads * shape.head_dim * DTypeSize(shape.dtype);
  const int64_t first = 6;
  CpuAppendKv(pool.data(), shape, 1, table.data(), 0, first, k.data(), v.data());
  CpuAppendKv(pool.data(), shape, 1, table.data(), first, total - first,
              k.data() + first * bytes_per_token, v.data() + first * bytes_per_token);
  return pool;
}

// ---------------------------------------------------------------------------------------------
// Append.

struct AppendCase {
  KvLayout layout;
  DType dtype;
  std::string Name() const {
    return std::string(layout == KvLayout::kNHD ? "NHD" : "HND") + "_" + DTypeName(dtype);
  }
};

void PrintTo(const AppendCase& c, std::ostream* os) { *os << c.Name(); }

class PerTokenAppendTest : public ::testing::TestWithParam<AppendCase> {};

TEST_P(PerTokenAppendTest, StoresEachRowsCodesAndScaleByTheRuleAndNothingElse) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  const KvCacheShape shape = PerTokenShape(GetParam().layout, GetParam().dtype);
  const int64_t heads = shape.num_kv_heads, d = shape.head_dim, total = 13;
  const std::vector<int32_t> table = ShuffledPageTable(4, shape.num_pages, rng);
  const auto k = RowsOfRandomMagnitude(total * heads, d, shape.dtype, rng);
  const auto v = RowsOfRandomMagnitude(total * heads, d, shape.dtype, rng);
  const std::vector<uint8_t> pool = AppendTwice(shape, table, total, k, v);

  std::vector<bool> written(pool.size(), false);
  for (int64_t pos = 0; pos < total; ++pos) {
    const int64_t page = table[pos / shape.page_size], slot = pos % shape.page_size;
    for (int64_t h = 0; h < heads; ++h) {
      for (int kv = 0; kv < 2; ++kv) {
        SCOPED_TRACE("pos " + std::to_string(pos) + " head " + std::to_string(h) + " kv " +
                     std::to_string(kv));
        const QuantizedRow want = ExpectedRow(RowOf(kv == 0 ? k : v, shape.dtype, heads, d, pos, h));
        const int64_t scale_at = ScaleByte(shape, 1, page, kv, slot, h);
        const float scale = ScaleIn(pool, scale_at);
        ASSERT_EQ(std::memcmp(&scale, &want.scale, 4), 0) << scale << " != " << want.scale;
        for (int64_t b = 0; b < 4; ++b) written[scale_at + b] = true;
        const int64_t at = shape.Offset(1, page, kv, slot, h);
        for (int64_t x = 0; x < d; ++x) {
          ASSERT_EQ(pool[at + x], want.codes[x]) << "element " << x;
          written[at + x] = true;
        }
      }
    }
  }
  int64_t stray = 0;
  for (size_t b = 0; b < pool.size(); ++b) stray += !written[b] && pool[b] != 0xAB;
  EXPECT_EQ(stray, 0) << "bytes (codes, scales or padding) changed outside the appended rows";
}

std::vector<AppendCase> AppendCases() {
  std::vector<AppendCase> cases;
  for (KvLayout l : {KvLayout::kNHD, KvLayout::kHND}) {
    for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) cases.push_back({l, t});
  }
  return cases;
}
// dtype is the model's (of k and v); the pool is fp8.
INSTANTIATE_TEST_SUITE_P(LayoutsAndModelDtypes, PerTokenAppendTest,
                         ::testing::ValuesIn(AppendCases()),
                         [](const auto& info) { return info.param.Name(); });

// Random rows with one row of K and one of V replaced: all zeros, some of them negative.
TEST(PerTokenAppend, AnAllZeroRowGetsScaleOneAndZeroCodes) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  const KvCacheShape shape = PerTokenShape(KvLayout::kNHD, DType::kBFloat16);
  const int64_t heads = shape.num_kv_heads, d = shape.head_dim, total = 9;
  const std::vector<int32_t> table = ShuffledPageTable(3, shape.num_pages, rng);
  auto k = RandomTensor(total * heads * d, shape.dtype, 1.0f, rng);
  auto v = RandomTensor(total * heads * d, shape.dtype, 1.0f, rng);
  std::uniform_int_distribution<int64_t> token(0, total - 1), head(0, heads - 1), coin(0, 1);
  const int64_t t[2] = {token(rng), token(rng)}, h[2] = {head(rng), head(rng)};
  for (int kv = 0; kv < 2; ++kv) {
    for (int64_t x = 0; x < d; ++x) {
      StoreFromFloat((kv == 0 ? k : v).data(), (t[kv] * heads + h[kv]) * d + x, shape.dtype,
                     coin(rng) ? -0.0f : 0.0f);
    }
  }
  const std::vector<uint8_t> pool = AppendTwice(shape, table, total, k, v);
  for (int kv = 0; kv < 2; ++kv) {
    const int64_t page = table[t[kv] / shape.page_size], slot = t[kv] % shape.page_size;
    EXPECT_EQ(ScaleIn(pool, ScaleByte(shape, 1, page, kv, slot, h[kv])), 1.0f) << "kv " << kv;
    const std::vector<float> zeros = RowOf(kv == 0 ? k : v, shape.dtype, heads, d, t[kv], h[kv]);
    for (int64_t x = 0; x < d; ++x) {
      const uint8_t code = pool[shape.Offset(1, page, kv, slot, h[kv]) + x];
      EXPECT_EQ(code, std::signbit(zeros[x]) ? 0x80 : 0x00) << "kv " << kv << " element " << x;
    }
  }
}

// The same K and V appended twice, the second time with one element of one row 1000 times its
// row's largest magnitude: that row's scale and codes change, no other byte of the pool does.
TEST(PerTokenAppend, AnOutlierChangesOnlyItsOwnRowsScaleAndCodes) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  const KvCacheShape shape = PerTokenShape(KvLayout::kHND, DType::kFloat16);
  const int64_t heads = shape.num_kv_heads, d = shape.head_dim, total = 15;
  const std::vector<int32_t> table = ShuffledPageTable(4, shape.num_pages, rng);
  const auto k = RandomTensor(total * heads * d, shape.dtype, 1.0f, rng);
  const auto v = RandomTensor(total * heads * d, shape.dtype, 1.0f, rng);
  std::uniform_int_distribution<int64_t> token(0, total - 1), head(0, heads - 1), elem(0, d - 1);
  const int kv = static_cast<int>(rng() % 2);
  const int64_t t = token(rng), h = head(rng), x = elem(rng);
  auto k2 = k, v2 = v;
  std::vector<uint8_t>& changed = kv == 0 ? k2 : v2;
  const std::vector<float> row = RowOf(changed, shape.dtype, heads, d, t, h);
  float amax = 0.0f;
  for (float e : row) amax = std::max(amax, std::fabs(e));
  StoreFromFloat(changed.data(), (t * heads + h) * d + x, shape.dtype, 1000.0f * amax);
  SCOPED_TRACE("kv " + std::to_string(kv) + " token " + std::to_string(t) + " head " +
               std::to_string(h));

  const std::vector<uint8_t> before = AppendTwice(shape, table, total, k, v);
  const std::vector<uint8_t> after = AppendTwice(shape, table, total, k2, v2);
  const int64_t page = table[t / shape.page_size], slot = t % shape.page_size;
  const int64_t codes_at = shape.Offset(1, page, kv, slot, h);
  const int64_t scale_at = ScaleByte(shape, 1, page, kv, slot, h);
  for (size_t b = 0; b < before.size(); ++b) {
    const bool in_row = static_cast<int64_t>(b) >= codes_at && static_cast<int64_t>(b) < codes_at + d;
    const bool in_scale = static_cast<int64_t>(b) >= scale_at && static_cast<int64_t>(b) < scale_at + 4;
    if (!in_row && !in_scale) {
      ASSERT_EQ(before[b], after[b]) << "byte " << b;
    }
  }
  EXPECT_GT(ScaleIn(after, scale_at), 100.0f * ScaleIn(before, scale_at));
  const QuantizedRow want = ExpectedRow(RowOf(changed, shape.dtype, heads, d, t, h));
  EXPECT_EQ(ScaleIn(after, scale_at), want.scale);
  for (int64_t e = 0; e < d; ++e) EXPECT_EQ(after[codes_at + e], want.codes[e]) << "element " << e;
}

// fmax semantics: a NaN element is left out of its row's maximum (and stored as the NaN code):
// the row quantizes as it would with that element 0.
TEST(PerTokenAppend, ANanElementIsLeftOutOfItsRowsScale) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  const KvCacheShape shape = PerTokenShape(KvLayout::kNHD, DType::kFloat32);
  const int64_t heads = shape.num_kv_heads, d = shape.head_dim, total = 5;
  const std::vector<int32_t> table = ShuffledPageTable(2, shape.num_pages, rng);
  auto k = RandomTensor(total * heads * d, shape.dtype, 1.0f, rng);
  const auto v = RandomTensor(total * heads * d, shape.dtype, 1.0f, rng);
  const int64_t t = static_cast<int64_t>(rng() % total), h = static_cast<int64_t>(rng() % heads);
  const int64_t x = static_cast<int64_t>(rng() % d);
  // Without the element: the expectation (the element may have been the row's largest).
  std::vector<float> without = RowOf(k, shape.dtype, heads, d, t, h);
  without[x] = 0.0f;
  const QuantizedRow clean = ExpectedRow(without);
  StoreFromFloat(k.data(), (t * heads + h) * d + x, shape.dtype,
                 std::numeric_limits<float>::quiet_NaN());
  const std::vector<uint8_t> pool = AppendTwice(shape, table, total, k, v);
  const int64_t page = table[t / shape.page_size], slot = t % shape.page_size;
  EXPECT_EQ(ScaleIn(pool, ScaleByte(shape, 1, page, 0, slot, h)), clean.scale);
  const int64_t at = shape.Offset(1, page, 0, slot, h);
  EXPECT_EQ(pool[at + x] & 0x7f, 0x7f) << "the NaN element's code";
  for (int64_t e = 0; e < d; ++e) {
    if (e != x) {
      EXPECT_EQ(pool[at + e], clean.codes[e]) << "element " << e;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Attention: the fp32 CPU path against the fp64 reference, the reference against dense math.

class PerTokenVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(PerTokenVsReference, MatchesWithinOutputRounding) { ExpectMatchesReference(GetParam()); }

// The fp8 cases of the per-layer pools (every model dtype, both layouts, page sizes around the
// lengths, decode and prefill, long sequences, soft cap and window), on per-token pools.
INSTANTIATE_TEST_SUITE_P(Fp8PerTokenPool, PerTokenVsReference,
                         ::testing::ValuesIn(Fp8Cases(KvStorage::kFp8E4M3PerToken)), CaseName);

// Per-layer scales mean nothing to a per-token pool: append, attention and reference ignore
// them, to the bit.
TEST(PerTokenPool, IgnoresPerLayerScales) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  Case c;
  c.storage = KvStorage::kFp8E4M3PerToken;
  c.kv_len = 70;
  c.num_queries = 3;
  Fixture f(c, rng);  // appended without per-layer scales
  const KvScales scales{3.0f, 0.25f};
  std::vector<uint8_t> again(f.pool.size());
  std::fill(again.begin(), again.end(), uint8_t{0xff});
  PoisonWithNan(again.data(), f.shape.TotalElems(), DType::kFloat8E4M3);
  CpuAppendKv(again.data(), f.shape, f.layer, f.table.data(), 0, c.kv_len, f.k.data(), f.v.data(),
              scales);
  EXPECT_EQ(again, f.pool);

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

// A per-token pool filled directly with random codes (no NaN) and random scales per row; the
// reference must equal a dense two-pass softmax in double over scale * Fp8Value(code), exact
// products in double, with the keys' and values' rows each taking their own scale.
TEST(PerTokenReference, ReadsEachRowAsItsOwnScaleTimesItsCodes) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  KvCacheShape shape = PerTokenShape(rng() % 2 ? KvLayout::kHND : KvLayout::kNHD, DType::kFloat32);
  shape.num_pages = 8;
  shape.page_size = 5;
  shape.num_kv_heads = 2;
  const int64_t heads = shape.num_kv_heads, d = shape.head_dim, layer = 1, len = 27, n = 4;
  constexpr int64_t kQoHeads = 4;
  std::uniform_int_distribution<int> code(0, 255);
  std::uniform_real_distribution<float> octave(-12.0f, -2.0f);
  std::vector<uint8_t> pool(shape.TotalBytes(), 0xff);  // scales and codes NaN until written
  for (int64_t page = 0; page < shape.num_pages; ++page) {
    for (int kv = 0; kv < 2; ++kv) {
      for (int64_t slot = 0; slot < shape.page_size; ++slot) {
        for (int64_t h = 0; h < heads; ++h) {
          const float scale = std::exp2(octave(rng));
          std::memcpy(pool.data() + ScaleByte(shape, layer, page, kv, slot, h), &scale, 4);
          for (int64_t x = 0; x < d; ++x) {
            uint8_t c = static_cast<uint8_t>(code(rng));
            if ((c & 0x7f) == 0x7f) c = 0;  // no NaN: the values must be comparable
            pool[shape.Offset(layer, page, kv, slot, h) + x] = c;
          }
        }
      }
    }
  }
  const auto table = ShuffledPageTable(6, shape.num_pages, rng);
  const SequenceView seq{table.data(), len, n};
  AttentionOptions opts;
  opts.num_qo_heads = kQoHeads;
  opts.sm_scale = 0.3f;
  const auto q = RandomTensor(n * kQoHeads * d, DType::kFloat32, 1.0f, rng);
  std::vector<double> out, lse;
  ReferencePagedAttention(pool.data(), shape, layer, seq, opts, q.data(), &out, &lse);

  // Dense dequantized K and V of the sequence: [len][heads][d].
  const auto dense = [&](int kv) {
    std::vector<double> values(len * heads * d);
    for (int64_t j = 0; j < len; ++j) {
      const int64_t page = table[j / shape.page_size], slot = j % shape.page_size;
      for (int64_t h = 0; h < heads; ++h) {
        const double scale = ScaleIn(pool, ScaleByte(shape, layer, page, kv, slot, h));
        for (int64_t x = 0; x < d; ++x) {
          values[(j * heads + h) * d + x] =
              scale * Fp8Value(pool[shape.Offset(layer, page, kv, slot, h) + x]);
        }
      }
    }
    return values;
  };
  const std::vector<double> k = dense(0), v = dense(1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t sees = len - n + i + 1;  // causal: keys [0, sees)
    for (int64_t h = 0; h < kQoHeads; ++h) {
      const int64_t kvh = h / (kQoHeads / heads);
      std::vector<double> logits(sees);
      for (int64_t j = 0; j < sees; ++j) {
        double dot = 0;
        for (int64_t x = 0; x < d; ++x) {
          dot += LoadAsFloat(q.data(), (i * kQoHeads + h) * d + x, DType::kFloat32) *
                 k[(j * heads + kvh) * d + x];
        }
        logits[j] = static_cast<double>(opts.sm_scale) * dot;
      }
      const double max = *std::max_element(logits.begin(), logits.end());
      double z = 0;
      for (double l : logits) z += std::exp(l - max);
      for (int64_t x = 0; x < d; ++x) {
        double want = 0;
        for (int64_t j = 0; j < sees; ++j) want += std::exp(logits[j] - max) / z * v[(j * heads + kvh) * d + x];
        EXPECT_NEAR(out[(i * kQoHeads + h) * d + x], want, 1e-9 * (1 + std::fabs(want)))
            << "query " << i << " head " << h << " x " << x;
      }
      EXPECT_NEAR(lse[i * kQoHeads + h], max + std::log(z), 1e-9 * (1 + std::fabs(max)));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Why per-token scales: precision where magnitudes differ.

// Mean over (query, qo head) rows of ||out - truth|| / ||truth||.
double MeanRowError(const std::vector<double>& out, const std::vector<double>& truth, int64_t d) {
  double sum = 0;
  const int64_t rows = static_cast<int64_t>(truth.size()) / d;
  for (int64_t r = 0; r < rows; ++r) {
    double diff = 0, norm = 0;
    for (int64_t x = 0; x < d; ++x) {
      const double t = truth[r * d + x];
      diff += (out[r * d + x] - t) * (out[r * d + x] - t);
      norm += t * t;
    }
    sum += std::sqrt(diff / norm);
  }
  return sum / static_cast<double>(rows);
}

// A prompt whose K and V rows at a few random positions of its second half are 10^5 times the
// others (outlier tokens: the ordinary rows are scaled down, so that logits stay moderate and
// every key counts), attended by every position (prefill). e4m3's normal range spans 2^-6 ..
// 448, a factor of about 3 * 10^4, so a per-layer pool with one scale per tensor fitted to the
// largest magnitude pushes the ordinary rows into e4m3's subnormals and zero; a per-token pool
// quantizes every row at full precision. Against the bf16 pool's
// attention (the truth), the per-token pool's error is the smaller one, by a wide margin: the
// queries before the first outlier see only ordinary rows. Outputs are the fp64 reference over
// each pool, so only the storage differs.
TEST(PerTokenPool, KeepsOrdinaryRowsPreciseBesideOutlierTokensUnlikeOneLayerScale) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  Case c;
  c.dtype = DType::kBFloat16;
  c.kv_len = 256;
  c.num_queries = 256;
  c.head_dim = 64;
  Fixture truth(c, rng);  // the bf16 pool; k and v are replaced below
  const int64_t row = c.kv_heads * c.head_dim;
  std::uniform_int_distribution<int64_t> second_half(c.kv_len / 2, c.kv_len - 1);
  std::vector<bool> outlier(c.kv_len, false);
  for (int i = 0; i < 8; ++i) outlier[second_half(rng)] = true;
  for (auto* tensor : {&truth.k, &truth.v}) {
    for (int64_t t = 0; t < c.kv_len; ++t) {
      if (outlier[t]) continue;
      for (int64_t e = t * row; e < (t + 1) * row; ++e) {
        StoreFromFloat(tensor->data(), e, c.dtype, 1e-5f * LoadAsFloat(tensor->data(), e, c.dtype));
      }
    }
  }
  const auto fill = [&](const KvCacheShape& shape, KvScales scales) {
    std::vector<uint8_t> pool(shape.TotalBytes());
    CpuAppendKv(pool.data(), shape, truth.layer, truth.table.data(), 0, c.kv_len, truth.k.data(),
                truth.v.data(), scales);
    return pool;
  };
  const auto attend = [&](const std::vector<uint8_t>& pool, const KvCacheShape& shape,
                          KvScales scales) {
    std::vector<double> out;
    ReferencePagedAttention(pool.data(), shape, truth.layer, truth.seq, truth.opts,
                            truth.q.data(), &out, nullptr, scales);
    return out;
  };
  KvScales fitted{0.0f, 0.0f};  // max |x| / 448 over the whole tensor
  for (int64_t i = 0; i < c.kv_len * row; ++i) {
    fitted.k = std::max(fitted.k, std::fabs(LoadAsFloat(truth.k.data(), i, c.dtype)) / 448.0f);
    fitted.v = std::max(fitted.v, std::fabs(LoadAsFloat(truth.v.data(), i, c.dtype)) / 448.0f);
  }
  KvCacheShape layer_shape = truth.shape, token_shape = truth.shape;
  layer_shape.storage = KvStorage::kFp8E4M3;
  token_shape.storage = KvStorage::kFp8E4M3PerToken;

  const std::vector<double> want = attend(fill(truth.shape, {}), truth.shape, {});
  const double layer_error =
      MeanRowError(attend(fill(layer_shape, fitted), layer_shape, fitted), want, c.head_dim);
  const double token_error =
      MeanRowError(attend(fill(token_shape, {}), token_shape, {}), want, c.head_dim);
  SCOPED_TRACE("per-layer error " + std::to_string(layer_error) + ", per-token error " +
               std::to_string(token_error));
  std::printf("  mean row error: per-layer scale %.3g, per-token scales %.3g\n", layer_error,
              token_error);
  EXPECT_LT(token_error, 2 * std::ldexp(1.0, -4));  // fp8's own rounding, once for K and for V
  EXPECT_LT(2 * token_error, layer_error);
}

}  // namespace
}  // namespace attnd::kernels::cpu_attention_test_util
