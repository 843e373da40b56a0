// Tests of server/cpu/cpu_backend.h over an fp8 KV pool: the per-layer scales (from the config,
// missing entries 1 and 1, and SetKvScales) reach the append, the attention and TransferKv, whose
// export is scale * code in the model's dtype and whose import quantizes like the append. The
// expected values come from the fp8 definition (Fp8Value, NearestFp8) and the fp64 reference.
#include "server/cpu/cpu_backend.h"

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
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "kernels/cpu_attention.h"
#include "kernels/paged_kv.h"
#include "server/config/config.h"
#include "server/platform/backend.h"
#include "tests/unit/kernels_cpu_attention_test_util.h"
#include "tests/unit/unit_test_util.h"

namespace attnd {
namespace {

using kernels::DType;
using kernels::KvLayout;
using kernels::KvScales;
using kernels::KvStorage;
using kernels::cpu_attention_test_util::Fp8Value;
using kernels::cpu_attention_test_util::NearestFp8;
using kernels::cpu_attention_test_util::RandomTensor;
using kernels::cpu_attention_test_util::ShuffledPageTable;

constexpr int64_t kTokens = 9;  // of the one sequence each test writes: 3 pages of 4, one partial

// Scales with random mantissas between 2^-5 and 2: stddev-1 values neither saturate nor vanish.
KvScales RandomScales(std::mt19937& rng) {
  std::uniform_real_distribution<float> octave(-5.0f, 1.0f);
  return {std::exp2(octave(rng)), std::exp2(octave(rng))};
}

// Three layers; the config gives scales for the first two only (the third starts at 1 and 1).
ServerConfig Config(DType dtype, KvLayout layout, KvStorage storage, std::mt19937& rng) {
  ServerConfig config;
  config.model.num_layers = 3;
  config.model.num_qo_heads = 4;
  config.model.num_kv_heads = 2;
  config.model.head_dim = 16;
  config.model.page_size = 4;
  config.model.dtype = dtype;
  config.model.layout = layout;
  config.model.kv_storage = storage;
  config.model.kv_scales = {RandomScales(rng), RandomScales(rng)};
  config.model.sm_scale = 0.25f;
  config.pages_per_device = 16;
  config.cpu_threads = 2;
  return config;
}

std::unique_ptr<DeviceBackend> MakeBackend(const ServerConfig& config) {
  auto backend = CreateCpuDeviceBackend(config, 0);
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? *std::move(backend) : nullptr;
}

struct Param {
  DType dtype;
  KvLayout layout;
};

void PrintTo(const Param& p, std::ostream* os) {
  *os << kernels::cpu_attention_test_util::DTypeName(p.dtype)
      << (p.layout == KvLayout::kNHD ? "_NHD" : "_HND");
}

// An fp8 backend holding one random sequence of kTokens tokens in every layer, appended through
// the backend after SetKvScales replaced layer 1's scales.
class CpuBackendFp8Test : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    seed_ = testing_util::TestSeed();
    rng_.seed(seed_);
    config_ = Config(GetParam().dtype, GetParam().layout, KvStorage::kFp8E4M3, rng_);
    backend_ = MakeBackend(config_);
    ASSERT_NE(backend_, nullptr);
    shape_ = config_.model.CacheShape(backend_->num_pages());
    scales_ = {config_.model.kv_scales[0], RandomScales(rng_), KvScales{}};
    ASSERT_TRUE(backend_->SetKvScales(1, {scales_[1]}).ok());
    // A refused call changes nothing: layer 0 keeps the config's scales (the tests below see it).
    ASSERT_FALSE(backend_->SetKvScales(0, {RandomScales(rng_), KvScales{0.0f, 1.0f}}).ok());
    table_ = ShuffledPageTable(3, shape_.num_pages, rng_);
    const int64_t elems = kTokens * shape_.num_kv_heads * shape_.head_dim;
    for (int64_t layer = 0; layer < shape_.num_layers; ++layer) {
      k_.push_back(RandomTensor(elems, shape_.dtype, 1.0f, rng_));
      v_.push_back(RandomTensor(elems, shape_.dtype, 1.0f, rng_));
      AppendWork work;
      work.layer = layer;
      work.entries = {BatchEntry{table_, 0, kTokens}};
      work.k_new = k_.back().data();
      work.v_new = v_.back().data();
      ASSERT_TRUE(backend_->Append(work).ok());
    }
  }

  const uint8_t* pool() const { return static_cast<const uint8_t*>(backend_->pool_memory().base); }
  // The code at (layer, kv, token, head, x) of the sequence in `table`.
  uint8_t Code(const std::vector<int32_t>& table, int64_t layer, int kv, int64_t t, int64_t h,
               int64_t x) const {
    const int64_t page = table[static_cast<size_t>(t / shape_.page_size)];
    return pool()[shape_.Offset(layer, page, kv, t % shape_.page_size, h) + x];
  }
  float Scale(int64_t layer, int kv) const {
    return kv == 0 ? scales_[static_cast<size_t>(layer)].k : scales_[static_cast<size_t>(layer)].v;
  }
  // The dense transfer buffer of the whole sequence: [layers][2][tokens][heads][head_dim].
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

