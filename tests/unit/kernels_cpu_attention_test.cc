// Tests of kernels/cpu_attention.h: dtype conversions, the paged append, the fp32 CPU attention
// against the fp64 reference, and the reference against hand-written dense softmax.
//
// Expected values are always computed here by independent means (ldexp formulas, brute-force
// nearest search, dense softmax), never hard-coded. Random cases draw a fresh seed from
// std::random_device and print it on failure.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cpu_attention.h"
#include "kernels/paged_kv.h"

namespace attnd::kernels {
namespace {

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kFloat16:
      return "f16";
    case DType::kBFloat16:
      return "bf16";
    case DType::kFloat32:
      return "f32";
  }
  return "?";
}

uint32_t FreshSeed() { return std::random_device{}(); }

// ---------------------------------------------------------------------------------------------
// Independent decoders: the value of a bit pattern by the format's definition.

double HalfValue(uint16_t h) {
  const int sign = (h & 0x8000) ? -1 : 1;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  if (exp == 31) return mant ? std::nan("") : sign * std::numeric_limits<double>::infinity();
  if (exp == 0) return sign * std::ldexp(mant, -24);
  return sign * std::ldexp(1024 + mant, exp - 25);
}

double Bf16Value(uint16_t b) {
  const int sign = (b & 0x8000) ? -1 : 1;
  const int exp = (b >> 7) & 0xff;
  const int mant = b & 0x7f;
  if (exp == 255) return mant ? std::nan("") : sign * std::numeric_limits<double>::infinity();
  if (exp == 0) return sign * std::ldexp(mant, -133);
  return sign * std::ldexp(128 + mant, exp - 134);
}

// Brute-force round-to-nearest-even: the magnitude pattern in [0, inf_bits] nearest to |v|, ties
// to the even pattern. inf_bits stands for the next power of two above the largest finite value,
// which is how IEEE rounds on overflow (round as if the exponent were unbounded).
uint16_t NearestBySearch(float v, uint16_t inf_bits, double inf_as, double (*value)(uint16_t)) {
  const double target = std::fabs(static_cast<double>(v));
  uint16_t best = 0;
  double best_dist = std::numeric_limits<double>::infinity();
  for (uint32_t m = 0; m <= inf_bits; ++m) {
    const double c = m == inf_bits ? inf_as : value(static_cast<uint16_t>(m));
    const double dist = std::fabs(c - target);
    if (dist < best_dist || (dist == best_dist && (m & 1) == 0)) {
      best = static_cast<uint16_t>(m);
      best_dist = dist;
    }
  }
  return static_cast<uint16_t>(best | (std::signbit(v) ? 0x8000 : 0));
}

uint16_t NearestHalf(float v) { return NearestBySearch(v, 0x7c00, 65536.0, HalfValue); }
uint16_t NearestBf16(float v) {
  return NearestBySearch(v, 0x7f80, std::ldexp(1.0, 128), Bf16Value);
}

uint16_t StoreBits(DType t, float v) {
  uint16_t bits;
  StoreFromFloat(&bits, 0, t, v);
  return bits;
}

// Floats that probe rounding: for adjacent patterns (a, b) of the target format, the exact
// midpoint and its float neighbours on both sides, for both signs; plus values spread over every
// binade and the special values.
std::vector<float> RoundingProbes(double (*value)(uint16_t), uint16_t inf_bits, double inf_as,
                                  std::mt19937& rng) {
  std::vector<uint32_t> lows = {0, 1, 2, 3, 0x3fe, 0x3ff, 0x400, 0x401, 0x7f, 0x80, 0x81};
  lows.push_back(inf_bits - 2u);
  lows.push_back(inf_bits - 1u);
  std::uniform_int_distribution<uint32_t> pick(0, inf_bits - 1u);
  for (int i = 0; i < 1200; ++i) lows.push_back(pick(rng));
  std::vector<float> probes;
  for (uint32_t m : lows) {
    if (m >= inf_bits) continue;
    const double a = value(static_cast<uint16_t>(m));
    const double b = m + 1 == inf_bits ? inf_as : value(static_cast<uint16_t>(m + 1));
    const float mid = static_cast<float>((a + b) / 2);  // 1 bit more than the format: exact
    for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY)}) {
      probes.push_back(f);
      probes.push_back(-f);
    }
  }
  std::uniform_real_distribution<float> unit(1.0f, 2.0f);
  for (int e = -150; e <= 127; ++e) probes.push_back(std::ldexp(unit(rng), e));
  probes.push_back(0.0f);
  probes.push_back(-0.0f);
  probes.push_back(std::numeric_limits<float>::denorm_min());
  probes.push_back(std::numeric_limits<float>::max());
  probes.push_back(-std::numeric_limits<float>::max());
  return probes;
}

