// GPU tests of the paged-KV append against a host scatter, bitwise, both layouts.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <ostream>
#include <string>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "tests/gpu/gpu_test_util.h"

namespace attnd::kernels::testing {
namespace {

struct AppendCase {
  int64_t head_dim, kv_heads, page_size;
  KvLayout layout;
  int64_t num_tokens;
  int64_t pad;  // extra elements per token row of k/v
};

void PrintTo(const AppendCase& c, std::ostream* os) {
  *os << "d" << c.head_dim << " h" << c.kv_heads << " p" << c.page_size << " n" << c.num_tokens;
}

// Distinct random slots of the pool for n tokens; every 7th token is padding (-1).
std::vector<int64_t> RandomSlots(const KvCacheShape& sh, int64_t n, std::mt19937_64& rng) {
  std::vector<int64_t> slots(sh.num_pages * sh.page_size);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);
  slots.resize(n);
  for (int64_t t = 0; t < n; t += 7) slots[t] = -1;
  return slots;
}

// A two-layer pool of the case's shape with room for its tokens and 50 more slots.
KvCacheShape PoolShape(const AppendCase& c, DType dtype, KvStorage storage) {
  KvCacheShape sh;
  sh.num_layers = 2;
  sh.page_size = c.page_size;
  sh.num_kv_heads = c.kv_heads;
  sh.head_dim = c.head_dim;
  sh.layout = c.layout;
  sh.dtype = dtype;
  sh.storage = storage;
  sh.num_pages = (c.num_tokens + 50 + c.page_size - 1) / c.page_size + 2;
  return sh;
}

class AppendVsHost : public ::testing::TestWithParam<AppendCase> {};

TEST_P(AppendVsHost, Bitwise) {
  SKIP_WITHOUT_GPU();
  const AppendCase c = GetParam();
  std::mt19937_64 rng(std::random_device{}());
  const KvCacheShape sh = PoolShape(c, DType::kBFloat16, KvStorage::kModelDType);
  const int64_t layer = 1;
  std::vector<uint16_t> pool(sh.TotalElems());
  RandomFill16(&pool, sh.dtype, 1.f, rng());
  const int64_t row = c.kv_heads * c.head_dim + c.pad;
  std::vector<uint16_t> k(c.num_tokens * row), v(c.num_tokens * row);
  RandomFill16(&k, sh.dtype, 1.f, rng());
  RandomFill16(&v, sh.dtype, 1.f, rng());
  const std::vector<int64_t> slots = RandomSlots(sh, c.num_tokens, rng);

  DeviceBuffer<uint16_t> dpool(pool.size()), dk(k.size()), dv(v.size());
  DeviceBuffer<int64_t> dslots(slots.size());
  dpool.Upload(pool);
  dk.Upload(k);
  dv.Upload(v);
  dslots.Upload(slots);
  cuda::AppendArgs a;
  a.kv.pool = dpool.get();
  a.kv.shape = sh;
  a.kv.layer = layer;
  a.k = dk.get();
  a.v = dv.get();
  a.k_token_stride = row;
  a.v_token_stride = row;
  a.slot_mapping = dslots.get();
  a.num_tokens = c.num_tokens;
  ATTND_STATUS_OK(cuda::LaunchAppendKv(a, nullptr));
  ATTND_CUDA_OK(cudaDeviceSynchronize());

  for (int64_t t = 0; t < c.num_tokens; ++t) {
    if (slots[t] < 0) continue;
    const int64_t page = slots[t] / c.page_size, slot = slots[t] % c.page_size;
    for (int64_t h = 0; h < c.kv_heads; ++h) {
      for (int kv = 0; kv < 2; ++kv) {
        const auto& src = kv == 0 ? k : v;
        std::memcpy(&pool[sh.Offset(layer, page, kv, slot, h)], &src[t * row + h * c.head_dim],
                    c.head_dim * 2);
      }
    }
  }
  EXPECT_TRUE(dpool.Download() == pool);
}

// An fp8 pool stores fp8(x / scale) of the layer's K and V scales, the bytes the CPU backend's
// encoder gives (fp16 and bf16 inputs; random scales, random slots, padding skipped).
TEST_P(AppendVsHost, Fp8QuantizesLikeTheHostEncoder) {
  SKIP_WITHOUT_GPU();
  const AppendCase c = GetParam();
  std::mt19937_64 rng(std::random_device{}());
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    const KvCacheShape sh = PoolShape(c, dtype, KvStorage::kFp8E4M3);
    const int64_t layer = 1;
    std::uniform_real_distribution<float> scale(0.01f, 0.5f);
    const std::vector<float> scales = {scale(rng), scale(rng), scale(rng), scale(rng)};
    std::vector<uint8_t> pool(sh.TotalBytes());
    RandomFillFp8(pool.data(), pool.size(), 10.f, rng());
    const int64_t row = c.kv_heads * c.head_dim + c.pad;
    std::vector<uint16_t> k(c.num_tokens * row), v(c.num_tokens * row);
    RandomFill16(&k, dtype, 3.f, rng());  // some beyond 448 * scale: saturation
    RandomFill16(&v, dtype, 3.f, rng());
    const std::vector<int64_t> slots = RandomSlots(sh, c.num_tokens, rng);

    DeviceBuffer<uint8_t> dpool(pool.size());
    DeviceBuffer<uint16_t> dk(k.size()), dv(v.size());
    DeviceBuffer<int64_t> dslots(slots.size());
    DeviceBuffer<float> dscales(scales.size());
    dpool.Upload(pool);
    dk.Upload(k);
    dv.Upload(v);
    dslots.Upload(slots);
    dscales.Upload(scales);
    cuda::AppendArgs a;
    a.kv = {dpool.get(), sh, layer, nullptr, dscales.get()};
    a.k = dk.get();
    a.v = dv.get();
    a.k_token_stride = a.v_token_stride = row;
    a.slot_mapping = dslots.get();
    a.num_tokens = c.num_tokens;
    ATTND_STATUS_OK(cuda::LaunchAppendKv(a, nullptr));
    ATTND_CUDA_OK(cudaDeviceSynchronize());

    for (int64_t t = 0; t < c.num_tokens; ++t) {
      if (slots[t] < 0) continue;
      const int64_t page = slots[t] / c.page_size, slot = slots[t] % c.page_size;
      for (int64_t h = 0; h < c.kv_heads; ++h) {
        for (int kv = 0; kv < 2; ++kv) {
          const auto& src = kv == 0 ? k : v;
          const float sc = scales[2 * layer + kv];
          for (int64_t d = 0; d < c.head_dim; ++d) {
            StoreFromFloat(pool.data(), sh.Offset(layer, page, kv, slot, h) + d,
                           DType::kFloat8E4M3,
                           LoadAsFloat(src.data(), t * row + h * c.head_dim + d, dtype) / sc);
          }
        }
      }
    }
    EXPECT_TRUE(dpool.Download() == pool) << (dtype == DType::kBFloat16 ? "bf16" : "fp16");
  }
}

