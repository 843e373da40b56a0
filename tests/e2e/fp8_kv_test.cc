// fp8 KV pools end to end: a real attnd with --kv_cache_dtype=fp8 and a --kv_scales_file, a
// real client. Every output is checked against the client's fp64 reference over what the pool
// holds (scale * fp8(x / scale), the harness's history); SetKvScales over gRPC is accepted on
// layers without KV and refused, changing nothing, where a sequence holds some; a scales file
// that is wrong keeps attnd from starting, naming the flag. An fp8 pool with per-token scales
// (--kv_cache_dtype=fp8_per_token) computes its scales as it appends: its outputs match the
// reference over each row's scale times its codes, its export and import round-trip, it reports
// itself and refuses scales, from a file or SetKvScales, naming its mode.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/shm_buffer.h"
#include "client/tensor.h"
#include "gtest/gtest.h"
#include "testing/harness.h"
#include "testing/server_process.h"

namespace attnd::testing {
namespace {

constexpr uint32_t kLayers = 3;

uint64_t Seed() {
  static const uint64_t seed = [] {
    const uint64_t s = std::random_device{}();
    std::printf("[   SEED   ] %llu\n", static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

bool SameBits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

// Scales as calibration would give them: any positive float, here log-uniform in [1/64, 1/2]
// (the harness's inputs, N(0, 1), then stay inside e4m3's +-448).
std::vector<float> RandomScales(std::mt19937_64& rng, size_t n) {
  std::uniform_real_distribution<float> exponent(-6.0f, -1.0f);
  std::vector<float> out(n);
  for (float& s : out) s = std::exp2(exponent(rng));
  return out;
}

// A scales file of one "k_scale v_scale" line per layer, in a folder of its own.
class ScalesFile {
 public:
  ScalesFile(const std::vector<float>& k, const std::vector<float>& v) {
    char dir[] = "/tmp/attnd-fp8-XXXXXX";
    dir_ = mkdtemp(dir);
    path_ = dir_ + "/kv_scales.txt";
    std::ofstream f(path_);
    f << "# k_scale v_scale, one line per layer\n";
    for (size_t l = 0; l < k.size(); ++l) f << absl::StrFormat("%.9g %.9g\n", k[l], v[l]);
  }
  ~ScalesFile() {
    unlink(path_.c_str());
    rmdir(dir_.c_str());
  }
  const std::string& path() const { return path_; }

 private:
  std::string dir_, path_;
};

std::vector<std::string> Fp8Flags(const std::string& scales_file) {
  std::vector<std::string> flags = {"--backend=" + E2eBackend(), "--devices=0",
                                    "--kv_scale_setters=*",
                                    absl::StrCat("--num_layers=", kLayers), "--num_qo_heads=8",
                                    "--num_kv_heads=2", "--head_dim=64", "--dtype=bf16",
                                    "--page_size=16", "--pages_per_device=256",
                                    "--kv_cache_dtype=fp8"};
  if (!scales_file.empty()) flags.push_back("--kv_scales_file=" + scales_file);
  return flags;
}

class Fp8KvTest : public ::testing::Test {
 protected:
  void Start(const std::vector<std::string>& flags) {
    auto server = ServerProcess::Start(flags);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    auto c = client::Client::Connect(server_->unix_target());
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = *std::move(c);
    auto h = Harness::Create(client_.get(), "fp8", 0, 256, Seed());
    ASSERT_TRUE(h.ok()) << h.status();
    harness_ = *std::move(h);
  }

  // The scales GetServerInfo reports equal k and v, bitwise.
  void ExpectScales(const std::vector<float>& k, const std::vector<float>& v) {
    auto info = client_->GetServerInfo();
    ASSERT_TRUE(info.ok()) << info.status();
    const v1::DeviceInfo& d = info->devices(0);
    ASSERT_EQ(d.k_scales_size(), static_cast<int>(k.size()));
    ASSERT_EQ(d.v_scales_size(), static_cast<int>(v.size()));
    for (int l = 0; l < d.k_scales_size(); ++l) {
      EXPECT_TRUE(SameBits(d.k_scales(l), k[l])) << "layer " << l;
      EXPECT_TRUE(SameBits(d.v_scales(l), v[l])) << "layer " << l;
    }
  }

  std::mt19937_64 rng_{Seed()};
  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<client::Client> client_;
  std::unique_ptr<Harness> harness_;  // destroyed first: it unregisters through client_
};

TEST_F(Fp8KvTest, PrefillAndDecodeMatchTheReferenceOverThePoolsFp8Values) {
  const std::vector<float> k = RandomScales(rng_, kLayers), v = RandomScales(rng_, kLayers);
  ScalesFile file(k, v);
  ASSERT_NO_FATAL_FAILURE(Start(Fp8Flags(file.path())));
  ASSERT_NO_FATAL_FAILURE(ExpectScales(k, v));
  const v1::ServerInfo& info = harness_->info();
  EXPECT_EQ(info.model().kv_cache_dtype(), v1::KV_CACHE_DTYPE_FP8_E4M3);
  EXPECT_EQ(info.model().dtype(), v1::DTYPE_BFLOAT16);
  for (uint64_t seq : {1, 2, 3}) ASSERT_TRUE(harness_->CreateSequence(seq).ok());
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    ASSERT_TRUE(harness_->RunAppend(harness_->BuildAppend(layer, {{3, 7}})).ok());
    const absl::Status s = harness_->Attend(layer, {{1, 37}, {2, 5}, {3, 2}}, false, true);
    ASSERT_TRUE(s.ok()) << "prefill, layer " << layer << ": " << s;
  }
  for (int step = 0; step < 4; ++step) {
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      const absl::Status s = harness_->Attend(layer, {{1, 1}, {2, 1}, {3, 1}}, true);
      ASSERT_TRUE(s.ok()) << "decode step " << step << ", layer " << layer << ": " << s;
    }
  }
}

TEST_F(Fp8KvTest, SetKvScalesTakesEffectOnEmptyLayersAndIsRefusedWhereKvIsHeld) {
  ASSERT_NO_FATAL_FAILURE(Start(Fp8Flags("")));  // every scale 1
  std::vector<float> k(kLayers, 1.0f), v(kLayers, 1.0f);
  ASSERT_NO_FATAL_FAILURE(ExpectScales(k, v));
  ASSERT_TRUE(harness_->CreateSequence(5).ok());
  ASSERT_TRUE(harness_->Attend(0, {{5, 20}}, false).ok());

  // Layers 1 and 2 hold no KV: their scales change, and later calls use them.
  const std::vector<float> k12 = RandomScales(rng_, 2), v12 = RandomScales(rng_, 2);
  const absl::Status set = harness_->SetKvScales(1, k12, v12);
  ASSERT_TRUE(set.ok()) << set;
  k[1] = k12[0], k[2] = k12[1], v[1] = v12[0], v[2] = v12[1];
  ASSERT_NO_FATAL_FAILURE(ExpectScales(k, v));
  for (uint32_t layer = 1; layer < kLayers; ++layer)
    ASSERT_TRUE(harness_->Attend(layer, {{5, 20}}, false).ok()) << "layer " << layer;

  // Layer 0 holds sequence 5's KV: refused, naming both, and nothing changes.
  const absl::Status refused = client_->SetKvScales(0, 0, RandomScales(rng_, 1), {0.5f});
  EXPECT_EQ(refused.code(), absl::StatusCode::kFailedPrecondition) << refused;
  EXPECT_TRUE(absl::StrContains(refused.message(), "layer 0")) << refused;
  EXPECT_TRUE(absl::StrContains(refused.message(), "sequence 5")) << refused;
  ASSERT_NO_FATAL_FAILURE(ExpectScales(k, v));
  for (uint32_t layer = 0; layer < kLayers; ++layer)
    ASSERT_TRUE(harness_->Attend(layer, {{5, 1}}, true).ok()) << "layer " << layer;

  // The request's form is checked too, naming the field.
  const absl::Status uneven = client_->SetKvScales(0, 1, {1.0f, 1.0f}, {1.0f});
  EXPECT_EQ(uneven.code(), absl::StatusCode::kInvalidArgument) << uneven;
  EXPECT_TRUE(absl::StrContains(uneven.message(), "v_scales")) << uneven;
  const absl::Status zero = client_->SetKvScales(0, 2, {0.0f}, {1.0f});
  EXPECT_EQ(zero.code(), absl::StatusCode::kInvalidArgument) << zero;
  EXPECT_TRUE(absl::StrContains(zero.message(), "k_scales[0]")) << zero;
  ASSERT_NO_FATAL_FAILURE(ExpectScales(k, v));
}

TEST_F(Fp8KvTest, AModelDtypeServerRefusesScales) {
  std::vector<std::string> flags = Fp8Flags("");
  flags.pop_back();  // --kv_cache_dtype=fp8
  ASSERT_NO_FATAL_FAILURE(Start(flags));
  EXPECT_EQ(harness_->info().model().kv_cache_dtype(), v1::KV_CACHE_DTYPE_MODEL);
  EXPECT_EQ(harness_->info().devices(0).k_scales_size(), 0);
  const absl::Status s = client_->SetKvScales(0, 0, {0.5f}, {0.5f});
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "kv_cache_dtype")) << s;
}

// Export and import of an fp8 pool convert through the server's own scratch: a buffer that is
// only element-aligned (a region offset of 2 bytes) gets the same bytes as an aligned one, and
// an import of them into an empty sequence gives back the same KV.
TEST_F(Fp8KvTest, ExportAndImportAtAnOffsetOfTwoBytesRoundTripTheKv) {
  const std::vector<float> k = RandomScales(rng_, kLayers), v = RandomScales(rng_, kLayers);
  ScalesFile file(k, v);
  ASSERT_NO_FATAL_FAILURE(Start(Fp8Flags(file.path())));
  constexpr uint64_t kTokens = 21;
  ASSERT_TRUE(harness_->CreateSequence(1).ok());
  for (uint32_t layer = 0; layer < kLayers; ++layer)
    ASSERT_TRUE(harness_->RunAppend(harness_->BuildAppend(layer, {{1, kTokens}})).ok());
  ASSERT_TRUE(client_->CreateSequence(0, 2).ok());
  const uint64_t bytes = uint64_t{kLayers} * 2 * kTokens * 2 * 64 * 2;  // 2 kv heads x 64, bf16
  auto buf = client::SharedMemoryBuffer::Create(client::SharedMemoryBuffer::UniqueKey("f8x"),
                                                3 * bytes + 2);
  ASSERT_TRUE(buf.ok()) << buf.status();
  ASSERT_TRUE(client_->RegisterHostRegion("x", (*buf)->key(), 0, 3 * bytes + 2).ok());
  std::memset((*buf)->data(), 0xa5, 3 * bytes + 2);
  const auto ref = [&](uint64_t offset) {
    return client::MakeTensorRef("x", offset, v1::DTYPE_BFLOAT16, {kLayers, 2, kTokens, 2, 64});
  };
  const auto do_export = [&](uint64_t seq, uint64_t offset) {
    v1::ExportKvRequest r;
    r.set_seq_id(seq);
    r.set_layer_end(kLayers);
    r.set_head_end(2);
    r.set_num_tokens(kTokens);
    *r.mutable_dst() = ref(offset);
    return client_->ExportKv(r).status();
  };
  const uint8_t* p = static_cast<const uint8_t*>((*buf)->data());
  ASSERT_TRUE(do_export(1, 0).ok());
  const absl::Status unaligned = do_export(1, bytes + 2);
  ASSERT_TRUE(unaligned.ok()) << unaligned;
  EXPECT_EQ(0, std::memcmp(p, p + bytes + 2, bytes));
  v1::ImportKvRequest im;
  im.set_seq_id(2);
  im.set_layer_end(kLayers);
  im.set_head_end(2);
  im.set_num_tokens(kTokens);
  *im.mutable_src() = ref(bytes + 2);
  const auto imported = client_->ImportKv(im);
  ASSERT_TRUE(imported.ok()) << imported.status();
  ASSERT_TRUE(do_export(2, 2 * bytes + 2).ok());
  EXPECT_EQ(0, std::memcmp(p, p + 2 * bytes + 2, bytes));
  ASSERT_TRUE(client_->UnregisterRegion("x").ok());
}

// Scales are every client's: a caller outside --kv_scale_setters is refused and nothing changes.
TEST_F(Fp8KvTest, ACallerNotListedAsAScaleSetterIsRefusedAndNothingChanges) {
  std::vector<float> k = RandomScales(rng_, kLayers), v = RandomScales(rng_, kLayers);
  ScalesFile file(k, v);
  std::vector<std::string> flags = Fp8Flags(file.path());
  flags.erase(std::find(flags.begin(), flags.end(), "--kv_scale_setters=*"));
  flags.push_back("--kv_scale_setters=uid:4242,token:admin");
  ASSERT_NO_FATAL_FAILURE(Start(flags));
  const absl::Status s = client_->SetKvScales(0, 0, {0.5f}, {0.5f});
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "--kv_scale_setters")) << s;
  ASSERT_NO_FATAL_FAILURE(ExpectScales(k, v));
}

