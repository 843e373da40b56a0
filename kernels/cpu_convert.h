// The CPU kernels' conversions between the storage dtypes and float, scalar and four at a time,
// and the dtype traits the attention loops are templated on. Internal to kernels/: the API is
// LoadAsFloat and friends in cpu_attention.h (defined in cpu_convert.cc).
#ifndef ATTND_KERNELS_CPU_CONVERT_H_
#define ATTND_KERNELS_CPU_CONVERT_H_

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/paged_kv.h"

namespace attnd::kernels::cpu_convert {

// ---------------------------------------------------------------------------------------------
// Scalar conversions. Bit manipulation rather than compiler intrinsics so that the result does
// not depend on the host's F16C support or the floating-point rounding mode.

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Rounds `value >> shift` to nearest, ties to even. 1 <= shift <= 31.
inline uint32_t ShiftRightRne(uint32_t value, int shift) {
  const uint32_t kept = value >> shift;
  const uint32_t rest = value & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  return kept + ((rest > half || (rest == half && (kept & 1))) ? 1 : 0);
}

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ff;
  if (exp == 0x1f) return BitsFloat(sign | 0x7f800000 | (mant << 13));  // inf, nan (payload kept)
  if (exp != 0) return BitsFloat(sign | ((exp + 112) << 23) | (mant << 13));
  // Zero or subnormal: mant * 2^-24, exact in float since mant < 2^10.
  const float magnitude = static_cast<float>(mant) * 0x1p-24f;
  return sign ? -magnitude : magnitude;
}

inline uint16_t FloatToHalf(float f) {
  const uint32_t x = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t abs = x & 0x7fffffff;
  if (abs > 0x7f800000) {
    // NaN: keep it quiet and keep the top payload bits.
    return static_cast<uint16_t>(sign | 0x7e00 | ((abs >> 13) & 0x3ff));
  }
  // 65520 (0x477ff000) is the midpoint between the largest half, 65504, and 2^16; the tie goes to
  // the even neighbour 2^16, which does not exist, so it and everything above become infinity.
  if (abs >= 0x477ff000) return static_cast<uint16_t>(sign | 0x7c00);
  const uint32_t exp = abs >> 23;
  if (exp >= 113) {
    // Normal half. Rebias the exponent, round away 13 mantissa bits; a carry out of the mantissa
    // correctly bumps the exponent.
    const uint32_t rebased = abs - (112u << 23);
    return static_cast<uint16_t>(sign | ShiftRightRne(rebased, 13));
  }
  // Below 2^-24 / 2 the value rounds to zero (2^-25 exactly is a tie that goes to even zero, which
  // the general path below also handles; exponents under 102 would shift by more than 24).
  if (exp < 102) return sign;
  // Subnormal half (or the smallest normal after rounding up): units of 2^-24.
  // value = significand * 2^(exp - 150), so units = significand >> (126 - exp).
  const uint32_t significand = (abs & 0x7fffff) | 0x800000;
  return static_cast<uint16_t>(sign | ShiftRightRne(significand, static_cast<int>(126 - exp)));
}

// fp32 moves go through memcpy so NaN payloads (even signalling ones) pass through bit-exact.
inline float LoadF32(const void* base, int64_t index) {
  float f;
  std::memcpy(&f, static_cast<const float*>(base) + index, sizeof(f));
  return f;
}

inline void StoreF32(void* base, int64_t index, float value) {
  std::memcpy(static_cast<float*>(base) + index, &value, sizeof(value));
}

inline float Bf16ToFloat(uint16_t b) { return BitsFloat(static_cast<uint32_t>(b) << 16); }

