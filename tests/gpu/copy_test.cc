// The paged pull kernel (KV transfer within one node): random shapes, layouts, head ranges,
// layer ranges and scattered page tables; every pulled element lands where the pool layout says
// and nothing else in the destination changes (it is poisoned first).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "tests/gpu/gpu_test_util.h"

namespace attnd::kernels::testing {
namespace {

using cuda::PagedPullParams;

std::vector<int32_t> Scattered(int64_t pool_pages, int64_t n, std::mt19937_64& rng) {
  std::vector<int32_t> all(static_cast<size_t>(pool_pages));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(static_cast<size_t>(n));
  return all;
}

TEST(PagedPullTest, EveryPulledElementLandsInItsPlaceAndNothingElseChanges) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(20261129);
  for (int trial = 0; trial < 24; ++trial) {
    SCOPED_TRACE(::testing::Message() << "trial " << trial);
    const bool hnd = trial % 2;
    const int64_t ps = 1 + rng() % 20, dim = 64, src_heads = 1 + rng() % 8;
    const int64_t h0 = rng() % src_heads, h1 = h0 + 1 + rng() % (src_heads - h0);
    const int64_t layers = 1 + rng() % 3, src_pool = 24, dst_pool = 20;
    const int64_t l0 = rng() % layers, l1 = l0 + 1 + rng() % (layers - l0);
    const int64_t dl0 = rng() % 2, dst_layers = dl0 + (l1 - l0);
    const int64_t tokens = 1 + rng() % (ps * 10);
    const int64_t pages = (tokens + ps - 1) / ps;
    const std::vector<int32_t> sp = Scattered(src_pool, pages, rng);
    const std::vector<int32_t> dp = Scattered(dst_pool, pages, rng);
    const int64_t src_elems = layers * src_pool * 2 * ps * src_heads * dim;
    const int64_t dst_elems = dst_layers * dst_pool * 2 * ps * (h1 - h0) * dim;
    // Every third trial: per-token scale pools, the scales after the pages (256-byte aligned).
    const bool token_scales = trial % 3 == 2;
    const int64_t src_scales_at = (src_elems * 2 + 255) / 256 * 256;
    const int64_t dst_scales_at = (dst_elems * 2 + 255) / 256 * 256;
    const int64_t src_scales = token_scales ? layers * src_pool * 2 * src_heads * ps : 0;
    const int64_t dst_scales = token_scales ? dst_layers * dst_pool * 2 * (h1 - h0) * ps : 0;
    const int64_t src_total = token_scales ? (src_scales_at + 4 * src_scales) / 2 : src_elems;
    const int64_t dst_total = token_scales ? (dst_scales_at + 4 * dst_scales) / 2 : dst_elems;
    std::vector<uint16_t> a(static_cast<size_t>(src_total));
    for (auto& x : a) x = static_cast<uint16_t>(rng());
    DeviceBuffer<uint16_t> d_src(a.size()), d_dst(static_cast<size_t>(dst_total));
    DeviceBuffer<int32_t> d_sp(sp.size()), d_dp(dp.size());
    d_src.Upload(a);
    d_sp.Upload(sp);
    d_dp.Upload(dp);
    d_dst.Fill(0xEE);
    PagedPullParams p;
    p.src = reinterpret_cast<const uint8_t*>(d_src.get());
    p.dst = reinterpret_cast<uint8_t*>(d_dst.get());
    p.src_pages = d_sp.get();
    p.dst_pages = d_dp.get();
    p.src_pool_pages = src_pool;
    p.dst_pool_pages = dst_pool;
    p.src_heads = src_heads;
    p.dst_heads = h1 - h0;
    p.head_begin = h0;
    p.layer_begin = l0;
    p.layer_end = l1;
    p.dst_layer_begin = dl0;
    p.num_tokens = tokens;
    p.page_size = ps;
    p.head_dim = dim;
    p.elem_bytes = 2;
    p.hnd = hnd;
    if (token_scales) {
      p.src_scales_offset = src_scales_at;
      p.dst_scales_offset = dst_scales_at;
    }
    ATTND_STATUS_OK(cuda::LaunchPagedPull(p, nullptr));
    ATTND_CUDA_OK(cudaDeviceSynchronize());
    // Element offset of (layer, page, kv, slot, head) in a pool of `heads` heads.
    const auto at = [&](int64_t pool, int64_t heads, int64_t l, int64_t page, int kv,
                        int64_t slot, int64_t h) {
      const int64_t block = ((l * pool + page) * 2 + kv) * ps * heads * dim;
      return block + (hnd ? (h * ps + slot) : (slot * heads + h)) * dim;
    };
    std::vector<uint16_t> want(static_cast<size_t>(dst_total), 0xEEEE);
    for (int64_t l = l0; l < l1; ++l)
      for (int64_t t = 0; t < tokens; ++t)
        for (int kv = 0; kv < 2; ++kv)
          for (int64_t h = h0; h < h1; ++h)
            for (int64_t e = 0; e < dim; ++e)
              want[at(dst_pool, h1 - h0, dl0 + l - l0, dp[t / ps], kv, t % ps, h - h0) + e] =
                  a[at(src_pool, src_heads, l, sp[t / ps], kv, t % ps, h) + e];
    // A scale is two 16-bit words at float index ((layer * pool + page) * 2 + kv) * heads * ps
    // + head * ps + slot after the pool's scales offset.
    const auto scale_word = [&](int64_t at_bytes, int64_t pool, int64_t heads, int64_t l,
                                int64_t page, int kv, int64_t slot, int64_t h) {
      return at_bytes / 2 + 2 * ((((l * pool + page) * 2 + kv) * heads + h) * ps + slot);
    };
    if (token_scales) {
      for (int64_t l = l0; l < l1; ++l)
        for (int64_t t = 0; t < tokens; ++t)
          for (int kv = 0; kv < 2; ++kv)
            for (int64_t h = h0; h < h1; ++h)
              for (int w = 0; w < 2; ++w)
                want[scale_word(dst_scales_at, dst_pool, h1 - h0, dl0 + l - l0, dp[t / ps], kv,
                                t % ps, h - h0) + w] =
                    a[scale_word(src_scales_at, src_pool, src_heads, l, sp[t / ps], kv, t % ps,
                                 h) + w];
    }
    ASSERT_EQ(d_dst.Download(), want);
  }
}

TEST(PagedPullTest, AHeadRangeOutsideTheSourceIsRefusedNamingIt) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer<uint8_t> d(1 << 16);
  DeviceBuffer<int32_t> pages(1);
  PagedPullParams p;
  p.src = d.get();
  p.dst = d.get();
  p.src_pages = p.dst_pages = pages.get();
  p.src_heads = 4;
  p.dst_heads = 4;
  p.head_begin = 1;
  p.layer_end = 1;
  p.num_tokens = 1;
  p.page_size = 1;
  p.head_dim = 64;
  p.elem_bytes = 2;
  const absl::Status s = cuda::LaunchPagedPull(p, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("head_begin"), std::string::npos);
}

}  // namespace
}  // namespace attnd::kernels::testing