// ---- Per-token scales ----

std::vector<std::string> PerTokenFlags() {
  std::vector<std::string> flags = Fp8Flags("");
  flags.back() = "--kv_cache_dtype=fp8_per_token";
  return flags;
}

TEST_F(Fp8KvTest, APerTokenPoolReportsItselfWithBothFeaturesAndNoLayerScales) {
  ASSERT_NO_FATAL_FAILURE(Start(PerTokenFlags()));
  const v1::ServerInfo& info = harness_->info();
  EXPECT_EQ(info.model().kv_cache_dtype(), v1::KV_CACHE_DTYPE_FP8_E4M3_PER_TOKEN);
  EXPECT_EQ(info.model().dtype(), v1::DTYPE_BFLOAT16);
  const auto& f = info.features();
  EXPECT_NE(std::find(f.begin(), f.end(), "fp8_kv"), f.end());
  EXPECT_NE(std::find(f.begin(), f.end(), "fp8_kv_per_token"), f.end());
  EXPECT_EQ(info.devices(0).k_scales_size(), 0);
  EXPECT_EQ(info.devices(0).v_scales_size(), 0);
}

// Rows of N(0, 1) values, each quantized with its own scale: the harness's history holds
// scale * fp8(x / scale) per row, and every output is checked against the reference over it.
TEST_F(Fp8KvTest, APerTokenPoolsAppendPrefillAndDecodeMatchTheReferenceOverEachRowsScale) {
  ASSERT_NO_FATAL_FAILURE(Start(PerTokenFlags()));
  for (uint64_t seq : {1, 2, 3}) ASSERT_TRUE(harness_->CreateSequence(seq).ok());
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    ASSERT_TRUE(harness_->RunAppend(harness_->BuildAppend(layer, {{3, 7}, {1, 16}})).ok());
    const absl::Status s = harness_->Attend(layer, {{1, 21}, {2, 5}, {3, 2}}, false, true);
    ASSERT_TRUE(s.ok()) << "prefill, layer " << layer << ": " << s;
  }
  for (int step = 0; step < 4; ++step) {
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      const absl::Status s = harness_->Attend(layer, {{1, 1}, {2, 1}, {3, 1}}, true);
      ASSERT_TRUE(s.ok()) << "decode step " << step << ", layer " << layer << ": " << s;
    }
  }
}