// The rule of a per-token scale pool, written out: each (token, head) row of K and of V gets
// scale = max |x| / 448 (1 for an all-zero row) and codes fp8(x / scale).
float RuleScale(const std::vector<uint16_t>& src, int64_t at, int64_t n, DType dtype) {
  float amax = 0.f;
  for (int64_t d = 0; d < n; ++d) amax = std::max(amax, std::fabs(LoadAsFloat(src.data(), at + d, dtype)));
  return amax > 0.f ? amax / kFp8E4M3Max : 1.f;
}

// Every appended row carries its own scale; rows that are all zero (scale 1) and rows with one
// huge element (only their own scale grows) are among them. Nothing else in the pool (codes or
// scales of other slots, layers) changes.
TEST_P(AppendVsHost, Fp8PerTokenScalesEachRowByItsOwnMaximum) {
  SKIP_WITHOUT_GPU();
  const AppendCase c = GetParam();
  std::mt19937_64 rng(std::random_device{}());
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    const KvCacheShape sh = PoolShape(c, dtype, KvStorage::kFp8E4M3PerToken);
    const int64_t layer = 1;
    std::vector<uint8_t> pool(sh.TotalBytes());
    for (auto& b : pool) b = static_cast<uint8_t>(rng());  // codes and scales: poison
    const int64_t row = c.kv_heads * c.head_dim + c.pad;
    std::vector<uint16_t> k(c.num_tokens * row), v(c.num_tokens * row);
    RandomFill16(&k, dtype, 3.f, rng());
    RandomFill16(&v, dtype, 0.5f, rng());
    for (int64_t t = 0; t < c.num_tokens; t += 5) {  // zero rows and outliers
      std::fill_n(&k[t * row], c.head_dim, uint16_t{0});
      StoreFromFloat(v.data(), t * row + rng() % c.head_dim, dtype, 3000.f);
    }
    const std::vector<int64_t> slots = RandomSlots(sh, c.num_tokens, rng);

    DeviceBuffer<uint8_t> dpool(pool.size());
    DeviceBuffer<uint16_t> dk(k.size()), dv(v.size());
    DeviceBuffer<int64_t> dslots(slots.size());
    dpool.Upload(pool);
    dk.Upload(k);
    dv.Upload(v);
    dslots.Upload(slots);
    cuda::AppendArgs a;
    a.kv = {dpool.get(), sh, layer, nullptr, nullptr};
    a.k = dk.get();
    a.v = dv.get();
    a.k_token_stride = a.v_token_stride = row;
    a.slot_mapping = dslots.get();
    a.num_tokens = c.num_tokens;
    ATTND_STATUS_OK(cuda::LaunchAppendKv(a, nullptr));
    ATTND_CUDA_OK(cudaDeviceSynchronize());

    auto* scales = reinterpret_cast<float*>(pool.data() + sh.ScalesByteOffset());
    for (int64_t t = 0; t < c.num_tokens; ++t) {
      if (slots[t] < 0) continue;
      const int64_t page = slots[t] / c.page_size, slot = slots[t] % c.page_size;
      for (int64_t h = 0; h < c.kv_heads; ++h) {
        for (int kv = 0; kv < 2; ++kv) {
          const auto& src = kv == 0 ? k : v;
          const int64_t at = t * row + h * c.head_dim;
          const float sc = RuleScale(src, at, c.head_dim, dtype);
          scales[sh.ScaleOffset(layer, page, kv, slot, h)] = sc;
          for (int64_t d = 0; d < c.head_dim; ++d) {
            StoreFromFloat(pool.data(), sh.Offset(layer, page, kv, slot, h) + d,
                           DType::kFloat8E4M3, LoadAsFloat(src.data(), at + d, dtype) / sc);
          }
        }
      }
    }
    const std::vector<uint8_t> got = dpool.Download();
    EXPECT_TRUE(std::equal(got.begin(), got.begin() + sh.KvBytes(), pool.begin()))
        << "codes, " << (dtype == DType::kBFloat16 ? "bf16" : "fp16");
    EXPECT_TRUE(std::equal(got.begin() + sh.KvBytes(), got.end(), pool.begin() + sh.KvBytes()))
        << "scales, " << (dtype == DType::kBFloat16 ? "bf16" : "fp16");
  }
}