// ---------------------------------------------------------------------------------------------
// Conversions.

TEST(Conversions, Fp16DecodesEveryPatternToItsDefinedValue) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    const double want = HalfValue(bits);
    const float got = LoadAsFloat(&bits, 0, DType::kFloat16);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << std::hex << h;
      continue;
    }
    EXPECT_EQ(static_cast<double>(got), want) << std::hex << h;
    EXPECT_EQ(std::signbit(got), static_cast<bool>(h & 0x8000)) << std::hex << h;
  }
}

TEST(Conversions, Bf16DecodesEveryPatternToItsDefinedValue) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const uint16_t bits = static_cast<uint16_t>(b);
    const double want = Bf16Value(bits);
    const float got = LoadAsFloat(&bits, 0, DType::kBFloat16);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << std::hex << b;
      continue;
    }
    EXPECT_EQ(static_cast<double>(got), want) << std::hex << b;
    EXPECT_EQ(std::signbit(got), static_cast<bool>(b & 0x8000)) << std::hex << b;
  }
}

TEST(Conversions, EveryHalfAndBf16PatternRoundTripsThroughFloat) {
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    for (uint32_t h = 0; h < 65536; ++h) {
      const uint16_t bits = static_cast<uint16_t>(h);
      const float f = LoadAsFloat(&bits, 0, t);
      const uint16_t back = StoreBits(t, f);
      if (std::isnan(f)) {
        // NaN stays NaN (quieted); the payload is not part of the contract.
        EXPECT_TRUE(std::isnan(LoadAsFloat(&back, 0, t))) << DTypeName(t) << " " << std::hex << h;
      } else {
        EXPECT_EQ(back, bits) << DTypeName(t) << " " << std::hex << h;
      }
    }
  }
}

TEST(Conversions, Fp16RoundsToNearestEvenLikeBruteForceSearch) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  for (float v : RoundingProbes(HalfValue, 0x7c00, 65536.0, rng)) {
    ASSERT_EQ(StoreBits(DType::kFloat16, v), NearestHalf(v)) << std::hexfloat << v;
  }
}

TEST(Conversions, Bf16RoundsToNearestEvenLikeBruteForceSearch) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  for (float v : RoundingProbes(Bf16Value, 0x7f80, std::ldexp(1.0, 128), rng)) {
    ASSERT_EQ(StoreBits(DType::kBFloat16, v), NearestBf16(v)) << std::hexfloat << v;
  }
}

TEST(Conversions, InfinitiesAndNansSurviveNarrowing) {
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    for (float v : {INFINITY, -INFINITY}) {
      const uint16_t bits = StoreBits(t, v);
      EXPECT_EQ(LoadAsFloat(&bits, 0, t), v) << DTypeName(t);
    }
    for (float v :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::signaling_NaN(),
          -std::numeric_limits<float>::quiet_NaN()}) {
      const uint16_t bits = StoreBits(t, v);
      EXPECT_TRUE(std::isnan(LoadAsFloat(&bits, 0, t))) << DTypeName(t);
    }
  }
}

// The vectorised row conversions (used by the attention on every K/V row) must agree bit for bit
// with the scalar ones, at every alignment and with ragged tails.
TEST(Conversions, RowLoadsMatchScalarLoadsForEveryPattern) {
  std::vector<uint16_t> all(65536 + 7);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i * 40503u);
  for (DType t : {DType::kFloat16, DType::kBFloat16}) {
    for (int64_t start : {0, 1, 3}) {
      const int64_t n = static_cast<int64_t>(all.size()) - start - (start == 1 ? 2 : 0);
      std::vector<float> row(n);
      LoadRowAsFloat(all.data(), start, n, t, row.data());
      for (int64_t i = 0; i < n; ++i) {
        const float want = LoadAsFloat(all.data(), start + i, t);
        uint32_t got_bits, want_bits;
        std::memcpy(&got_bits, &row[i], 4);
        std::memcpy(&want_bits, &want, 4);
        ASSERT_EQ(got_bits, want_bits) << DTypeName(t) << " pattern " << std::hex << all[start + i];
      }
    }
  }
}