  uint32_t seed_ = 0;
  std::mt19937 rng_;
  ServerConfig config_;
  std::unique_ptr<DeviceBackend> backend_;
  kernels::KvCacheShape shape_;
  std::vector<KvScales> scales_;  // what every layer should be using
  std::vector<int32_t> table_;
  std::vector<std::vector<uint8_t>> k_, v_;  // per layer, [tokens][heads][head_dim]
};

TEST_P(CpuBackendFp8Test, AppendQuantizesWithTheLayersScales) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const int64_t d = shape_.head_dim;
  for (int64_t layer = 0; layer < shape_.num_layers; ++layer) {
    for (int kv = 0; kv < 2; ++kv) {
      const auto& src = kv == 0 ? k_[layer] : v_[layer];
      for (int64_t t = 0; t < kTokens; ++t) {
        for (int64_t h = 0; h < shape_.num_kv_heads; ++h) {
          for (int64_t x = 0; x < d; ++x) {
            const float value = kernels::LoadAsFloat(
                src.data(), (t * shape_.num_kv_heads + h) * d + x, shape_.dtype);
            ASSERT_EQ(Code(table_, layer, kv, t, h, x), NearestFp8(value / Scale(layer, kv)))
                << "layer " << layer << " kv " << kv << " token " << t << " head " << h;
          }
        }
      }
    }
  }
}

TEST_P(CpuBackendFp8Test, ExportIsTheLayersScaleTimesTheCodeInTheModelDtype) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  std::vector<uint8_t> buffer(BufferBytes());
  ASSERT_TRUE(backend_->TransferKv(Transfer(table_, buffer.data(), false)).ok());
  int64_t i = 0;
  for (int64_t layer = 0; layer < shape_.num_layers; ++layer) {
    for (int kv = 0; kv < 2; ++kv) {
      for (int64_t t = 0; t < kTokens; ++t) {
        for (int64_t h = 0; h < shape_.num_kv_heads; ++h) {
          for (int64_t x = 0; x < shape_.head_dim; ++x, ++i) {
            // The product is exact in double (4 + 24 significant bits); rounded to float, then to
            // the model's dtype.
            const double product = Scale(layer, kv) * Fp8Value(Code(table_, layer, kv, t, h, x));
            uint16_t want;
            kernels::StoreFromFloat(&want, 0, shape_.dtype, static_cast<float>(product));
            uint16_t got;
            std::memcpy(&got, buffer.data() + 2 * i, 2);
            ASSERT_EQ(got, want) << "layer " << layer << " kv " << kv << " token " << t;
          }
        }
      }
    }
  }
}

// The dequantized values quantize back to the codes they came from, so an export imported into
// other pages reproduces the pool's bytes exactly.
TEST_P(CpuBackendFp8Test, ExportThenImportReproducesThePoolBytes) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  std::vector<uint8_t> buffer(BufferBytes());
  ASSERT_TRUE(backend_->TransferKv(Transfer(table_, buffer.data(), false)).ok());
  std::vector<int32_t> other;  // pages the sequence does not use
  for (int32_t p = 0; p < shape_.num_pages && other.size() < table_.size(); ++p) {
    if (std::find(table_.begin(), table_.end(), p) == table_.end()) other.push_back(p);
  }
  ASSERT_TRUE(backend_->TransferKv(Transfer(other, buffer.data(), true)).ok());
  for (int64_t layer = 0; layer < shape_.num_layers; ++layer) {
    for (int kv = 0; kv < 2; ++kv) {
      for (int64_t t = 0; t < kTokens; ++t) {
        for (int64_t h = 0; h < shape_.num_kv_heads; ++h) {
          for (int64_t x = 0; x < shape_.head_dim; ++x) {
            ASSERT_EQ(Code(other, layer, kv, t, h, x), Code(table_, layer, kv, t, h, x))
                << "layer " << layer << " kv " << kv << " token " << t << " head " << h;
          }
        }
      }
    }
  }
}