// An export is each row's scale times its codes in bf16; imported into an empty sequence it is
// quantized again as append does, to the same codes and scales: a second export is the same
// bytes, and the imported sequence decodes against the same history.
TEST_F(Fp8KvTest, APerTokenPoolsExportImportedIntoAnotherSequenceRoundTripsTheKv) {
  ASSERT_NO_FATAL_FAILURE(Start(PerTokenFlags()));
  constexpr uint64_t kTokens = 21;
  ASSERT_TRUE(harness_->CreateSequence(1).ok());
  for (uint32_t layer = 0; layer < kLayers; ++layer)
    ASSERT_TRUE(harness_->RunAppend(harness_->BuildAppend(layer, {{1, kTokens}})).ok());
  ASSERT_TRUE(harness_->CreateSequence(2).ok());
  const uint64_t bytes = uint64_t{kLayers} * 2 * kTokens * 2 * 64 * 2;  // 2 kv heads x 64, bf16
  auto buf = client::SharedMemoryBuffer::Create(client::SharedMemoryBuffer::UniqueKey("f8t"),
                                                2 * bytes);
  ASSERT_TRUE(buf.ok()) << buf.status();
  ASSERT_TRUE(client_->RegisterHostRegion("x", (*buf)->key(), 0, 2 * bytes).ok());
  std::memset((*buf)->data(), 0xa5, 2 * bytes);
  const auto ref = [&](uint64_t offset) {
    return client::MakeTensorRef("x", offset, v1::DTYPE_BFLOAT16, {kLayers, 2, kTokens, 2, 64});
  };
  const auto do_export = [&](uint64_t seq, uint64_t offset) {
    v1::ExportKvRequest r;
    r.set_seq_id(seq);
    r.set_layer_end(kLayers);
    r.set_head_end(2);
    r.set_num_tokens(kTokens);
    *r.mutable_dst() = ref(offset);
    return client_->ExportKv(r).status();
  };
  ASSERT_TRUE(do_export(1, 0).ok());
  v1::ImportKvRequest im;
  im.set_seq_id(2);
  im.set_layer_end(kLayers);
  im.set_head_end(2);
  im.set_num_tokens(kTokens);
  *im.mutable_src() = ref(0);
  const auto imported = client_->ImportKv(im);
  ASSERT_TRUE(imported.ok()) << imported.status();
  ASSERT_TRUE(do_export(2, bytes).ok());
  const uint8_t* p = static_cast<const uint8_t*>((*buf)->data());
  EXPECT_EQ(0, std::memcmp(p, p + bytes, bytes));
  ASSERT_TRUE(client_->UnregisterRegion("x").ok());
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    harness_->SetHistory(2, layer, harness_->HistoryK(1, layer), harness_->HistoryV(1, layer));
    ASSERT_TRUE(harness_->Attend(layer, {{2, 1}}, true).ok()) << "layer " << layer;
  }
}

