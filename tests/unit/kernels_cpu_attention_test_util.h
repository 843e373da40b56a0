// Helpers shared by the kernels_cpu_attention_test sources (tests of kernels/cpu_attention.h):
// dtype names, fresh seeds, and the set-up of paged tests (shuffled page tables, random tensors,
// NaN poisoning).
#ifndef ATTND_TESTS_UNIT_KERNELS_CPU_ATTENTION_TEST_UTIL_H_
#define ATTND_TESTS_UNIT_KERNELS_CPU_ATTENTION_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <utility>
#include <vector>

#include "kernels/cpu_attention.h"
#include "kernels/paged_kv.h"

namespace attnd::kernels::cpu_attention_test_util {

inline const char* DTypeName(DType t) {
  switch (t) {
    case DType::kFloat16:
      return "f16";
    case DType::kBFloat16:
      return "bf16";
    case DType::kFloat32:
      return "f32";
    case DType::kFloat8E4M3:
      return "fp8";
  }
  return "?";
}

inline uint32_t FreshSeed() { return std::random_device{}(); }

// ---------------------------------------------------------------------------------------------
// fp8 e4m3 by its definition, independent of the code under test.

// The value of an e4m3fn code: sign * 2^(e-7) * (1 + m/8), subnormals (e = 0) sign * 2^-6 * m/8,
// NaN for 0x7f and 0xff (no infinities).
inline double Fp8Value(uint8_t code) {
  const double sign = (code & 0x80) ? -1.0 : 1.0;
  const int e = (code >> 3) & 0xf;
  const int m = code & 0x7;
  if (e == 15 && m == 7) return std::nan("");
  if (e == 0) return sign * std::ldexp(m / 8.0, -6);
  return sign * std::ldexp(1.0 + m / 8.0, e - 7);
}

// The saturating round-to-nearest-even encoding by brute force: the finite magnitude code
// nearest to |v| (ties to the even code, which is the even mantissa), with v's sign. Searching
// the finite codes only is what saturation means: past 448 the nearest finite value is 448.
// v must not be NaN.
inline uint8_t NearestFp8(float v) {
  const double target = std::fabs(static_cast<double>(v));
  uint8_t best = 0;
  double best_dist = std::numeric_limits<double>::infinity();
  for (uint32_t m = 0; m < 0x7f; ++m) {
    const double dist = std::fabs(Fp8Value(static_cast<uint8_t>(m)) - target);
    if (dist < best_dist || (dist == best_dist && (m & 1) == 0)) {
      best = static_cast<uint8_t>(m);
      best_dist = dist;
    }
  }
  if (std::isinf(target)) best = 0x7e;  // every distance is infinite; the largest is the nearest
  return static_cast<uint8_t>(best | (std::signbit(v) ? 0x80 : 0));
}

// ---------------------------------------------------------------------------------------------
// Shared set-up for paged tests.

// A page table of `count` distinct pages out of `num_pages`, shuffled, and never ascending
// consecutive (which would let a kernel that ignores the table pass by accident).
inline std::vector<int32_t> ShuffledPageTable(int64_t count, int64_t num_pages, std::mt19937& rng) {
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
inline std::vector<uint8_t> RandomTensor(int64_t elems, DType dtype, float stddev,
                                         std::mt19937& rng) {
  std::vector<uint8_t> bytes(elems * DTypeSize(dtype));
  std::normal_distribution<float> dist(0.0f, stddev);
  for (int64_t i = 0; i < elems; ++i) StoreFromFloat(bytes.data(), i, dtype, dist(rng));
  return bytes;
}

inline void PoisonWithNan(void* data, int64_t elems, DType dtype) {
  for (int64_t i = 0; i < elems; ++i) {
    StoreFromFloat(data, i, dtype, std::numeric_limits<float>::quiet_NaN());
  }
}

}  // namespace attnd::kernels::cpu_attention_test_util

#endif  // ATTND_TESTS_UNIT_KERNELS_CPU_ATTENTION_TEST_UTIL_H_
