// The client rounds fp16/bf16 (and fp8 e4m3, what an fp8 KV pool stores) on its own (client/
// may depend on proto only); the server's CPU paths round in kernels/. Both must agree bit for
// bit, or a client's reference would differ from what the server stores. This checks the two
// independent implementations against each other: every 16-bit (8-bit) pattern decoded, and
// floats around every rounding boundary encoded.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "client/half.h"
#include "gtest/gtest.h"
#include "kernels/cpu_attention.h"

namespace attnd {
namespace {

using kernels::DType;

float FromBits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t KernelEncode(float value, DType dtype) {
  uint16_t out;
  kernels::StoreFromFloat(&out, 0, dtype, value);
  return out;
}

bool SameFloat(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, 4) == 0;
}

TEST(ClientConversionsTest, EverySixteenBitPatternDecodesLikeTheServer) {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    ASSERT_TRUE(SameFloat(client::HalfBitsToFloat(h), kernels::LoadAsFloat(&h, 0, DType::kFloat16)))
        << std::hex << bits;
    ASSERT_TRUE(SameFloat(client::BFloat16BitsToFloat(h),
                          kernels::LoadAsFloat(&h, 0, DType::kBFloat16)))
        << std::hex << bits;
  }
}

// Each 16-bit value's neighbourhood: the float itself, the midpoints to its neighbours (ties
// go to even) and the floats one ulp either side of those midpoints.
TEST(ClientConversionsTest, FloatsAroundEveryRoundingBoundaryEncodeLikeTheServer) {
  for (DType dtype : {DType::kFloat16, DType::kBFloat16}) {
    for (uint32_t bits = 0; bits < 65536; ++bits) {
      const uint16_t h = static_cast<uint16_t>(bits);
      const float x = kernels::LoadAsFloat(&h, 0, dtype);
      const uint16_t next_bits = static_cast<uint16_t>(bits + 1);
      const float next = kernels::LoadAsFloat(&next_bits, 0, dtype);
      if (!std::isfinite(x)) continue;
      std::vector<float> probes = {x};
      if (std::isfinite(next) && std::signbit(next) == std::signbit(x)) {
        const float mid = static_cast<float>((static_cast<double>(x) + next) / 2);
        probes.push_back(mid);
        probes.push_back(std::nextafter(mid, 0.0f));
        probes.push_back(std::nextafter(mid, mid * 2));
      }
      for (float p : probes) {
        const uint16_t ours = dtype == DType::kFloat16 ? client::FloatToHalfBits(p)
                                                       : client::FloatToBFloat16Bits(p);
        ASSERT_EQ(ours, KernelEncode(p, dtype))
            << (dtype == DType::kFloat16 ? "fp16 " : "bf16 ") << std::hexfloat << p;
      }
    }
  }
}

TEST(ClientConversionsTest, RandomFloatPatternsEncodeLikeTheServer) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 1 << 20; ++i) {
    const float p = FromBits(static_cast<uint32_t>(rng()));
    if (std::isnan(p)) continue;  // NaN payloads may differ; both keep NaN (tested above)
    ASSERT_EQ(client::FloatToHalfBits(p), KernelEncode(p, DType::kFloat16)) << std::hexfloat << p;
    ASSERT_EQ(client::FloatToBFloat16Bits(p), KernelEncode(p, DType::kBFloat16)) << std::hexfloat << p;
  }
}

// ---- fp8 e4m3 ----

uint8_t KernelEncodeFp8(float value) {
  uint8_t out;
  kernels::StoreFromFloat(&out, 0, DType::kFloat8E4M3, value);
  return out;
}

float KernelDecodeFp8(uint8_t code) { return kernels::LoadAsFloat(&code, 0, DType::kFloat8E4M3); }

TEST(ClientConversionsTest, EveryFp8PatternDecodesLikeTheServerAndEncodesBackToItself) {
  for (uint32_t bits = 0; bits < 256; ++bits) {
    const uint8_t code = static_cast<uint8_t>(bits);
    const float x = client::Fp8E4M3BitsToFloat(code);
    ASSERT_TRUE(SameFloat(x, KernelDecodeFp8(code))) << std::hex << bits;
    if (!std::isnan(x)) {
      ASSERT_EQ(client::FloatToFp8E4M3Bits(x), code) << std::hex << bits;
    }
  }
  EXPECT_EQ(client::Fp8E4M3BitsToFloat(0x7e), 448.0f);  // the largest finite
  EXPECT_TRUE(std::isnan(client::Fp8E4M3BitsToFloat(0x7f)));
}

// As for 16 bits: each fp8 value, the midpoints to its neighbours and one ulp either side; and
// past 448, where e4m3fn saturates instead of reaching the NaN pattern.
TEST(ClientConversionsTest, FloatsAroundEveryFp8RoundingBoundaryEncodeLikeTheServer) {
  for (uint32_t bits = 0; bits < 256; ++bits) {
    const uint8_t code = static_cast<uint8_t>(bits);
    const float x = KernelDecodeFp8(code);
    const float next = KernelDecodeFp8(static_cast<uint8_t>(bits + 1));
    if (std::isnan(x)) continue;
    std::vector<float> probes = {x};
    if (!std::isnan(next) && std::signbit(next) == std::signbit(x)) {
      const float mid = static_cast<float>((static_cast<double>(x) + next) / 2);
      probes.push_back(mid);
      probes.push_back(std::nextafter(mid, 0.0f));
      probes.push_back(std::nextafter(mid, mid * 2));
    }
    for (float p : probes)
      ASSERT_EQ(client::FloatToFp8E4M3Bits(p), KernelEncodeFp8(p)) << std::hexfloat << p;
  }
  for (float p : {448.0f, 463.9f, 464.0f, 480.0f, 1e6f, std::numeric_limits<float>::infinity()}) {
    EXPECT_EQ(client::FloatToFp8E4M3Bits(p), 0x7eu) << p;
    EXPECT_EQ(client::FloatToFp8E4M3Bits(-p), 0xfeu) << p;
    EXPECT_EQ(KernelEncodeFp8(p), 0x7eu) << p;
  }
}

TEST(ClientConversionsTest, RandomFloatsEncodeToFp8LikeTheServer) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  // Most of fp8's range is near 1: random bits would almost all saturate or flush to 0.
  std::uniform_real_distribution<float> exponent(-12.0f, 10.0f);
  for (int i = 0; i < 1 << 20; ++i) {
    const float p = (rng() & 1 ? -1.0f : 1.0f) * std::exp2(exponent(rng));
    ASSERT_EQ(client::FloatToFp8E4M3Bits(p), KernelEncodeFp8(p)) << std::hexfloat << p;
  }
}

}  // namespace
}  // namespace attnd