TEST(Conversions, RowStoresMatchScalarStores) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::vector<float> values(1001);
  for (auto& v : values) {
    const uint32_t bits = rng();
    std::memcpy(&v, &bits, 4);
  }
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    const size_t es = DTypeSize(t);
    std::vector<uint8_t> row((values.size() + 2) * es), scalar((values.size() + 2) * es);
    StoreRowFromFloat(values.data(), static_cast<int64_t>(values.size()), t, row.data(), 2);
    for (size_t i = 0; i < values.size(); ++i) StoreFromFloat(scalar.data(), i + 2, t, values[i]);
    EXPECT_EQ(row, scalar) << DTypeName(t);
  }
}

TEST(Conversions, Fp32PassesThroughBitExact) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::vector<uint32_t> patterns = {0x00000000, 0x80000000, 0x7f800000, 0xff800000,
                                    0x7fc00001, 0x7f800001, 0x00000001, 0x7f7fffff};
  for (int i = 0; i < 10000; ++i) patterns.push_back(rng());
  for (uint32_t p : patterns) {
    float f;
    std::memcpy(&f, &p, 4);
    float slot[2] = {0, 0};
    StoreFromFloat(slot, 1, DType::kFloat32, f);
    uint32_t stored;
    std::memcpy(&stored, &slot[1], 4);
    EXPECT_EQ(stored, p) << std::hex << p;
    const float loaded = LoadAsFloat(slot, 1, DType::kFloat32);
    uint32_t loaded_bits;
    std::memcpy(&loaded_bits, &loaded, 4);
    EXPECT_EQ(loaded_bits, p) << std::hex << p;
  }
}

// ---------------------------------------------------------------------------------------------
// Shared set-up for paged tests.

// A page table of `count` distinct pages out of `num_pages`, shuffled, and never ascending
// consecutive (which would let a kernel that ignores the table pass by accident).
std::vector<int32_t> ShuffledPageTable(int64_t count, int64_t num_pages, std::mt19937& rng) {
  std::vector<int32_t> pages(num_pages);
  std::iota(pages.begin(), pages.end(), 0);
  std::shuffle(pages.begin(), pages.end(), rng);
  pages.resize(count);
  bool consecutive = count >= 2;
  for (int64_t i = 1; i < count; ++i) consecutive &= pages[i] == pages[i - 1] + 1;
  if (consecutive) std::swap(pages[0], pages[1]);
  return pages;
}

// Elements of `dtype` with random values, stored through StoreFromFloat.
std::vector<uint8_t> RandomTensor(int64_t elems, DType dtype, float stddev, std::mt19937& rng) {
  std::vector<uint8_t> bytes(elems * DTypeSize(dtype));
  std::normal_distribution<float> dist(0.0f, stddev);
  for (int64_t i = 0; i < elems; ++i) StoreFromFloat(bytes.data(), i, dtype, dist(rng));
  return bytes;
}

