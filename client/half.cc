#include "client/half.h"

#include <bit>

namespace attnd::client {

uint16_t FloatToHalfBits(float value) {
  const uint32_t x = std::bit_cast<uint32_t>(value);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7fffffffu;

  if (ax >= 0x7f800000u) {  // inf or NaN
    if (ax == 0x7f800000u) return sign | 0x7c00u;
    // Keep the top payload bits and force the quiet bit so no NaN turns into inf.
    return sign | 0x7e00u | static_cast<uint16_t>((ax >> 13) & 0x3ffu);
  }
  // 65520 is half-way between the largest half (65504) and 2^16; ties go to the even
  // neighbour, which is 2^16, i.e. inf.
  if (ax >= 0x477ff000u) return sign | 0x7c00u;

  if (ax < 0x38800000u) {  // below 2^-14: a half subnormal (or zero)
    // Adding 0.5f puts the value in a binade whose ulp is 2^-24, the half subnormal step, so the
    // FPU's own round-to-nearest-even does the rounding; the low bits are then the mantissa.
    // A result of 0x400 is the smallest normal, which is encoded the same way.
    constexpr uint32_t kHalfBits = 0x3f000000u;  // 0.5f
    const float shifted = std::bit_cast<float>(ax) + std::bit_cast<float>(kHalfBits);
    return sign | static_cast<uint16_t>(std::bit_cast<uint32_t>(shifted) - kHalfBits);
  }

  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest
  // even. A carry out of the mantissa correctly bumps the exponent (and may reach inf).
  const uint32_t odd = (ax >> 13) & 1u;
  ax -= (127u - 15u) << 23;
  ax += 0xfffu + odd;
  return sign | static_cast<uint16_t>(ax >> 13);
}

float HalfBitsToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float.
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(magnitude));
  }
  if (exponent == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  return std::bit_cast<float>(sign | ((exponent + (127u - 15u)) << 23) | (mantissa << 13));
}

uint16_t FloatToBFloat16Bits(float value) {
  const uint32_t x = std::bit_cast<uint32_t>(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    // Truncating a NaN could clear every payload bit left and make it inf; set the quiet bit.
    return static_cast<uint16_t>((x >> 16) | 0x40u);
  }
  // Round to nearest even on the 16 dropped bits; overflow rounds up into inf as it should.
  const uint32_t odd = (x >> 16) & 1u;
  return static_cast<uint16_t>((x + 0x7fffu + odd) >> 16);
}

float BFloat16BitsToFloat(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

uint8_t FloatToFp8E4M3Bits(float value) {
  const uint32_t x = std::bit_cast<uint32_t>(value);
  const uint8_t sign = static_cast<uint8_t>((x >> 24) & 0x80u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7fu;
  // 448 is the largest finite e4m3fn; everything from 464 (half-way to 480, which would be the
  // NaN pattern) up, infinities included, saturates, and [448, 464) rounds to 448 anyway.
  if (ax >= std::bit_cast<uint32_t>(448.0f)) return sign | 0x7eu;
  if (ax < std::bit_cast<uint32_t>(0x1p-6f)) {  // below the smallest normal: units of 2^-9
    // 2^14's ulp is 2^-9: the FPU's round-to-nearest-even does the rounding, and the low bits
    // count the units (8 units, reached by rounding up, is 2^-6, encoded the same way).
    constexpr float kShift = 0x1p14f;
    const float shifted = std::bit_cast<float>(ax) + kShift;
    return sign |
           static_cast<uint8_t>(std::bit_cast<uint32_t>(shifted) - std::bit_cast<uint32_t>(kShift));
  }
  // Normal: rebias the exponent (127 -> 7) and round the 20 dropped mantissa bits to nearest
  // even; a carry out of the mantissa bumps the exponent (never past 448, checked above).
  const uint32_t odd = (ax >> 20) & 1u;
  const uint32_t rounded = ax - ((127u - 7u) << 23) + 0x7ffffu + odd;
  return sign | static_cast<uint8_t>(rounded >> 20);
}

float Fp8E4M3BitsToFloat(uint8_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x80u) << 24;
  const uint32_t exponent = (bits >> 3) & 0xfu;
  const uint32_t mantissa = bits & 0x7u;
  if (exponent == 0xf && mantissa == 0x7) return std::bit_cast<float>(sign | 0x7fc00000u);
  // Zero or subnormal: mantissa * 2^-9, exact in float; else rebias the exponent (7 -> 127).
  const uint32_t magnitude = exponent == 0
                                 ? std::bit_cast<uint32_t>(static_cast<float>(mantissa) * 0x1p-9f)
                                 : ((exponent + (127u - 7u)) << 23) | (mantissa << 20);
  return std::bit_cast<float>(sign | magnitude);
}

}  // namespace attnd::client
