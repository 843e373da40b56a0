// Tests of server/cpu/cpu_backend.h over an fp8 pool with per-token scales: the pool holds the
// scales after the pages (pool_bytes counts them); append stores each (token, kv head) row's
// scale and codes; copy-on-write copies a page's scales of every layer with its codes;
// TransferKv exports scale * code per row in the model's dtype and imports by quantizing each
// row as append does, so an export imported elsewhere gives back the same codes and scales, bit
// for bit; SetKvScales is refused. Expectations come from the rule written out here (max |x| /
// 448, NearestFp8), the fp8 definition (Fp8Value) and the fp64 reference.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "kernels/cpu_attention.h"
#include "kernels/paged_kv.h"
#include "server/config/config.h"
#include "server/cpu/cpu_backend.h"
#include "server/platform/backend.h"
#include "tests/unit/kernels_cpu_attention_test_util.h"
#include "tests/unit/unit_test_util.h"

namespace attnd {
namespace {

using kernels::DType;
using kernels::KvLayout;
using kernels::KvScales;
using kernels::KvStorage;
using kernels::cpu_attention_test_util::DTypeName;
using kernels::cpu_attention_test_util::Fp8Value;
using kernels::cpu_attention_test_util::NearestFp8;
using kernels::cpu_attention_test_util::RandomTensor;
using kernels::cpu_attention_test_util::ShuffledPageTable;

constexpr int64_t kTokens = 9;  // of the one sequence each test writes: 3 pages of 4, one partial

struct Param {
  DType dtype;
  KvLayout layout;
  std::string Name() const {
    return std::string(DTypeName(dtype)) + (layout == KvLayout::kNHD ? "_NHD" : "_HND");
  }
};

void PrintTo(const Param& p, std::ostream* os) { *os << p.Name(); }

ServerConfig PerTokenConfig(DType dtype, KvLayout layout) {
  ServerConfig config;
  config.model.num_layers = 3;
  config.model.num_qo_heads = 4;
  config.model.num_kv_heads = 2;
  config.model.head_dim = 16;
  config.model.page_size = 4;
  config.model.dtype = dtype;
  config.model.layout = layout;
  config.model.kv_storage = KvStorage::kFp8E4M3PerToken;
  config.model.sm_scale = 0.25f;
  config.pages_per_device = 16;
  config.cpu_threads = 2;
  return config;
}

bool SameBits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

// A per-token backend holding one random sequence of kTokens tokens in every layer, appended
// through the backend; rows of random magnitudes (2^-8 .. 2^8), so their scales differ.
class CpuBackendPerTokenTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    seed_ = testing_util::TestSeed();
    rng_.seed(seed_);
    config_ = PerTokenConfig(GetParam().dtype, GetParam().layout);
    auto backend = CreateCpuDeviceBackend(config_, 0);
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = *std::move(backend);
    shape_ = config_.model.CacheShape(backend_->num_pages());
    table_ = ShuffledPageTable(3, shape_.num_pages, rng_);
    for (int64_t layer = 0; layer < shape_.num_layers; ++layer) {
      k_.push_back(RowsOfRandomMagnitude(kTokens * shape_.num_kv_heads));
      v_.push_back(RowsOfRandomMagnitude(kTokens * shape_.num_kv_heads));
      AppendWork work;
      work.layer = layer;
      work.entries = {BatchEntry{table_, 0, kTokens}};
      work.k_new = k_.back().data();
      work.v_new = v_.back().data();
      ASSERT_TRUE(backend_->Append(work).ok());
    }
  }

  std::vector<uint8_t> RowsOfRandomMagnitude(int64_t rows) {
    std::vector<uint8_t> bytes = RandomTensor(rows * shape_.head_dim, shape_.dtype, 1.0f, rng_);
    std::uniform_real_distribution<float> octave(-8.0f, 8.0f);
    for (int64_t r = 0; r < rows; ++r) {
      const float magnitude = std::exp2(octave(rng_));
      for (int64_t i = r * shape_.head_dim; i < (r + 1) * shape_.head_dim; ++i) {
        kernels::StoreFromFloat(bytes.data(), i, shape_.dtype,
                                magnitude * kernels::LoadAsFloat(bytes.data(), i, shape_.dtype));
      }
    }
    return bytes;
  }