TEST_P(CpuBackendFp8Test, AttentionMatchesTheReferenceWithTheLayersScales) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const kernels::AttentionOptions opts = config_.model.Options();
  const int64_t num_new = 3;
  const int64_t row = opts.num_qo_heads * shape_.head_dim;
  const auto q = RandomTensor(num_new * row, shape_.dtype, 1.0f, rng_);
  const auto k_new =
      RandomTensor(num_new * shape_.num_kv_heads * shape_.head_dim, shape_.dtype, 1.0f, rng_);
  const auto v_new =
      RandomTensor(num_new * shape_.num_kv_heads * shape_.head_dim, shape_.dtype, 1.0f, rng_);
  std::vector<int32_t> table = table_;  // kTokens + num_new = 12 tokens: still 3 pages
  for (int64_t layer = 0; layer < shape_.num_layers; ++layer) {
    AttentionWork work;
    work.append.layer = layer;
    work.append.entries = {BatchEntry{table, kTokens, num_new}};
    work.append.k_new = k_new.data();
    work.append.v_new = v_new.data();
    std::vector<uint8_t> out(num_new * row * kernels::DTypeSize(shape_.dtype));
    work.q = q.data();
    work.out = out.data();
    ASSERT_TRUE(backend_->Attention(work, AttentionPlan{}).ok());

    std::vector<double> ref;
    kernels::ReferencePagedAttention(
        pool(), shape_, layer, kernels::SequenceView{table.data(), kTokens + num_new, num_new},
        opts, q.data(), &ref, nullptr, scales_[layer]);
    double diff = 0, norm = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      const double o = kernels::LoadAsFloat(out.data(), static_cast<int64_t>(i), shape_.dtype);
      diff += (o - ref[i]) * (o - ref[i]);
      norm += ref[i] * ref[i];
    }
    // The output's own rounding to the model's dtype (bf16: 2^-9 relative per element).
    EXPECT_LT(std::sqrt(diff / norm), 1e-2) << "layer " << layer;
  }
}

INSTANTIATE_TEST_SUITE_P(ModelDtypes, CpuBackendFp8Test,
                         ::testing::Values(Param{DType::kBFloat16, KvLayout::kNHD},
                                           Param{DType::kFloat16, KvLayout::kHND}),
                         [](const auto& info) {
                           return std::string(kernels::cpu_attention_test_util::DTypeName(
                                      info.param.dtype)) +
                                  (info.param.layout == KvLayout::kNHD ? "_NHD" : "_HND");
                         });

TEST(CpuBackend, PoolOfFp8TakesOneBytePerElement) {
  std::mt19937 rng(1);
  const ServerConfig config = Config(DType::kBFloat16, KvLayout::kNHD, KvStorage::kFp8E4M3, rng);
  const auto backend = MakeBackend(config);
  ASSERT_NE(backend, nullptr);
  const ModelShape& m = config.model;
  EXPECT_EQ(backend->pool_bytes(),
            config.pages_per_device * m.num_layers * 2 * m.page_size * m.num_kv_heads * m.head_dim);
}

TEST(CpuBackend, SetKvScalesIsRefusedOnAModelDtypePool) {
  std::mt19937 rng(1);
  const auto backend =
      MakeBackend(Config(DType::kBFloat16, KvLayout::kNHD, KvStorage::kModelDType, rng));
  ASSERT_NE(backend, nullptr);
  const absl::Status s = backend->SetKvScales(0, {KvScales{2.0f, 3.0f}});
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("not fp8"), std::string::npos) << s;
}

TEST(CpuBackend, SetKvScalesIsRefusedOutsideTheModelsLayers) {
  std::mt19937 rng(1);
  const auto backend =
      MakeBackend(Config(DType::kBFloat16, KvLayout::kNHD, KvStorage::kFp8E4M3, rng));
  ASSERT_NE(backend, nullptr);
  const std::vector<KvScales> two(2, KvScales{2.0f, 3.0f});
  for (auto [begin, n] : std::vector<std::pair<int64_t, size_t>>{{-1, 1}, {2, 2}, {3, 1}}) {
    const absl::Status s = backend->SetKvScales(begin, absl::Span<const KvScales>(two.data(), n));
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << begin << " " << n;
    EXPECT_NE(s.message().find("layer_begin " + std::to_string(begin)), std::string::npos) << s;
  }
  EXPECT_TRUE(backend->SetKvScales(1, two).ok());
  EXPECT_TRUE(backend->SetKvScales(3, {}).ok()) << "an empty range at the end is within";
}

TEST(CpuBackend, SetKvScalesIsRefusedForScalesThatAreNotPositiveAndFinite) {
  std::mt19937 rng(1);
  const auto backend =
      MakeBackend(Config(DType::kBFloat16, KvLayout::kNHD, KvStorage::kFp8E4M3, rng));
  ASSERT_NE(backend, nullptr);
  for (float bad : {0.0f, -1.0f, INFINITY, NAN}) {
    EXPECT_EQ(backend->SetKvScales(0, {KvScales{1.0f, 1.0f}, KvScales{1.0f, bad}}).code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
    EXPECT_EQ(backend->SetKvScales(2, {KvScales{bad, 1.0f}}).code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

}  // namespace
}  // namespace attnd