void PoisonWithNan(void* data, int64_t elems, DType dtype) {
  for (int64_t i = 0; i < elems; ++i) {
    StoreFromFloat(data, i, dtype, std::numeric_limits<float>::quiet_NaN());
  }
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

class AppendTest : public ::testing::TestWithParam<AppendCase> {};

TEST_P(AppendTest, WritesEachTokenWhereOffsetSaysAndNothingElse) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  KvCacheShape shape;
  shape.num_layers = 3;
  shape.num_pages = 9;
  shape.page_size = 5;
  shape.num_kv_heads = 3;
  shape.head_dim = 8;
  shape.layout = GetParam().layout;
  shape.dtype = GetParam().dtype;
  const int64_t layer = 1;
  const int64_t es = DTypeSize(shape.dtype);
  const int64_t row = shape.num_kv_heads * shape.head_dim;
  const int64_t total = 17;  // 4 pages, the last one partial
  const std::vector<int32_t> table = ShuffledPageTable(4, shape.num_pages, rng);

  std::vector<uint8_t> pool(shape.TotalBytes(), 0xAB);
  std::vector<uint8_t> k(total * row * es), v(total * row * es);
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& b : k) b = static_cast<uint8_t>(byte(rng));
  for (auto& b : v) b = static_cast<uint8_t>(byte(rng));

  // Two appends, the second starting mid-page, as a prompt then a continuation would.
  const int64_t first = 7;
  CpuAppendKv(pool.data(), shape, layer, table.data(), 0, first, k.data(), v.data());
  CpuAppendKv(pool.data(), shape, layer, table.data(), first, total - first,
              k.data() + first * row * es, v.data() + first * row * es);

  std::vector<bool> written(shape.TotalElems(), false);
  for (int64_t pos = 0; pos < total; ++pos) {
    const int64_t page = table[pos / shape.page_size];
    const int64_t slot = pos % shape.page_size;
    for (int64_t h = 0; h < shape.num_kv_heads; ++h) {
      for (int kv = 0; kv < 2; ++kv) {
        const int64_t at = shape.Offset(layer, page, kv, slot, h);
        const uint8_t* want = (kv == 0 ? k : v).data() + (pos * row + h * shape.head_dim) * es;
        EXPECT_EQ(std::memcmp(pool.data() + at * es, want, shape.head_dim * es), 0)
            << "pos " << pos << " head " << h << " kv " << kv;
        for (int64_t i = 0; i < shape.head_dim; ++i) written[at + i] = true;
      }
    }
  }
  int64_t stray = 0;
  for (int64_t e = 0; e < shape.TotalElems(); ++e) {
    if (written[e]) continue;
    for (int64_t b = 0; b < es; ++b) stray += pool[e * es + b] != 0xAB;
  }
  EXPECT_EQ(stray, 0) << "bytes changed outside the appended rows";
}

std::vector<AppendCase> AppendCases() {
  std::vector<AppendCase> cases;
  for (KvLayout l : {KvLayout::kNHD, KvLayout::kHND}) {
    for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) cases.push_back({l, t});
  }
  return cases;
}
INSTANTIATE_TEST_SUITE_P(LayoutsAndDtypes, AppendTest, ::testing::ValuesIn(AppendCases()),
                         [](const auto& info) { return info.param.Name(); });

// ---------------------------------------------------------------------------------------------
// CPU attention against the fp64 reference.

struct Case {
  DType dtype = DType::kBFloat16;
  KvLayout layout = KvLayout::kNHD;
  int64_t page_size = 16;
  int64_t head_dim = 128;
  int64_t kv_heads = 2;
  int64_t group = 4;
  int64_t kv_len = 100;
  int64_t num_queries = 1;
  float soft_cap = 0.0f;
  int64_t window = -1;
  float sm_scale = 0.0f;  // 0: 1/sqrt(head_dim)
  float stddev = 1.0f;    // of q, k and v

  std::string Name() const {
    std::ostringstream s;
    s << DTypeName(dtype) << "_" << (layout == KvLayout::kNHD ? "NHD" : "HND") << "_ps" << page_size
      << "_d" << head_dim << "_kv" << kv_heads << "_g" << group << "_len" << kv_len << "_q"
      << num_queries;
    if (soft_cap > 0) s << "_cap" << static_cast<int>(soft_cap);
    if (window >= 0) s << "_win" << window;
    return s.str();
  }
};

double Tolerance(DType t) {
  switch (t) {
    case DType::kFloat32:
      return 1e-5;
    case DType::kFloat16:
      return 2e-3;
    case DType::kBFloat16:
      return 1e-2;
  }
  return 0;
}

// A pool holding one random sequence in layer 1 of 2, surrounded by NaN everywhere else (other
// pages, the unused tail of the last page, the other layer), so reading anything outside the
// sequence shows up as NaN in the output.
struct Fixture {
  KvCacheShape shape;
  AttentionOptions opts;
  SequenceView seq;
  std::vector<int32_t> table;
  std::vector<uint8_t> pool, q;
  int64_t layer = 1;