inline uint16_t FloatToBf16(float f) {
  const uint32_t x = FloatBits(f);
  if ((x & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((x >> 16) | 0x0040);  // quiet NaN
  // Round to nearest even on the low 16 bits; overflow carries into the exponent and ends at inf.
  return static_cast<uint16_t>((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

// fp8 e4m3 (OCP e4m3fn): sign, 4 exponent bits biased by 7, 3 mantissa bits; exponent 0 holds
// the subnormals m * 2^-9; 0x7f and 0xff are NaN; there is no infinity and the largest finite
// value is 448 (0x7e).
inline constexpr float Fp8Decode(uint8_t code) {
  const uint32_t sign = static_cast<uint32_t>(code & 0x80) << 24;
  const uint32_t exp = (code >> 3) & 0xf;
  const uint32_t mant = code & 0x7;
  if ((code & 0x7f) == 0x7f) return std::bit_cast<float>(sign | 0x7fc00000u);
  // Subnormal or zero: mant * 2^-9, exact in float (and computed without float denormals).
  if (exp == 0) return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(mant * 0x1p-9f));
  return std::bit_cast<float>(sign | ((exp + 120) << 23) | (mant << 20));
}

// Every code's value, so that a load is one indexed read (the table is 1 KiB, it stays in L1).
inline constexpr std::array<float, 256> kFp8Values = [] {
  std::array<float, 256> values{};
  for (int c = 0; c < 256; ++c) values[c] = Fp8Decode(static_cast<uint8_t>(c));
  return values;
}();

inline float Fp8ToFloat(uint8_t code) { return kFp8Values[code]; }

// Round to nearest even, saturating like CUDA's __nv_cvt_float_to_fp8(x, __NV_SATFINITE,
// __NV_E4M3) (PTX cvt.rn.satfinite.e4m3x2): everything beyond +-448, infinities included,
// becomes +-448; NaN becomes the canonical 0x7f. A round-to-nearest value above 448 could only
// be 480, which e4m3fn spends on NaN, so saturating there is the only finite choice.
inline uint8_t FloatToFp8(float f) {
  const uint32_t x = FloatBits(f);
  const uint8_t sign = static_cast<uint8_t>((x >> 24) & 0x80);
  const uint32_t abs = x & 0x7fffffff;
  if (abs > 0x7f800000) return 0x7f;
  if (abs >= 0x43e00000) return static_cast<uint8_t>(sign | 0x7e);  // 448 and above
  const uint32_t exp = abs >> 23;
  if (exp >= 121) {
    // Normal fp8 (2^-6 and up): rebias the exponent (127 -> 7), round away 20 mantissa bits; a
    // carry out of the mantissa bumps the exponent, and nothing under 448 carries into NaN.
    return static_cast<uint8_t>(sign | ShiftRightRne(abs - (120u << 23), 20));
  }
  // Far below half the smallest subnormal (2^-10): zero (exponents under 110 would shift by
  // more than 31).
  if (exp < 110) return sign;
  // Subnormal fp8 (or the smallest normal after rounding up): units of 2^-9.
  // value = significand * 2^(exp - 150), so units = significand >> (141 - exp).
  const uint32_t significand = (abs & 0x7fffff) | 0x800000;
  return static_cast<uint8_t>(sign | ShiftRightRne(significand, static_cast<int>(141 - exp)));
}

// ---------------------------------------------------------------------------------------------
// Four-float vectors through the GCC/Clang vector extension: SSE2 on baseline x86-64, NEON on
// Arm, wider instructions when the build targets them. One portable source, no intrinsics; the
// kernels' plain loops would not be vectorised at -O2 (float reductions may not be reordered, and
// the cheap cost model skips loops that need alias checks).

using V4f = float __attribute__((vector_size(16)));
using V4u = uint32_t __attribute__((vector_size(16)));
using V4i = int32_t __attribute__((vector_size(16)));
using V4h = uint16_t __attribute__((vector_size(8)));

inline V4f LoadV(const float* p) {
  V4f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void StoreV(float* p, V4f v) { std::memcpy(p, &v, sizeof(v)); }

inline V4f Broadcast(float f) { return V4f{f, f, f, f}; }

inline float HorizontalSum(V4f v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// Four 16-bit patterns zero-extended to 32 bits.
inline V4u Widen(const uint16_t* p) {
  V4h h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, V4u);
}

// Vector form of HalfToFloat: normals by rebiasing the exponent, exponent 31 (inf/nan) by moving
// it to 255, subnormals through an exact int->float conversion (no float denormal arithmetic,
// which is slow on some cores and wrong under flush-to-zero).
inline V4f HalfToFloat4(V4u x) {
  const V4u sign = (x & 0x8000u) << 16;
  const V4u exp = x & 0x7c00u;
  const V4u shifted = (x & 0x7fffu) << 13;
  const V4u normal = shifted + (112u << 23);
  const V4u special = shifted + (224u << 23);
  const V4f sub = __builtin_convertvector(reinterpret_cast<V4i>(x & 0x3ffu), V4f) * 0x1p-24f;
  const V4u magnitude =
      exp == 0u ? reinterpret_cast<V4u>(sub) : (exp == 0x7c00u ? special : normal);
  return reinterpret_cast<V4f>(magnitude | sign);
}

// ---------------------------------------------------------------------------------------------
// Dtype traits: the attention loops are templated on these so there is no per-element switch.

struct F32 {
  using Storage = float;
  static float Load(Storage s) { return s; }
  static Storage Store(float f) { return f; }
  static V4f Load4(const Storage* p) { return LoadV(p); }
};
struct F16 {
  using Storage = uint16_t;
  static float Load(Storage s) { return HalfToFloat(s); }
  static Storage Store(float f) { return FloatToHalf(f); }
  static V4f Load4(const Storage* p) { return HalfToFloat4(Widen(p)); }
};
struct BF16 {
  using Storage = uint16_t;
  static float Load(Storage s) { return Bf16ToFloat(s); }
  static Storage Store(float f) { return FloatToBf16(f); }
  static V4f Load4(const Storage* p) { return reinterpret_cast<V4f>(Widen(p) << 16); }
};

// The pool side of an fp8 pool; there is no fp8 query or output.
struct Fp8 {
  using Storage = uint8_t;
  static float Load(Storage s) { return Fp8ToFloat(s); }
  static Storage Store(float f) { return FloatToFp8(f); }
  static V4f Load4(const Storage* p) {
    return V4f{Fp8ToFloat(p[0]), Fp8ToFloat(p[1]), Fp8ToFloat(p[2]), Fp8ToFloat(p[3])};
  }
};

template <typename T>
inline void LoadRow(const typename T::Storage* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) StoreV(dst + i, T::Load4(src + i));
  for (; i < n; ++i) dst[i] = T::Load(src[i]);
}

template <typename T>
inline void StoreRow(const float* src, int64_t n, typename T::Storage* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = T::Store(src[i]);
}

// fp8(x / scale) of n values of T: how an fp8 pool stores what is appended or imported. The
// division is in float (not a multiplication by 1 / scale, which can round differently).
template <typename T>
inline void QuantizeRow(const typename T::Storage* src, int64_t n, float scale, uint8_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = FloatToFp8(T::Load(src[i]) / scale);
}

// The scale a kFp8E4M3PerToken pool gives a row of n values of T: max |x| / 448 (an IEEE float
// division), so the largest magnitude maps to e4m3's largest value; 1 for a row whose maximum
// is 0, whose codes are then zeros. fmax skips NaN, so one NaN does not poison the row's scale
// (it still stores the NaN code, as the per-layer path does).
template <typename T>
inline float RowScale(const typename T::Storage* src, int64_t n) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::fmax(amax, std::fabs(T::Load(src[i])));
  return amax > 0.0f ? amax / kFp8E4M3Max : 1.0f;
}

}  // namespace attnd::kernels::cpu_convert

#endif  // ATTND_KERNELS_CPU_CONVERT_H_
