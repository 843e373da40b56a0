// fp8 KV pools through the engine (see engine_test_fixture.h): what GetServerInfo reports, the
// attention of an fp8 pool with scales that are not powers of two against the reference over
// the dequantized history, and SetKvScales: accepted on layers that hold no KV (later appends
// and attention use the new scales), refused, changing nothing, while a sequence of any client
// or a grant holds KV there, and refused for a model-dtype pool and a per-token one.
#include "tests/unit/engine_test_fixture.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"

namespace attnd::engine_test {
namespace {

using kernels::KvScales;

bool SameBits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

class EngineFp8Test : public EngineTest {
 protected:
  // Any positive float, log-uniform over [1/256, 1/4]: |K| <= 1 stays inside e4m3's 448.
  std::vector<KvScales> StartingScales() override { return RandomScales(kLayers); }

  std::vector<KvScales> RandomScales(size_t n) {
    std::uniform_real_distribution<float> exponent(-8.0f, -2.0f);
    std::vector<KvScales> scales(n);
    for (KvScales& s : scales) s = {std::exp2(exponent(rng_)), std::exp2(exponent(rng_))};
    return scales;
  }

  v1::ServerInfo Info() {
    v1::ServerInfo info;
    wire_->GetServerInfo(&info);
    return info;
  }

  // The scales GetServerInfo reports for device 0 equal the history's, bitwise.
  void ExpectReportedScales() {
    const v1::DeviceInfo d = Info().devices(0);
    ASSERT_EQ(d.k_scales_size(), kLayers);
    ASSERT_EQ(d.v_scales_size(), kLayers);
    for (int l = 0; l < kLayers; ++l) {
      EXPECT_TRUE(SameBits(d.k_scales(l), kv_scales_[l].k))
          << "layer " << l << ": " << d.k_scales(l) << " vs " << kv_scales_[l].k;
      EXPECT_TRUE(SameBits(d.v_scales(l), kv_scales_[l].v))
          << "layer " << l << ": " << d.v_scales(l) << " vs " << kv_scales_[l].v;
    }
  }

  // SetKvScales refused with `code`, every message fragment in it, and the scales unchanged.
  void ExpectRefused(uint32_t layer_begin, const std::vector<KvScales>& scales,
                     absl::StatusCode code, const std::vector<std::string>& fragments) {
    const std::vector<KvScales> before = kv_scales_;
    const absl::Status s = SetKvScales(layer_begin, scales);
    EXPECT_EQ(s.code(), code) << s;
    for (const std::string& f : fragments)
      EXPECT_TRUE(absl::StrContains(s.message(), f)) << "'" << f << "' not in: " << s;
    kv_scales_ = before;
    ExpectReportedScales();
  }