TEST_F(Fp8KvTest, APerTokenPoolRefusesSetKvScalesNamingItsMode) {
  ASSERT_NO_FATAL_FAILURE(Start(PerTokenFlags()));
  const absl::Status s = client_->SetKvScales(0, 0, {0.5f}, {0.5f});
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "fp8_per_token")) << s;
  auto info = client_->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->devices(0).k_scales_size(), 0);
}

TEST_F(Fp8KvTest, APerTokenPoolWithAScalesFileKeepsAttndFromStartingNamingBothFlags) {
  ScalesFile file(RandomScales(rng_, kLayers), RandomScales(rng_, kLayers));
  std::vector<std::string> flags = PerTokenFlags();
  flags.push_back("--kv_scales_file=" + file.path());
  auto server = ServerProcess::Start(flags);
  ASSERT_FALSE(server.ok()) << "attnd started with a scales file for a per-token pool";
  EXPECT_TRUE(absl::StrContains(server.status().message(), "--kv_scales_file")) << server.status();
  EXPECT_TRUE(absl::StrContains(server.status().message(), "--kv_cache_dtype=fp8_per_token"))
      << server.status();
}

TEST_F(Fp8KvTest, ABadScalesFileKeepsAttndFromStartingNamingTheFlag) {
  std::vector<float> k = RandomScales(rng_, kLayers), v = RandomScales(rng_, kLayers);
  v[1] = -v[1];
  ScalesFile file(k, v);
  auto server = ServerProcess::Start(Fp8Flags(file.path()));
  ASSERT_FALSE(server.ok()) << "attnd started with a negative v_scale";
  EXPECT_TRUE(absl::StrContains(server.status().message(), "--kv_scales_file"))
      << server.status();
  ScalesFile two(RandomScales(rng_, 2), RandomScales(rng_, 2));  // for 3 layers
  server = ServerProcess::Start(Fp8Flags(two.path()));
  ASSERT_FALSE(server.ok()) << "attnd started with 2 scale lines for 3 layers";
  EXPECT_TRUE(absl::StrContains(server.status().message(), "--num_layers=3")) << server.status();
}

}  // namespace
}  // namespace attnd::testing
