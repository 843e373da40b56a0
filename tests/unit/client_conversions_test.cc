// The client rounds fp16/bf16 on its own (client/ may depend on proto only); the server's CPU
// paths round in kernels/. Both must agree bit for bit, or a client's reference would differ
// from what the server stores. This checks the two independent implementations against each
// other: every 16-bit pattern decoded, and floats around every rounding boundary encoded.
#include <cmath>
#include <cstdint>
#include <cstring>
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

}  // namespace
}  // namespace attnd
