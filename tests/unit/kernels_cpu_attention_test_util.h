// Helpers shared by the kernels_cpu_attention_test sources (tests of kernels/cpu_attention.h):
// dtype names, fresh seeds, and the set-up of paged tests (shuffled page tables, random tensors,
// NaN poisoning).
#ifndef ATTND_TESTS_UNIT_KERNELS_CPU_ATTENTION_TEST_UTIL_H_
#define ATTND_TESTS_UNIT_KERNELS_CPU_ATTENTION_TEST_UTIL_H_

#include <algorithm>
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
  }
  return "?";
}

inline uint32_t FreshSeed() { return std::random_device{}(); }

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