  const uint8_t* pool() const { return static_cast<const uint8_t*>(backend_->pool_memory().base); }
  std::vector<uint8_t> PoolCopy() const {
    return std::vector<uint8_t>(pool(), pool() + backend_->pool_bytes());
  }
  int64_t Page(const std::vector<int32_t>& table, int64_t t) const {
    return table[static_cast<size_t>(t / shape_.page_size)];
  }
  // The code at (layer, kv, token, head, x) of the sequence in `table`.
  uint8_t Code(const std::vector<int32_t>& table, int64_t layer, int kv, int64_t t, int64_t h,
               int64_t x) const {
    return pool()[shape_.Offset(layer, Page(table, t), kv, t % shape_.page_size, h) + x];
  }
  // Byte of the scale of (layer, page, kv, slot, head): the layout [layers][pages][2][kv_heads]
  // [page_size] of f32 after the 256-aligned end of the pages, written out.
  int64_t ScaleByte(int64_t layer, int64_t page, int kv, int64_t slot, int64_t h) const {
    const int64_t base = (shape_.TotalElems() + 255) / 256 * 256;  // one byte an element
    return base + 4 * ((((layer * shape_.num_pages + page) * 2 + kv) * shape_.num_kv_heads + h) *
                           shape_.page_size +
                       slot);
  }
  float Scale(const std::vector<int32_t>& table, int64_t layer, int kv, int64_t t,
              int64_t h) const {
    float s;
    std::memcpy(&s, pool() + ScaleByte(layer, Page(table, t), kv, t % shape_.page_size, h), 4);
    return s;
  }
  // Row (token t, head h) of what was appended at `layer` as K (kv 0) or V (kv 1), as floats.
  std::vector<float> Row(int64_t layer, int kv, int64_t t, int64_t h) const {
    const std::vector<uint8_t>& src = kv == 0 ? k_[layer] : v_[layer];
    std::vector<float> row(shape_.head_dim);
    for (int64_t x = 0; x < shape_.head_dim; ++x) {
      row[x] = kernels::LoadAsFloat(src.data(), (t * shape_.num_kv_heads + h) * shape_.head_dim + x,
                                    shape_.dtype);
    }
    return row;
  }
  size_t BufferBytes() const {
    return static_cast<size_t>(shape_.num_layers * 2 * kTokens * shape_.num_kv_heads *
                               shape_.head_dim) *
           kernels::DTypeSize(shape_.dtype);
  }
  KvTransferWork Transfer(const std::vector<int32_t>& table, void* buffer, bool to_pool) const {
    KvTransferWork w;
    w.page_table = table;
    w.layer_begin = 0;
    w.layer_end = shape_.num_layers;
    w.head_begin = 0;
    w.head_end = shape_.num_kv_heads;
    w.num_tokens = kTokens;
    w.buffer = buffer;
    w.to_pool = to_pool;
    return w;
  }
  // Pages the sequence does not use, as many as it does.
  std::vector<int32_t> OtherPages() const {
    std::vector<int32_t> other;
    for (int32_t p = 0; p < shape_.num_pages && other.size() < table_.size(); ++p) {
      if (std::find(table_.begin(), table_.end(), p) == table_.end()) other.push_back(p);
    }
    return other;
  }
  // Calls fn(layer, kv, token, head) for every row of the sequence.
  template <typename Fn>
  void ForEachRow(Fn&& fn) const {
    for (int64_t layer = 0; layer < shape_.num_layers; ++layer)
      for (int kv = 0; kv < 2; ++kv)
        for (int64_t t = 0; t < kTokens; ++t)
          for (int64_t h = 0; h < shape_.num_kv_heads; ++h) fn(layer, kv, t, h);
  }

  uint32_t seed_ = 0;
  std::mt19937 rng_;
  ServerConfig config_;
  std::unique_ptr<DeviceBackend> backend_;
  kernels::KvCacheShape shape_;
  std::vector<int32_t> table_;
  std::vector<std::vector<uint8_t>> k_, v_;  // per layer, [tokens][heads][head_dim]
};