// Prefill staging and export dequantize a per-token pool row by row; import (the dense
// conversion with row scales) computes the same scales and codes append would, so an exported
// block imports back to the pool's bytes.
TEST(Fp8Convert, PerTokenPagesDequantizeByRowAndRowsRoundTrip) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(std::random_device{}());
  for (KvLayout layout : {KvLayout::kNHD, KvLayout::kHND}) {
    KvCacheShape sh;
    sh.num_layers = 3;
    sh.num_pages = 40;
    sh.page_size = 5;
    sh.num_kv_heads = 3;
    sh.head_dim = 128;
    sh.layout = layout;
    sh.dtype = DType::kBFloat16;
    sh.storage = KvStorage::kFp8E4M3PerToken;
    std::vector<uint8_t> pool(sh.TotalBytes());
    RandomFillFp8(pool.data(), sh.KvBytes(), 40.f, rng());
    auto* scales = reinterpret_cast<float*>(pool.data() + sh.ScalesByteOffset());
    std::uniform_real_distribution<float> scale(0.001f, 2.f);
    for (int64_t i = 0; i < sh.num_layers * sh.LayerScales(); ++i) scales[i] = scale(rng);
    std::vector<int32_t> pages = {7, 3, 39, 0, 12, 25};
    DeviceBuffer<uint8_t> dpool(pool.size());
    DeviceBuffer<int32_t> dpages(pages.size());
    DeviceBuffer<uint16_t> staged(pages.size() * sh.PageElems());
    dpool.Upload(pool);
    dpages.Upload(pages);
    staged.Fill(0xff);
    cuda::DequantizePagesArgs a;
    a.kv = {dpool.get(), sh, 2, nullptr, nullptr};
    a.pages = dpages.get();
    a.num_pages = static_cast<int64_t>(pages.size());
    a.dst = staged.get();
    ATTND_STATUS_OK(cuda::LaunchDequantizePages(a, nullptr));
    ATTND_CUDA_OK(cudaDeviceSynchronize());
    const std::vector<uint16_t> got = staged.Download();
    std::vector<uint16_t> want(got.size());
    for (size_t i = 0; i < pages.size(); ++i)
      for (int kv = 0; kv < 2; ++kv)
        for (int64_t slot = 0; slot < sh.page_size; ++slot)
          for (int64_t h = 0; h < sh.num_kv_heads; ++h) {
            const float sc = scales[sh.ScaleOffset(2, pages[i], kv, slot, h)];
            const int64_t at = sh.Offset(2, pages[i], kv, slot, h);
            const int64_t to = at - sh.Offset(2, pages[i], 0, 0, 0) +
                               static_cast<int64_t>(i) * sh.PageElems();
            for (int64_t d = 0; d < sh.head_dim; ++d)
              StoreFromFloat(want.data(), to + d, sh.dtype,
                             sc * LoadAsFloat(pool.data(), at + d, DType::kFloat8E4M3));
          }
    EXPECT_TRUE(got == want);

    // Rows [tokens][heads][dim] of one page's K block (NHD: the block itself) back to fp8 with
    // row scales: codes and scales as the rule gives them from the staged values.
    if (layout != KvLayout::kNHD) continue;
    const int64_t tokens = sh.page_size, heads = sh.num_kv_heads, n = sh.BlockElems();
    DeviceBuffer<uint8_t> codes(n);
    DeviceBuffer<float> row_scales(tokens * heads);
    row_scales.Fill(0xff);
    cuda::ConvertKvArgs c;
    c.src = staged.get();
    c.dst = codes.get();
    c.n = n;
    c.dtype = sh.dtype;
    c.to_fp8 = true;
    c.row_scales = row_scales.get();
    c.head_dim = sh.head_dim;
    c.heads = heads;
    c.tokens = tokens;
    ATTND_STATUS_OK(cuda::LaunchConvertKv(c, nullptr));
    ATTND_CUDA_OK(cudaDeviceSynchronize());
    const std::vector<uint8_t> back = codes.Download();
    const std::vector<float> back_scales = row_scales.Download();
    std::vector<uint8_t> want_codes(n);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t at = (t * heads + h) * sh.head_dim;
        const float sc = RuleScale(want, at, sh.head_dim, sh.dtype);
        EXPECT_EQ(back_scales[h * tokens + t], sc) << "token " << t << " head " << h;
        for (int64_t d = 0; d < sh.head_dim; ++d)
          StoreFromFloat(want_codes.data(), at + d, DType::kFloat8E4M3,
                         LoadAsFloat(want.data(), at + d, sh.dtype) / sc);
      }
    EXPECT_TRUE(back == want_codes);
    // And from fp8 with those scales: the staged values again.
    DeviceBuffer<uint16_t> again(n);
    again.Fill(0xff);
    c.src = codes.get();
    c.dst = again.get();
    c.to_fp8 = false;
    ATTND_STATUS_OK(cuda::LaunchConvertKv(c, nullptr));
    ATTND_CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint16_t> want_again(n);
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t d = 0; d < sh.head_dim; ++d) {
          const int64_t at = (t * heads + h) * sh.head_dim + d;
          StoreFromFloat(want_again.data(), at, sh.dtype,
                         back_scales[h * tokens + t] *
                             LoadAsFloat(want_codes.data(), at, DType::kFloat8E4M3));
        }
    EXPECT_TRUE(again.Download() == want_again);
  }
}

