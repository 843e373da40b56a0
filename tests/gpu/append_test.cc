// GPU tests of the paged-KV append against a host scatter, bitwise, both layouts.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

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

class AppendVsHost : public ::testing::TestWithParam<AppendCase> {};

TEST_P(AppendVsHost, Bitwise) {
  SKIP_WITHOUT_GPU();
  const AppendCase c = GetParam();
  std::mt19937_64 rng(std::random_device{}());
  KvCacheShape sh;
  sh.num_layers = 2;
  sh.page_size = c.page_size;
  sh.num_kv_heads = c.kv_heads;
  sh.head_dim = c.head_dim;
  sh.layout = c.layout;
  sh.dtype = DType::kBFloat16;
  const int64_t slots_needed = c.num_tokens + 50;
  sh.num_pages = (slots_needed + c.page_size - 1) / c.page_size + 2;
  const int64_t layer = 1;
  std::vector<uint16_t> pool(sh.TotalElems());
  RandomFill16(&pool, sh.dtype, 1.f, rng());
  const int64_t row = c.kv_heads * c.head_dim + c.pad;
  std::vector<uint16_t> k(c.num_tokens * row), v(c.num_tokens * row);
  RandomFill16(&k, sh.dtype, 1.f, rng());
  RandomFill16(&v, sh.dtype, 1.f, rng());
  // Distinct random slots; every 7th token is padding (-1).
  std::vector<int64_t> slots(sh.num_pages * sh.page_size);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);
  slots.resize(c.num_tokens);
  for (int64_t t = 0; t < c.num_tokens; t += 7) slots[t] = -1;

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