TEST_P(CpuBackendPerTokenTest, AppendStoresEachRowsScaleAndCodesByTheRule) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  ForEachRow([&](int64_t layer, int kv, int64_t t, int64_t h) {
    SCOPED_TRACE(testing::Message() << "layer " << layer << " kv " << kv << " token " << t
                                    << " head " << h);
    const std::vector<float> row = Row(layer, kv, t, h);
    float amax = 0.0f;
    for (float x : row) amax = std::max(amax, std::fabs(x));
    const float scale = amax > 0.0f ? amax / 448.0f : 1.0f;
    ASSERT_TRUE(SameBits(Scale(table_, layer, kv, t, h), scale));
    for (int64_t x = 0; x < shape_.head_dim; ++x)
      ASSERT_EQ(Code(table_, layer, kv, t, h, x), NearestFp8(row[x] / scale)) << "element " << x;
  });
}

// Copy-on-write of a fork: the destination page gets the source page's codes and scales of every
// layer; no other byte of the pool changes.
TEST_P(CpuBackendPerTokenTest, CopyPagesCopiesEveryLayersCodesAndScalesOfThePage) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const int32_t src = table_[rng_() % table_.size()];
  const int32_t dst = OtherPages()[0];
  const std::vector<uint8_t> before = PoolCopy();
  const PageCopy copy{src, dst};
  ASSERT_TRUE(backend_->CopyPages({&copy, 1}).ok());
  std::vector<uint8_t> want = before;
  for (int64_t layer = 0; layer < shape_.num_layers; ++layer) {
    for (int kv = 0; kv < 2; ++kv) {
      for (int64_t slot = 0; slot < shape_.page_size; ++slot) {
        for (int64_t h = 0; h < shape_.num_kv_heads; ++h) {
          for (int64_t x = 0; x < shape_.head_dim; ++x)
            want[shape_.Offset(layer, dst, kv, slot, h) + x] =
                before[shape_.Offset(layer, src, kv, slot, h) + x];
          std::memcpy(want.data() + ScaleByte(layer, dst, kv, slot, h),
                      before.data() + ScaleByte(layer, src, kv, slot, h), 4);
        }
      }
    }
  }
  EXPECT_TRUE(PoolCopy() == want) << "the pool after the copy differs from the expectation";
  EXPECT_NE(before, want) << "the source page held no scales to copy";
}

TEST_P(CpuBackendPerTokenTest, ExportIsEachRowsScaleTimesItsCodesInTheModelDtype) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  std::vector<uint8_t> buffer(BufferBytes());
  ASSERT_TRUE(backend_->TransferKv(Transfer(table_, buffer.data(), false)).ok());
  int64_t i = 0;
  ForEachRow([&](int64_t layer, int kv, int64_t t, int64_t h) {
    const double scale = Scale(table_, layer, kv, t, h);
    for (int64_t x = 0; x < shape_.head_dim; ++x, ++i) {
      // Exact in double (4 + 24 significant bits); rounded to float, then to the model's dtype.
      const double product = scale * Fp8Value(Code(table_, layer, kv, t, h, x));
      uint16_t want;
      kernels::StoreFromFloat(&want, 0, shape_.dtype, static_cast<float>(product));
      uint16_t got;
      std::memcpy(&got, buffer.data() + 2 * i, 2);
      ASSERT_EQ(got, want) << "layer " << layer << " kv " << kv << " token " << t << " head " << h;
    }
  });
}