// Export and prefill read an fp8 pool through these: dequantized pages equal the model-dtype
// rounding of scale * fp8, and a dense round trip through fp8 gives back the same codes.
TEST(Fp8Convert, DequantizePagesAndRoundTripMatchTheHost) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(std::random_device{}());
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    KvCacheShape sh;
    sh.num_layers = 3;
    sh.num_pages = 40;
    sh.page_size = 5;
    sh.num_kv_heads = 2;
    sh.head_dim = 64;
    sh.dtype = dtype;
    sh.storage = KvStorage::kFp8E4M3;
    std::vector<uint8_t> pool(sh.TotalBytes());
    RandomFillFp8(pool.data(), pool.size(), 40.f, rng());
    std::uniform_real_distribution<float> scale(0.01f, 2.f);
    std::vector<float> scales(2 * sh.num_layers);
    for (float& x : scales) x = scale(rng);
    std::vector<int32_t> pages = {7, 3, 39, 0, 12, 12, 25};
    DeviceBuffer<uint8_t> dpool(pool.size());
    DeviceBuffer<float> dscales(scales.size());
    DeviceBuffer<int32_t> dpages(pages.size());
    DeviceBuffer<uint16_t> staged(pages.size() * sh.PageElems());
    dpool.Upload(pool);
    dscales.Upload(scales);
    dpages.Upload(pages);
    staged.Fill(0xff);
    cuda::DequantizePagesArgs a;
    a.kv = {dpool.get(), sh, 2, nullptr, dscales.get()};
    a.pages = dpages.get();
    a.num_pages = static_cast<int64_t>(pages.size());
    a.dst = staged.get();
    ATTND_STATUS_OK(cuda::LaunchDequantizePages(a, nullptr));
    ATTND_CUDA_OK(cudaDeviceSynchronize());
    const std::vector<uint16_t> got = staged.Download();
    std::vector<uint16_t> want(got.size());
    for (size_t i = 0; i < pages.size(); ++i) {
      for (int64_t e = 0; e < sh.PageElems(); ++e) {
        const float sc = scales[2 * 2 + (e < sh.BlockElems() ? 0 : 1)];
        const float x = LoadAsFloat(pool.data(), sh.Offset(2, pages[i], 0, 0, 0) + e,
                                    DType::kFloat8E4M3);
        StoreFromFloat(want.data(), static_cast<int64_t>(i) * sh.PageElems() + e, dtype, sc * x);
      }
    }
    EXPECT_TRUE(got == want);
    // Dense: the staged values back to fp8 with the same scale give the pool's codes.
    const int64_t n = sh.BlockElems();
    DeviceBuffer<uint8_t> codes(n);
    cuda::ConvertKvArgs c;
    c.src = staged.get();
    c.dst = codes.get();
    c.n = n;
    c.dtype = dtype;
    c.to_fp8 = true;
    c.scale = scales[2 * 2];
    ATTND_STATUS_OK(cuda::LaunchConvertKv(c, nullptr));
    ATTND_CUDA_OK(cudaDeviceSynchronize());
    const std::vector<uint8_t> back = codes.Download();
    const uint8_t* first = pool.data() + sh.Offset(2, pages[0], 0, 0, 0);
    EXPECT_TRUE(std::equal(back.begin(), back.end(), first));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AppendVsHost,
    ::testing::Values(AppendCase{128, 8, 16, KvLayout::kNHD, 1, 0},
                      AppendCase{128, 8, 16, KvLayout::kNHD, 256, 0},
                      AppendCase{128, 8, 16, KvLayout::kHND, 4096, 8},
                      AppendCase{64, 4, 1, KvLayout::kNHD, 333, 0},
                      AppendCase{256, 2, 17, KvLayout::kHND, 1000, 16},
                      AppendCase{64, 3, 64, KvLayout::kHND, 999, 8}),
    [](const ::testing::TestParamInfo<AppendCase>& i) {
      const AppendCase& c = i.param;
      return "d" + std::to_string(c.head_dim) + "_h" + std::to_string(c.kv_heads) + "_p" +
             std::to_string(c.page_size) + (c.layout == KvLayout::kNHD ? "_nhd_" : "_hnd_") +
             std::to_string(c.num_tokens) + "tok_pad" + std::to_string(c.pad);
    });

