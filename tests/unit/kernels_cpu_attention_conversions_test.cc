// Tests of kernels/cpu_attention.h: the fp16/bf16/fp32/fp8 conversions, scalar and row-wise,
// against independent decoders (the value of a bit pattern by the format's definition) and a
// brute-force round-to-nearest-even search.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu_attention.h"
#include "kernels/paged_kv.h"
#include "tests/unit/kernels_cpu_attention_test_util.h"

namespace attnd::kernels::cpu_attention_test_util {
namespace {

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
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kFloat8E4M3}) {
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
// fp8 e4m3 (a pool storage dtype): Fp8Value and NearestFp8 are the definitions, in the util.

uint8_t StoreFp8(float v) {
  uint8_t code;
  StoreFromFloat(&code, 0, DType::kFloat8E4M3, v);
  return code;
}

TEST(Conversions, Fp8DecodesEveryCodeToItsDefinedValue) {
  for (uint32_t c = 0; c < 256; ++c) {
    const uint8_t code = static_cast<uint8_t>(c);
    const double want = Fp8Value(code);
    const float got = LoadAsFloat(&code, 0, DType::kFloat8E4M3);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << std::hex << c;
      continue;
    }
    EXPECT_EQ(static_cast<double>(got), want) << std::hex << c;
    EXPECT_EQ(std::signbit(got), static_cast<bool>(c & 0x80)) << std::hex << c;
  }
}

TEST(Conversions, EveryFiniteFp8CodeRoundTripsThroughFloat) {
  for (uint32_t c = 0; c < 256; ++c) {
    const uint8_t code = static_cast<uint8_t>(c);
    if (std::isnan(Fp8Value(code))) continue;
    EXPECT_EQ(StoreFp8(LoadAsFloat(&code, 0, DType::kFloat8E4M3)), code) << std::hex << c;
  }
}

// Floats that probe fp8 rounding: every midpoint between adjacent finite magnitudes and its float
// neighbours, the region past 448, and random values over every binade the format reaches and
// beyond (both signs).
std::vector<float> Fp8Probes(std::mt19937& rng) {
  std::vector<float> probes;
  for (uint32_t m = 0; m + 1 < 0x7f; ++m) {
    const float mid = static_cast<float>(
        (Fp8Value(static_cast<uint8_t>(m)) + Fp8Value(static_cast<uint8_t>(m + 1))) / 2);
    for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY)}) {
      probes.push_back(f);
      probes.push_back(-f);
    }
  }
  std::uniform_real_distribution<float> unit(1.0f, 2.0f);
  for (int e = -20; e <= 12; ++e) {
    for (int i = 0; i < 200; ++i) {
      const float f = std::ldexp(unit(rng), e);
      probes.push_back(f);
      probes.push_back(-f);
    }
  }
  for (float f : {0.0f, -0.0f, std::numeric_limits<float>::denorm_min(), 448.0f, 464.0f,
                  std::nextafter(464.0f, 0.0f), std::numeric_limits<float>::max()}) {
    probes.push_back(f);
    probes.push_back(-f);
  }
  return probes;
}

TEST(Conversions, Fp8RoundsToNearestEvenLikeBruteForceSearch) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  for (float v : Fp8Probes(rng)) {
    ASSERT_EQ(StoreFp8(v), NearestFp8(v)) << std::hexfloat << v;
  }
}

// Past the largest finite value the conversion saturates (CUDA's __NV_SATFINITE), infinities
// included, rather than producing NaN.
TEST(Conversions, Fp8SaturatesBeyondTheLargestFiniteValue) {
  double largest = 0;
  for (uint32_t c = 0; c < 256; ++c) {
    const double v = Fp8Value(static_cast<uint8_t>(c));
    if (!std::isnan(v)) largest = std::max(largest, v);
  }
  for (float v : {465.0f, 480.0f, 1e6f, std::numeric_limits<float>::max(), INFINITY}) {
    for (float signed_v : {v, -v}) {
      const uint8_t code = StoreFp8(signed_v);
      EXPECT_EQ(static_cast<double>(LoadAsFloat(&code, 0, DType::kFloat8E4M3)),
                std::copysign(largest, signed_v))
          << signed_v;
    }
  }
}

TEST(Conversions, Fp8NanBecomesTheCanonicalNanCode) {
  for (float v :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::signaling_NaN(),
        -std::numeric_limits<float>::quiet_NaN()}) {
    const uint8_t code = StoreFp8(v);
    EXPECT_EQ(code, 0x7f);
    EXPECT_TRUE(std::isnan(LoadAsFloat(&code, 0, DType::kFloat8E4M3)));
  }
}

TEST(Conversions, Fp8RowLoadsMatchScalarLoadsForEveryCode) {
  std::vector<uint8_t> all(256 * 3 + 7);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint8_t>(i * 167u);
  for (int64_t start : {0, 1, 3}) {
    const int64_t n = static_cast<int64_t>(all.size()) - start - (start == 1 ? 2 : 0);
    std::vector<float> row(n);
    LoadRowAsFloat(all.data(), start, n, DType::kFloat8E4M3, row.data());
    for (int64_t i = 0; i < n; ++i) {
      const float want = LoadAsFloat(all.data(), start + i, DType::kFloat8E4M3);
      uint32_t got_bits, want_bits;
      std::memcpy(&got_bits, &row[i], 4);
      std::memcpy(&want_bits, &want, 4);
      ASSERT_EQ(got_bits, want_bits) << "code " << std::hex << int{all[start + i]};
    }
  }
}

}  // namespace
}  // namespace attnd::kernels::cpu_attention_test_util