// An exported row's largest magnitude is its scale times 448 rounded to the model's dtype,
// which is the row's original maximum: the import computes the same scale and the same codes.
TEST_P(CpuBackendPerTokenTest, ExportThenImportElsewhereReproducesCodesAndScalesBitwise) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  std::vector<uint8_t> buffer(BufferBytes());
  ASSERT_TRUE(backend_->TransferKv(Transfer(table_, buffer.data(), false)).ok());
  const std::vector<int32_t> other = OtherPages();
  ASSERT_TRUE(backend_->TransferKv(Transfer(other, buffer.data(), true)).ok());
  ForEachRow([&](int64_t layer, int kv, int64_t t, int64_t h) {
    SCOPED_TRACE(testing::Message() << "layer " << layer << " kv " << kv << " token " << t
                                    << " head " << h);
    ASSERT_TRUE(SameBits(Scale(other, layer, kv, t, h), Scale(table_, layer, kv, t, h)))
        << Scale(other, layer, kv, t, h) << " vs " << Scale(table_, layer, kv, t, h);
    for (int64_t x = 0; x < shape_.head_dim; ++x)
      ASSERT_EQ(Code(other, layer, kv, t, h, x), Code(table_, layer, kv, t, h, x)) << x;
  });
}

TEST_P(CpuBackendPerTokenTest, AttentionMatchesTheReferenceOverEachRowsScale) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const kernels::AttentionOptions opts = config_.model.Options();
  const int64_t num_new = 3;
  const int64_t row = opts.num_qo_heads * shape_.head_dim;
  const auto q = RandomTensor(num_new * row, shape_.dtype, 1.0f, rng_);
  const auto k_new = RowsOfRandomMagnitude(num_new * shape_.num_kv_heads);
  const auto v_new = RowsOfRandomMagnitude(num_new * shape_.num_kv_heads);
  for (int64_t layer = 0; layer < shape_.num_layers; ++layer) {
    AttentionWork work;
    work.append.layer = layer;
    work.append.entries = {BatchEntry{table_, kTokens, num_new}};  // 12 tokens: still 3 pages
    work.append.k_new = k_new.data();
    work.append.v_new = v_new.data();
    std::vector<uint8_t> out(num_new * row * kernels::DTypeSize(shape_.dtype));
    work.q = q.data();
    work.out = out.data();
    ASSERT_TRUE(backend_->Attention(work, AttentionPlan{}).ok());
    std::vector<double> ref;
    kernels::ReferencePagedAttention(
        pool(), shape_, layer, kernels::SequenceView{table_.data(), kTokens + num_new, num_new},
        opts, q.data(), &ref, nullptr);
    double diff = 0, norm = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      const double o = kernels::LoadAsFloat(out.data(), static_cast<int64_t>(i), shape_.dtype);
      diff += (o - ref[i]) * (o - ref[i]);
      norm += ref[i] * ref[i];
    }
    EXPECT_LT(std::sqrt(diff / norm), 1e-2) << "layer " << layer;  // the output's rounding
  }
}

TEST_P(CpuBackendPerTokenTest, SetKvScalesIsRefusedNamingPerTokenScalesAndChangesNothing) {
  const std::vector<uint8_t> before = PoolCopy();
  const absl::Status s = backend_->SetKvScales(0, {KvScales{2.0f, 3.0f}});
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "per-token")) << s;
  EXPECT_TRUE(PoolCopy() == before);
}

INSTANTIATE_TEST_SUITE_P(ModelDtypes, CpuBackendPerTokenTest,
                         ::testing::Values(Param{DType::kBFloat16, KvLayout::kNHD},
                                           Param{DType::kFloat16, KvLayout::kHND}),
                         [](const auto& info) { return info.param.Name(); });

// One byte an element, then an f32 per (layer, page, K/V, head, slot) from a 256-byte boundary;
// the memory a transport registers is all of it.
TEST(CpuBackend, APerTokenPoolHoldsItsScalesAfterThePages) {
  const ServerConfig config = PerTokenConfig(DType::kBFloat16, KvLayout::kNHD);
  auto backend = CreateCpuDeviceBackend(config, 0);
  ASSERT_TRUE(backend.ok()) << backend.status();
  const ModelShape& m = config.model;
  const int64_t codes =
      config.pages_per_device * m.num_layers * 2 * m.page_size * m.num_kv_heads * m.head_dim;
  const int64_t scales = config.pages_per_device * m.num_layers * 2 * m.page_size * m.num_kv_heads * 4;
  EXPECT_EQ((*backend)->pool_bytes(), (codes + 255) / 256 * 256 + scales);
  EXPECT_EQ((*backend)->pool_memory().bytes, (*backend)->pool_bytes());
}

}  // namespace
}  // namespace attnd