  Fixture(const Case& c, std::mt19937& rng) {
    shape.num_layers = 2;
    shape.page_size = c.page_size;
    shape.num_kv_heads = c.kv_heads;
    shape.head_dim = c.head_dim;
    shape.layout = c.layout;
    shape.dtype = c.dtype;
    const int64_t pages = (c.kv_len + c.page_size - 1) / c.page_size;
    shape.num_pages = pages + 3;
    opts.num_qo_heads = c.kv_heads * c.group;
    opts.sm_scale = c.sm_scale > 0 ? c.sm_scale : 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    opts.logits_soft_cap = c.soft_cap;
    opts.window_left = c.window;
    table = ShuffledPageTable(pages, shape.num_pages, rng);
    pool.resize(shape.TotalBytes());
    PoisonWithNan(pool.data(), shape.TotalElems(), shape.dtype);

    const int64_t row = c.kv_heads * c.head_dim;
    const auto k = RandomTensor(c.kv_len * row, c.dtype, c.stddev, rng);
    const auto v = RandomTensor(c.kv_len * row, c.dtype, 1.0f, rng);
    // The cached prefix, then the new tokens, as a Prefill or Decode call appends them.
    const int64_t cached = std::max<int64_t>(0, c.kv_len - c.num_queries);
    const int64_t es = DTypeSize(c.dtype);
    CpuAppendKv(pool.data(), shape, layer, table.data(), 0, cached, k.data(), v.data());
    CpuAppendKv(pool.data(), shape, layer, table.data(), cached, c.kv_len - cached,
                k.data() + cached * row * es, v.data() + cached * row * es);
    q = RandomTensor(c.num_queries * opts.num_qo_heads * c.head_dim, c.dtype, c.stddev, rng);
    seq.page_table = table.data();
    seq.kv_len = c.kv_len;
    seq.num_queries = c.num_queries;
  }

  int64_t OutElems() const { return seq.num_queries * opts.num_qo_heads * shape.head_dim; }
};

// ||out - ref|| / ||ref||; NaN anywhere in out makes it NaN, which fails any `<` check.
double RelativeError(const void* out, DType dtype, const std::vector<double>& ref) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double o = LoadAsFloat(out, static_cast<int64_t>(i), dtype);
    diff += (o - ref[i]) * (o - ref[i]);
    norm += ref[i] * ref[i];
  }
  return std::sqrt(diff) / std::sqrt(norm);
}

void ExpectLseMatches(const std::vector<float>& lse, const std::vector<double>& ref) {
  ASSERT_EQ(lse.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isinf(ref[i])) {
      EXPECT_EQ(static_cast<double>(lse[i]), ref[i]) << "lse " << i;
    } else {
      EXPECT_NEAR(lse[i], ref[i], 1e-5 * (1 + std::fabs(ref[i]))) << "lse " << i;
    }
  }
}

void ExpectMatchesReference(const Case& c) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " case " + c.Name());
  std::mt19937 rng(seed);
  Fixture f(c, rng);

  std::vector<uint8_t> out(f.OutElems() * DTypeSize(c.dtype));
  PoisonWithNan(out.data(), f.OutElems(), c.dtype);
  std::vector<float> lse(c.num_queries * f.opts.num_qo_heads,
                         std::numeric_limits<float>::quiet_NaN());
  CpuPagedAttention(f.pool.data(), f.shape, f.layer, f.seq, f.opts, f.q.data(), out.data(),
                    lse.data());

  std::vector<double> ref_out, ref_lse;
  ReferencePagedAttention(f.pool.data(), f.shape, f.layer, f.seq, f.opts, f.q.data(), &ref_out,
                          &ref_lse);
  EXPECT_LT(RelativeError(out.data(), c.dtype, ref_out), Tolerance(c.dtype));
  ExpectLseMatches(lse, ref_lse);
}

void PrintTo(const Case& c, std::ostream* os) { *os << c.Name(); }

class CpuVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(CpuVsReference, MatchesWithinOutputRounding) { ExpectMatchesReference(GetParam()); }

std::string CaseName(const ::testing::TestParamInfo<Case>& info) { return info.param.Name(); }

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
}  // namespace attnd::kernels
