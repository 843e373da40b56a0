// Tests of server/wire/convert.h: every request field reaches the engine's call, and every
// result field reaches the response. Values are random so a swapped field shows.
#include "server/wire/convert.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"

namespace attnd {
namespace {

class WireConvertTest : public ::testing::Test {
 protected:
  uint64_t Next() { return rng_() % 100000 + 1; }
  v1::TensorRef Ref(const std::string& region) {
    v1::TensorRef ref;
    ref.set_region(region);
    ref.set_offset(Next());
    ref.set_dtype(v1::DTYPE_BFLOAT16);
    for (int i = 0; i < 3; ++i) ref.add_shape(Next());
    return ref;
  }
  void ExpectSame(const TensorName& name, const v1::TensorRef& ref) {
    EXPECT_EQ(name.region, ref.region());
    EXPECT_EQ(name.offset, ref.offset());
    EXPECT_EQ(name.dtype, wire::FromWire(ref.dtype()));
    ASSERT_EQ(name.shape.size(), static_cast<size_t>(ref.shape_size()));
    for (int i = 0; i < ref.shape_size(); ++i) EXPECT_EQ(name.shape[i], ref.shape(i));
  }
  std::mt19937_64 rng_{std::random_device{}()};
};

TEST_F(WireConvertTest, EveryFieldOfAnAttentionRequestReachesTheCall) {
  v1::AttentionRequest req;
  req.set_device(static_cast<uint32_t>(Next()));
  req.set_layer(static_cast<uint32_t>(Next()));
  for (int i = 0; i < 4; ++i) {
    v1::BatchItem* item = req.add_items();
    item->set_seq_id(Next());
    item->set_num_new_tokens(static_cast<uint32_t>(Next()));
  }
  *req.mutable_q() = Ref("q");
  *req.mutable_k_new() = Ref("k");
  *req.mutable_v_new() = Ref("v");
  *req.mutable_out() = Ref("out");
  *req.mutable_lse() = Ref("lse");
  req.set_deterministic(true);
  req.mutable_sync()->set_wait_event("w");
  req.mutable_sync()->set_signal_event("s");
  const AttentionCall call = wire::ToAttentionCall(req);
  EXPECT_EQ(call.device, req.device());
  EXPECT_EQ(call.layer, req.layer());
  ASSERT_EQ(call.items.size(), 4u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(call.items[i].seq_id, req.items(i).seq_id());
    EXPECT_EQ(call.items[i].num_new_tokens, req.items(i).num_new_tokens());
  }
  ExpectSame(call.q, req.q());
  ExpectSame(call.k_new, req.k_new());
  ExpectSame(call.v_new, req.v_new());
  ExpectSame(call.out, req.out());
  ExpectSame(call.lse, req.lse());
  EXPECT_TRUE(call.deterministic);
  EXPECT_EQ(call.sync.wait_event, "w");
  EXPECT_EQ(call.sync.signal_event, "s");
}

TEST_F(WireConvertTest, AnExpectedLengthReachesTheItemOnlyWhenSet) {
  v1::AppendRequest req;
  req.add_items()->set_seq_id(1);
  v1::BatchItem* with = req.add_items();
  with->set_seq_id(2);
  const uint64_t expected = Next();
  with->set_expected_length(expected);
  req.add_items()->set_expected_length(0);  // set to zero is still set: a new sequence
  const AppendCall call = wire::ToAppendCall(req);
  EXPECT_FALSE(call.items[0].expected_length.has_value());
  EXPECT_EQ(call.items[1].expected_length, static_cast<int64_t>(expected));
  EXPECT_EQ(call.items[2].expected_length, 0);
}

TEST_F(WireConvertTest, AnAttentionRequestWithoutLseAsksForNone) {
  EXPECT_TRUE(wire::ToAttentionCall(v1::AttentionRequest()).lse.region.empty());
}

TEST_F(WireConvertTest, AnUnspecifiedOrUnknownDtypeBecomesNoDtype) {
  EXPECT_FALSE(wire::FromWire(v1::DTYPE_UNSPECIFIED).has_value());
  EXPECT_FALSE(wire::FromWire(static_cast<v1::DType>(77)).has_value());
  for (kernels::DType d :
       {kernels::DType::kFloat16, kernels::DType::kBFloat16, kernels::DType::kFloat32})
    EXPECT_EQ(wire::FromWire(wire::ToWire(d)), d);
}

TEST_F(WireConvertTest, EveryFieldOfAnImportReachesTheTransferCall) {
  v1::ImportKvRequest req;
  req.set_device(3);
  req.set_seq_id(Next());
  req.set_layer_begin(1);
  req.set_layer_end(5);
  req.set_head_begin(2);
  req.set_head_end(6);
  req.set_num_tokens(Next());
  *req.mutable_src() = Ref("src");
  const KvTransferCall call = wire::ToTransferCall(req);
  EXPECT_EQ(call.device, 3u);
  EXPECT_EQ(call.seq_id, req.seq_id());
  EXPECT_EQ(call.layer_begin, 1u);
  EXPECT_EQ(call.layer_end, 5u);
  EXPECT_EQ(call.head_begin, 2u);
  EXPECT_EQ(call.head_end, 6u);
  EXPECT_EQ(call.num_tokens, req.num_tokens());
  ExpectSame(call.buffer, req.src());
}

TEST_F(WireConvertTest, ASequenceStateFillsEveryFieldOfSequenceInfo) {
  SequenceState state;
  state.device = 2;
  state.seq_id = Next();
  state.layer_lengths = {static_cast<int64_t>(Next()), static_cast<int64_t>(Next())};
  state.num_pages = Next();
  state.shared_pages = Next();
  v1::SequenceInfo info;
  info.add_layer_lengths(99);  // stale values are replaced, not appended to
  wire::FillSequenceInfo(state, &info);
  EXPECT_EQ(info.device(), 2u);
  EXPECT_EQ(info.seq_id(), state.seq_id);
  ASSERT_EQ(info.layer_lengths_size(), 2);
  EXPECT_EQ(info.layer_lengths(1), static_cast<uint64_t>(state.layer_lengths[1]));
  EXPECT_EQ(info.num_pages(), state.num_pages);
  EXPECT_EQ(info.shared_pages(), state.shared_pages);
}

// ---- fp8 KV scales ----

ModelShape FourLayers() {
  ModelShape m;
  m.num_layers = 4;
  return m;
}

TEST_F(WireConvertTest, EveryFieldOfASetKvScalesRequestReachesTheCall) {
  std::uniform_real_distribution<float> scale(0.001f, 10.0f);
  v1::SetKvScalesRequest req;
  req.set_device(static_cast<uint32_t>(Next()));
  req.set_layer_begin(1);
  for (int i = 0; i < 3; ++i) {
    req.add_k_scales(scale(rng_));
    req.add_v_scales(scale(rng_));
  }
  absl::StatusOr<wire::KvScalesCall> call = wire::ToKvScalesCall(req, FourLayers());
  ASSERT_TRUE(call.ok()) << call.status();
  EXPECT_EQ(call->device, req.device());
  EXPECT_EQ(call->layer_begin, 1);
  ASSERT_EQ(call->scales.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(call->scales[i].k, req.k_scales(i));
    EXPECT_EQ(call->scales[i].v, req.v_scales(i));
  }
}

TEST_F(WireConvertTest, SetKvScalesRequestsOfTheWrongFormAreRefusedNamingTheField) {
  struct Bad {
    uint32_t layer_begin;
    std::vector<float> k, v;
    const char* field;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (const Bad& bad : std::vector<Bad>{
           {0, {}, {}, "k_scales, v_scales"},
           {0, {1, 1}, {1}, "k_scales, v_scales"},
           {0, {1}, {1, 1}, "k_scales, v_scales"},
           {3, {1, 1}, {1, 1}, "layer_begin"},
           {4, {1}, {1}, "layer_begin"},
           {std::numeric_limits<uint32_t>::max(), {1}, {1}, "layer_begin"},
           {0, {1, 0}, {1, 1}, "k_scales[1] (layer 1)"},
           {1, {1, 1}, {1, -2}, "v_scales[1] (layer 2)"},
           {0, {nan}, {1}, "k_scales[0]"},
           {2, {1}, {inf}, "v_scales[0] (layer 2)"}}) {
    v1::SetKvScalesRequest req;
    req.set_layer_begin(bad.layer_begin);
    for (float k : bad.k) req.add_k_scales(k);
    for (float v : bad.v) req.add_v_scales(v);
    absl::StatusOr<wire::KvScalesCall> call = wire::ToKvScalesCall(req, FourLayers());
    ASSERT_FALSE(call.ok()) << bad.field;
    EXPECT_EQ(call.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StartsWith(call.status().message(), bad.field)) << call.status();
  }
}

TEST_F(WireConvertTest, ServerInfoCarriesTheKvCacheDtypeAndEachDevicesScales) {
  std::uniform_real_distribution<float> scale(0.001f, 10.0f);
  EngineInfo info;
  info.model = FourLayers();
  info.model.kv_storage = kernels::KvStorage::kFp8E4M3;
  for (int d = 0; d < 2; ++d) {
    DeviceState device;
    device.device = d;
    for (int l = 0; l < 4; ++l) device.kv_scales.push_back({scale(rng_), scale(rng_)});
    info.devices.push_back(device);
  }
  v1::ServerInfo out;
  wire::FillServerInfo(info, &out);
  EXPECT_EQ(out.model().kv_cache_dtype(), v1::KV_CACHE_DTYPE_FP8_E4M3);
  ASSERT_EQ(out.devices_size(), 2);
  for (int d = 0; d < 2; ++d) {
    ASSERT_EQ(out.devices(d).k_scales_size(), 4);
    ASSERT_EQ(out.devices(d).v_scales_size(), 4);
    for (int l = 0; l < 4; ++l) {
      EXPECT_EQ(out.devices(d).k_scales(l), info.devices[d].kv_scales[l].k);
      EXPECT_EQ(out.devices(d).v_scales(l), info.devices[d].kv_scales[l].v);
    }
  }
  // The scales come back from the wire in layer order; a count other than the layers' is none.
  auto back = wire::ScalesFromWire(out.devices(1).k_scales(), out.devices(1).v_scales(), 4);
  ASSERT_TRUE(back.has_value());
  for (int l = 0; l < 4; ++l) EXPECT_EQ((*back)[l].v, info.devices[1].kv_scales[l].v);
  EXPECT_FALSE(wire::ScalesFromWire(out.devices(1).k_scales(), out.devices(1).v_scales(), 3));

  info.model.kv_storage = kernels::KvStorage::kModelDType;
  for (DeviceState& device : info.devices) device.kv_scales.clear();
  out.Clear();
  wire::FillServerInfo(info, &out);
  EXPECT_EQ(out.model().kv_cache_dtype(), v1::KV_CACHE_DTYPE_MODEL);
  EXPECT_EQ(out.devices(0).k_scales_size(), 0);
}

// Every pool storage has its wire value and comes back from it; a value this server does not
// know (a newer peer's) is none.
TEST_F(WireConvertTest, KvStoragesMapToTheirKvCacheDtypesAndBack) {
  const std::pair<kernels::KvStorage, v1::KvCacheDType> pairs[] = {
      {kernels::KvStorage::kModelDType, v1::KV_CACHE_DTYPE_MODEL},
      {kernels::KvStorage::kFp8E4M3, v1::KV_CACHE_DTYPE_FP8_E4M3},
      {kernels::KvStorage::kFp8E4M3PerToken, v1::KV_CACHE_DTYPE_FP8_E4M3_PER_TOKEN}};
  for (const auto& [storage, wire_value] : pairs) {
    EXPECT_EQ(wire::ToWire(storage), wire_value) << static_cast<int>(storage);
    const std::optional<kernels::KvStorage> back = wire::FromWire(wire_value);
    ASSERT_TRUE(back.has_value()) << wire_value;
    EXPECT_EQ(*back, storage) << wire_value;
  }
  EXPECT_FALSE(wire::FromWire(static_cast<v1::KvCacheDType>(99)).has_value());
}

TEST_F(WireConvertTest, ServerInfoOfAPerTokenPoolCarriesItsKvCacheDtypeAndNoScales) {
  EngineInfo info;
  info.model = FourLayers();
  info.model.kv_storage = kernels::KvStorage::kFp8E4M3PerToken;
  info.devices.push_back(DeviceState{});
  info.features = {"fp8_kv", "fp8_kv_per_token"};
  v1::ServerInfo out;
  wire::FillServerInfo(info, &out);
  EXPECT_EQ(out.model().kv_cache_dtype(), v1::KV_CACHE_DTYPE_FP8_E4M3_PER_TOKEN);
  EXPECT_EQ(out.devices(0).k_scales_size(), 0);
  EXPECT_EQ(out.devices(0).v_scales_size(), 0);
  ASSERT_EQ(out.features_size(), 2);
  EXPECT_EQ(out.features(1), "fp8_kv_per_token");
}

TEST_F(WireConvertTest, AnErrorKeepsItsCodeAndMessageOnTheWire) {
  const grpc::Status s = wire::ToGrpc(absl::ResourceExhaustedError("items: too many"));
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(s.error_message(), "items: too many");
  EXPECT_TRUE(wire::ToGrpc(absl::OkStatus()).ok());
}

}  // namespace
}  // namespace attnd
