// Tests of kernels/cpu_attention.h: the paged append (CpuAppendKv) writes each token where the
// layout's Offset says, through a shuffled page table, and nothing else; into an fp8 pool, each
// value quantized with its tensor's scale.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu_attention.h"
#include "kernels/paged_kv.h"
#include "tests/unit/kernels_cpu_attention_test_util.h"

namespace attnd::kernels::cpu_attention_test_util {
namespace {

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

  // Two appends, the second starting mid-page, as a prompt then a continuation would. A
  // model-dtype pool ignores the scales: the bytes are copied as they come.
  const int64_t first = 7;
  const KvScales scales{2.5f, 0.3f};
  CpuAppendKv(pool.data(), shape, layer, table.data(), 0, first, k.data(), v.data(), scales);
  CpuAppendKv(pool.data(), shape, layer, table.data(), first, total - first,
              k.data() + first * row * es, v.data() + first * row * es, scales);

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
// Append into an fp8 pool.

// Model-dtype values spread over 2^-14 .. 2^12 in magnitude, so that some quantize to
// subnormals or zero and some saturate, whatever the scale.
std::vector<uint8_t> WideRandomTensor(int64_t elems, DType dtype, std::mt19937& rng) {
  std::vector<uint8_t> bytes(elems * DTypeSize(dtype));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> octave(-14.0f, 12.0f);
  for (int64_t i = 0; i < elems; ++i) {
    StoreFromFloat(bytes.data(), i, dtype, normal(rng) * std::exp2(octave(rng)));
  }
  return bytes;
}

class AppendFp8Test : public ::testing::TestWithParam<AppendCase> {};

TEST_P(AppendFp8Test, StoresEachValueQuantizedWithItsTensorsScale) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  KvCacheShape shape;
  shape.num_layers = 2;
  shape.num_pages = 7;
  shape.page_size = 4;
  shape.num_kv_heads = 2;
  shape.head_dim = 12;
  shape.layout = GetParam().layout;
  shape.dtype = GetParam().dtype;
  shape.storage = KvStorage::kFp8E4M3;
  const int64_t layer = 1;
  const int64_t es = DTypeSize(shape.dtype);
  const int64_t row = shape.num_kv_heads * shape.head_dim;
  const int64_t total = 13;
  const std::vector<int32_t> table = ShuffledPageTable(4, shape.num_pages, rng);
  std::uniform_real_distribution<float> octave(-4.0f, 2.0f);
  const KvScales scales{std::exp2(octave(rng)), std::exp2(octave(rng))};
  SCOPED_TRACE("scales " + std::to_string(scales.k) + " " + std::to_string(scales.v));

  std::vector<uint8_t> pool(shape.TotalBytes(), 0xAB);
  const auto k = WideRandomTensor(total * row, shape.dtype, rng);
  const auto v = WideRandomTensor(total * row, shape.dtype, rng);
  const int64_t first = 6;
  CpuAppendKv(pool.data(), shape, layer, table.data(), 0, first, k.data(), v.data(), scales);
  CpuAppendKv(pool.data(), shape, layer, table.data(), first, total - first,
              k.data() + first * row * es, v.data() + first * row * es, scales);

  std::vector<bool> written(shape.TotalElems(), false);
  for (int64_t pos = 0; pos < total; ++pos) {
    const int64_t page = table[pos / shape.page_size];
    for (int64_t h = 0; h < shape.num_kv_heads; ++h) {
      for (int kv = 0; kv < 2; ++kv) {
        const int64_t at = shape.Offset(layer, page, kv, pos % shape.page_size, h);
        const float scale = kv == 0 ? scales.k : scales.v;
        for (int64_t i = 0; i < shape.head_dim; ++i) {
          const float x = LoadAsFloat((kv == 0 ? k : v).data(), pos * row + h * shape.head_dim + i,
                                      shape.dtype);
          uint8_t scalar;
          StoreFromFloat(&scalar, 0, DType::kFloat8E4M3, x / scale);
          ASSERT_EQ(pool[at + i], scalar) << "pos " << pos << " head " << h << " kv " << kv;
          ASSERT_EQ(pool[at + i], NearestFp8(x / scale)) << std::hexfloat << x;
          written[at + i] = true;
        }
      }
    }
  }
  int64_t stray = 0;
  for (int64_t e = 0; e < shape.TotalElems(); ++e) stray += !written[e] && pool[e] != 0xAB;
  EXPECT_EQ(stray, 0) << "bytes changed outside the appended rows";
}

// dtype is the model's here (of k and v); the pool is fp8.
INSTANTIATE_TEST_SUITE_P(LayoutsAndModelDtypes, AppendFp8Test, ::testing::ValuesIn(AppendCases()),
                         [](const auto& info) { return info.param.Name(); });

}  // namespace
}  // namespace attnd::kernels::cpu_attention_test_util