  // Appends and attends at `layer` through sequence `id`: every output against the reference
  // over the history, which holds the values quantized with the layer's current scales.
  void AttendAt(uint32_t layer, uint64_t id) {
    Append(layer, {{id, 9}});
    Prefill(layer, {{id, 4}});
    for (int step = 0; step < 3; ++step) Decode(layer, {id});
  }
};

TEST_P(EngineFp8Test, ServerInfoReportsTheFp8PoolItsFeatureAndTheStartingScales) {
  const v1::ServerInfo info = Info();
  EXPECT_EQ(info.model().kv_cache_dtype(), v1::KV_CACHE_DTYPE_FP8_E4M3);
  EXPECT_EQ(info.model().dtype(), wire::ToWire(GetParam().dtype));  // the wire's dtype stays
  const auto& f = info.features();
  EXPECT_NE(std::find(f.begin(), f.end(), "fp8_kv"), f.end());
  EXPECT_NE(std::find(f.begin(), f.end(), "kv_scales"), f.end());
  // One byte an element: half the bytes of the model dtype's pool.
  EXPECT_EQ(info.devices(0).pool_bytes(),
            info.devices(0).total_pages() * kLayers * 2 * model().page_size * kKvHeads * kHeadDim);
  ExpectReportedScales();
}

TEST_P(EngineFp8Test, AppendPrefillAndDecodeMatchTheReferenceOnTheDequantizedPool) {
  FragmentPool();
  Create(1);
  Create(2);
  for (uint32_t layer = 0; layer < kLayers; ++layer) Append(layer, {{1, 23}, {2, 1}});
  PrefillAll({{2, 17}, {1, 3}});
  for (int step = 0; step < 3; ++step) DecodeAll({1, 2});
  Prefill(0, {{1, 5}});
}

TEST_P(EngineFp8Test, NewScalesOnLayersWithoutKvAreReportedAndUsedByLaterAppends) {
  FragmentPool();  // its fillers hold KV at layer 0 only
  Create(1);
  Append(0, {{1, 6}});
  const std::vector<KvScales> fresh = RandomScales(1);
  ASSERT_TRUE(SetKvScales(1, fresh).ok());
  ExpectReportedScales();
  EXPECT_TRUE(SameBits(kv_scales_[1].k, fresh[0].k));
  AttendAt(1, 1);
  Decode(0, {1});  // layer 0 keeps its scales and its KV
}

TEST_P(EngineFp8Test, AScaleChangeWhereASequenceHoldsKvIsRefusedNamingItsLayerAndIdentity) {
  Create(1);
  Create(7);
  Append(1, {{7, 3}});
  // Layer 1 holds KV: refused for any range that includes it, naming layer 1 and sequence 7.
  ExpectRefused(0, RandomScales(2), absl::StatusCode::kFailedPrecondition,
                {"layer 1", "sequence 7"});
  ExpectRefused(1, RandomScales(1), absl::StatusCode::kFailedPrecondition,
                {"layer 1", "sequence 7"});
  // Nothing changed: both layers still attend with their old scales.
  AttendAt(1, 7);
  AttendAt(0, 1);
}

TEST_P(EngineFp8Test, AnotherClientsSequenceHoldingKvBlocksAScaleChange) {
  // A client of its own, with the shared region registered under its name.
  const ClientRef other = engine_->Attach(Caller{"uid:other", "", getuid(), 0});
  std::unique_ptr<WireEngine> mine = std::move(wire_);
  wire_ = std::make_unique<WireEngine>(mine->As(other));
  v1::RegisterHostRegionRequest reg;
  reg.set_name(kRegion);
  reg.set_shm_key(shm_->key());
  reg.set_byte_size(shm_->size());
  ASSERT_TRUE(wire_->RegisterHostRegion(reg).ok());
  Create(3);
  Append(0, {{3, 2}});
  wire_ = std::move(mine);
  ExpectRefused(0, RandomScales(1), absl::StatusCode::kFailedPrecondition,
                {"layer 0", "sequence 3"});
}

TEST_P(EngineFp8Test, ScalesMayChangeOnceTheSequenceIsTruncatedToNothing) {
  Create(1);
  PrefillAll({{1, 11}});
  ASSERT_FALSE(SetKvScales(0, RandomScales(kLayers)).ok());
  Truncate(1, 0);
  ASSERT_TRUE(SetKvScales(0, RandomScales(kLayers)).ok());
  ExpectReportedScales();
  for (uint32_t layer = 0; layer < kLayers; ++layer) AttendAt(layer, 1);
}

TEST_P(EngineFp8Test, AGrantHoldingPagesBlocksAScaleChangeUntilItIsRevoked) {
  Create(1);
  PrefillAll({{1, 5}});
  KvGrantCall call{ClientRef{}, 0, 1, 0, absl::Seconds(60), 0};
  absl::StatusOr<KvGrantInfo> grant = absl::UnknownError("no reply");
  ASSERT_TRUE(Await([&](Engine::Done d) {
                engine_->GrantKv(call, [&, d = std::move(d)](absl::StatusOr<KvGrantInfo> r) mutable {
                  grant = std::move(r);
                  std::move(d)(grant.status());
                });
              }).ok())
      << grant.status();
  // The grant holds the pages of every layer, read raw by peers, after the sequence is gone.
  ASSERT_TRUE(Release(1).ok());
  ExpectRefused(1, RandomScales(1), absl::StatusCode::kFailedPrecondition,
                {"grant", "sequence 1"});
  ASSERT_TRUE(engine_->RevokeKv(ClientRef{}, grant->grant).ok());
  // Revoked, its pages go back on the device's worker, before the call below runs there.
  EXPECT_TRUE(SetKvScales(1, RandomScales(1)).ok());
  ExpectReportedScales();
}

TEST_P(EngineFp8Test, SetKvScalesOfTheWrongFormIsRefusedChangingNothing) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  ExpectRefused(0, {}, absl::StatusCode::kInvalidArgument, {"k_scales"});
  ExpectRefused(1, RandomScales(2), absl::StatusCode::kInvalidArgument, {"layer_begin"});
  ExpectRefused(kLayers, RandomScales(1), absl::StatusCode::kInvalidArgument, {"layer_begin"});
  ExpectRefused(0, {{1.0f, 1.0f}, {0.0f, 1.0f}}, absl::StatusCode::kInvalidArgument,
                {"k_scales[1]"});
  ExpectRefused(0, {{1.0f, nan}}, absl::StatusCode::kInvalidArgument, {"v_scales[0]"});
  ExpectRefused(0, {{1.0f, -1.0f}}, absl::StatusCode::kInvalidArgument, {"v_scales[0]"});
  v1::SetKvScalesRequest uneven;
  uneven.add_k_scales(1.0f);
  uneven.add_k_scales(1.0f);
  uneven.add_v_scales(1.0f);
  const absl::Status s = Await([&](Engine::Done d) { wire_->SetKvScales(uneven, std::move(d)); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  v1::SetKvScalesRequest elsewhere;
  elsewhere.set_device(5);
  elsewhere.add_k_scales(1.0f);
  elsewhere.add_v_scales(1.0f);
  EXPECT_EQ(Await([&](Engine::Done d) { wire_->SetKvScales(elsewhere, std::move(d)); }).code(),
            absl::StatusCode::kInvalidArgument);
  ExpectReportedScales();
}

INSTANTIATE_TEST_SUITE_P(
    Fp8Pools, EngineFp8Test,
    ::testing::Values(ModelCase{"Bf16Nhd", DType::kBFloat16, KvLayout::kNHD, 16, 0.0f, -1, 1e-2,
                                kernels::KvStorage::kFp8E4M3},
                      ModelCase{"Fp16HndPageSize5", DType::kFloat16, KvLayout::kHND, 5, 0.0f, -1,
                                2e-3, kernels::KvStorage::kFp8E4M3}),
    [](const ::testing::TestParamInfo<ModelCase>& info) { return std::string(info.param.name); });

// A model-dtype pool has no scales: SetKvScales is refused and GetServerInfo shows none.
class EngineModelDtypeScalesTest : public EngineTest {};

TEST_P(EngineModelDtypeScalesTest, SetKvScalesIsRefusedForAModelDtypePool) {
  v1::SetKvScalesRequest req;
  req.add_k_scales(0.5f);
  req.add_v_scales(0.5f);
  const absl::Status s = Await([&](Engine::Done d) { wire_->SetKvScales(req, std::move(d)); });
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "kv_cache_dtype")) << s;
  v1::ServerInfo info;
  wire_->GetServerInfo(&info);
  EXPECT_EQ(info.model().kv_cache_dtype(), v1::KV_CACHE_DTYPE_MODEL);
  EXPECT_EQ(info.devices(0).k_scales_size(), 0);
  EXPECT_EQ(info.devices(0).v_scales_size(), 0);
  const auto& f = info.features();
  EXPECT_EQ(std::find(f.begin(), f.end(), "fp8_kv"), f.end());
  EXPECT_NE(std::find(f.begin(), f.end(), "kv_scales"), f.end());
}

INSTANTIATE_TEST_SUITE_P(
    ModelDtypePools, EngineModelDtypeScalesTest,
    ::testing::Values(ModelCase{"Bf16Nhd", DType::kBFloat16, KvLayout::kNHD, 16, 0.0f, -1, 1e-2}),
    [](const ::testing::TestParamInfo<ModelCase>& info) { return std::string(info.param.name); });

// A per-token pool computes its scales at append: it reports its storage and both fp8
// features, no per-layer scales, a pool that counts the scales' bytes, and refuses SetKvScales
// naming the mode, changing nothing (appends and attention keep matching the reference).
class EnginePerTokenScalesTest : public EngineTest {};

TEST_P(EnginePerTokenScalesTest, ServerInfoReportsThePerTokenPoolItsFeaturesAndNoLayerScales) {
  v1::ServerInfo info;
  wire_->GetServerInfo(&info);
  EXPECT_EQ(info.model().kv_cache_dtype(), v1::KV_CACHE_DTYPE_FP8_E4M3_PER_TOKEN);
  EXPECT_EQ(info.model().dtype(), wire::ToWire(GetParam().dtype));
  const auto& f = info.features();
  EXPECT_NE(std::find(f.begin(), f.end(), "fp8_kv"), f.end());
  EXPECT_NE(std::find(f.begin(), f.end(), "fp8_kv_per_token"), f.end());
  EXPECT_EQ(info.devices(0).k_scales_size(), 0);
  EXPECT_EQ(info.devices(0).v_scales_size(), 0);
  // One byte an element, then an f32 scale per (layer, page, K/V, head, slot) from a 256-byte
  // boundary.
  const uint64_t pages = info.devices(0).total_pages();
  const uint64_t codes = pages * kLayers * 2 * model().page_size * kKvHeads * kHeadDim;
  const uint64_t scales = pages * kLayers * 2 * model().page_size * kKvHeads * 4;
  EXPECT_EQ(info.devices(0).pool_bytes(), (codes + 255) / 256 * 256 + scales);
}

TEST_P(EnginePerTokenScalesTest, SetKvScalesIsRefusedNamingThePerTokenModeAndChangesNothing) {
  Create(1);
  Append(0, {{1, 7}});
  v1::SetKvScalesRequest req;
  req.set_layer_begin(1);  // a layer without KV: the mode, not the KV, is the reason
  req.add_k_scales(0.5f);
  req.add_v_scales(0.5f);
  const absl::Status s = Await([&](Engine::Done d) { wire_->SetKvScales(req, std::move(d)); });
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "kv_cache_dtype")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "fp8_per_token")) << s;
  v1::ServerInfo info;
  wire_->GetServerInfo(&info);
  EXPECT_EQ(info.devices(0).k_scales_size(), 0);
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    Append(layer, {{1, 3}});
    Prefill(layer, {{1, 4}});
    Decode(layer, {1});
  }
}

INSTANTIATE_TEST_SUITE_P(
    PerTokenPools, EnginePerTokenScalesTest,
    ::testing::Values(ModelCase{"Bf16Nhd", DType::kBFloat16, KvLayout::kNHD, 16, 0.0f, -1, 1e-2,
                                kernels::KvStorage::kFp8E4M3PerToken}),
    [](const ::testing::TestParamInfo<ModelCase>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace attnd::engine_test