// The checks run before anything touches the device: no GPU needed.
TEST(Append, RejectsBadArgumentsNamingThem) {
  cuda::AppendArgs a;
  a.kv.shape.num_kv_heads = 8;
  a.kv.shape.head_dim = 128;
  a.kv.shape.page_size = 16;
  a.kv.shape.num_pages = 4;
  a.kv.pool = FakeDevicePointer();
  a.k = a.v = FakeDevicePointer();
  a.k_token_stride = a.v_token_stride = 8 * 128 + 3;
  a.slot_mapping = FakeDevicePointer<int64_t>();
  a.num_tokens = 1;
  absl::Status s = cuda::LaunchAppendKv(a, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_EQ(s.message(), "append: k_token_stride 1027 is not a multiple of 8");
  a.k_token_stride = a.v_token_stride = 8 * 128;
  a.kv.shape.head_dim = 96;
  s = cuda::LaunchAppendKv(a, nullptr);
  EXPECT_EQ(s.message(), "append: kv.shape.head_dim 96 is not 64, 128 or 256") << s;
  a.kv.shape.head_dim = 128;
  a.k_token_stride = 100;
  s = cuda::LaunchAppendKv(a, nullptr);
  EXPECT_EQ(s.message(), "append: k_token_stride 100 is less than kv_heads * head_dim 1024") << s;
  a.k_token_stride = 8 * 128;
  a.num_tokens = 0;  // nothing to do: no launch
  ATTND_STATUS_OK(cuda::LaunchAppendKv(a, nullptr));
}

}  // namespace
}  // namespace attnd::kernels::testing
