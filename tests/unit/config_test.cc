// Tests of server/config.h: ServerConfig::Validate() rejects every bad setting with a message that
// names its flag, resolves defaults (sm_scale, graph buckets), and DefaultGraphBuckets has the
// vLLM-like shape; Describe() (attnd --check_config) prints every flag of server/config/flags.cc.
#include "server/config/config.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/config/flags.h"

ABSL_DECLARE_FLAG(std::string, devices);

namespace attnd {
namespace {

// A config that Validate() accepts: the starting point each bad case changes one field of.
ServerConfig GoodConfig() {
  ServerConfig c;
  c.pages_per_device = 64;
  return c;
}

struct BadCase {
  const char* name;
  std::function<void(ServerConfig&)> change;
  const char* flag;  // the message must name it
};

void PrintTo(const BadCase& c, std::ostream* os) { *os << c.name; }

class ConfigRejectsTest : public ::testing::TestWithParam<BadCase> {};

TEST_P(ConfigRejectsTest, ValidateRejectsTheFieldNamingItsFlag) {
  ServerConfig c = GoodConfig();
  ASSERT_TRUE(ServerConfig(c).Validate().ok());
  GetParam().change(c);
  const absl::Status s = c.Validate();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(GetParam().flag), absl::string_view::npos)
      << "message '" << s.message() << "' does not name " << GetParam().flag;
}

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

INSTANTIATE_TEST_SUITE_P(
    EveryBadField, ConfigRejectsTest,
    ::testing::Values(
        BadCase{"ZeroLayers", [](ServerConfig& c) { c.model.num_layers = 0; }, "--num_layers"},
        BadCase{"TooManyLayers", [](ServerConfig& c) { c.model.num_layers = 1025; },
                "--num_layers"},
        BadCase{"ZeroKvHeads", [](ServerConfig& c) { c.model.num_kv_heads = 0; },
                "--num_kv_heads"},
        BadCase{"NegativeKvHeads", [](ServerConfig& c) { c.model.num_kv_heads = -2; },
                "--num_kv_heads"},
        BadCase{"ZeroQoHeads", [](ServerConfig& c) { c.model.num_qo_heads = 0; },
                "--num_qo_heads"},
        BadCase{"QoHeadsNotAMultipleOfKvHeads",
                [](ServerConfig& c) {
                  c.model.num_qo_heads = 6;
                  c.model.num_kv_heads = 4;
                },
                "--num_qo_heads"},
        BadCase{"FewerQoThanKvHeads",
                [](ServerConfig& c) {
                  c.model.num_qo_heads = 2;
                  c.model.num_kv_heads = 4;
                },
                "--num_qo_heads"},
        BadCase{"ZeroHeadDim", [](ServerConfig& c) { c.model.head_dim = 0; }, "--head_dim"},
        BadCase{"HugeHeadDim", [](ServerConfig& c) { c.model.head_dim = 4096; }, "--head_dim"},
        BadCase{"ZeroPageSize", [](ServerConfig& c) { c.model.page_size = 0; }, "--page_size"},
        BadCase{"PageSizeAbove64", [](ServerConfig& c) { c.model.page_size = 65; },
                "--page_size"},
        BadCase{"WindowBelowMinusOne", [](ServerConfig& c) { c.model.window_left = -2; },
                "--window_left"},
        BadCase{"NegativeSoftCap", [](ServerConfig& c) { c.model.logits_soft_cap = -1.0f; },
                "--logits_soft_cap"},
        BadCase{"NaNSoftCap", [](ServerConfig& c) { c.model.logits_soft_cap = kNaN; },
                "--logits_soft_cap"},
        BadCase{"InfiniteSoftCap", [](ServerConfig& c) { c.model.logits_soft_cap = kInf; },
                "--logits_soft_cap"},
        BadCase{"NegativeSmScale", [](ServerConfig& c) { c.model.sm_scale = -0.5f; },
                "--sm_scale"},
        BadCase{"NaNSmScale", [](ServerConfig& c) { c.model.sm_scale = kNaN; }, "--sm_scale"},
        BadCase{"InfiniteSmScale", [](ServerConfig& c) { c.model.sm_scale = kInf; },
                "--sm_scale"},
        BadCase{"NoConcurrentPulls", [](ServerConfig& c) { c.max_concurrent_pulls = 0; },
                "--max_concurrent_pulls"},
        BadCase{"ZeroPullTimeout", [](ServerConfig& c) { c.kv_pull_timeout_s = 0; },
                "--kv_pull_timeout_s"},
        BadCase{"DuplicateDevice", [](ServerConfig& c) { c.devices = {0, 1, 0}; }, "--devices"},
        BadCase{"NegativeDevice", [](ServerConfig& c) { c.devices = {-1}; }, "--devices"},
        BadCase{"NegativePagesPerDevice", [](ServerConfig& c) { c.pages_per_device = -1; },
                "--pages_per_device"},
        BadCase{"PagesPerDeviceAtLeast2To31",
                [](ServerConfig& c) { c.pages_per_device = int64_t{1} << 31; },
                "--pages_per_device"},
        BadCase{"ZeroMemoryFraction",
                [](ServerConfig& c) {
                  c.pages_per_device = 0;
                  c.memory_fraction = 0.0;
                },
                "--memory_fraction"},
        BadCase{"MemoryFractionAbove95Percent",
                [](ServerConfig& c) {
                  c.pages_per_device = 0;
                  c.memory_fraction = 0.96;
                },
                "--memory_fraction"},
        BadCase{"NaNMemoryFraction",
                [](ServerConfig& c) {
                  c.pages_per_device = 0;
                  c.memory_fraction = std::nan("");
                },
                "--memory_fraction"},
        BadCase{"ZeroMaxBatchSize", [](ServerConfig& c) { c.max_batch_size = 0; },
                "--max_batch_size"},
        BadCase{"MaxBatchSizeAbove4096", [](ServerConfig& c) { c.max_batch_size = 4097; },
                "--max_batch_size"},
        BadCase{"ZeroMaxSeqLen", [](ServerConfig& c) { c.max_seq_len = 0; }, "--max_seq_len"},
        BadCase{"MaxSeqLenAbove2To30",
                [](ServerConfig& c) { c.max_seq_len = (int64_t{1} << 30) + 1; }, "--max_seq_len"},
        BadCase{"ZeroMaxTokensPerRequest", [](ServerConfig& c) { c.max_tokens_per_request = 0; },
                "--max_tokens_per_request"},
        BadCase{"MaxTokensPerRequestAbove2To24",
                [](ServerConfig& c) { c.max_tokens_per_request = (int64_t{1} << 24) + 1; },
                "--max_tokens_per_request"},
        BadCase{"ZeroGraphBucket", [](ServerConfig& c) { c.graph_buckets = {0, 8}; },
                "--graph_buckets"},
        BadCase{"NegativeGraphBucket", [](ServerConfig& c) { c.graph_buckets = {-4, 8}; },
                "--graph_buckets"},
        BadCase{"GraphBucketAboveMaxBatchSize",
                [](ServerConfig& c) {
                  c.max_batch_size = 16;
                  c.graph_buckets = {1, 32};
                },
                "--graph_buckets"},
        BadCase{"NoListener",
                [](ServerConfig& c) {
                  c.unix_socket.clear();
                  c.tcp_address.clear();
                },
                "--unix_socket"},
        BadCase{"TcpWithoutTlsOrInsecureTcp",
                [](ServerConfig& c) { c.tcp_address = "127.0.0.1:0"; }, "--insecure_tcp"},
        BadCase{"TlsCertificateWithoutKey",
                [](ServerConfig& c) {
                  c.tcp_address = "127.0.0.1:0";
                  c.insecure_tcp = true;
                  c.tls_cert_file = "server.pem";
                },
                "--tls_key_file"},
        BadCase{"ClientCaWithoutServerCertificate",
                [](ServerConfig& c) {
                  c.tcp_address = "127.0.0.1:0";
                  c.insecure_tcp = true;
                  c.tls_client_ca_file = "ca.pem";
                },
                "--tls_client_ca_file"},
        BadCase{"NegativeMetricsPort", [](ServerConfig& c) { c.metrics_port = -1; },
                "--metrics_port"},
        BadCase{"MetricsPortAbove65535", [](ServerConfig& c) { c.metrics_port = 65536; },
                "--metrics_port"},
        BadCase{"SocketModeBeyondPermissionBits",
                [](ServerConfig& c) { c.unix_socket_mode = 01777; }, "--unix_socket_mode"},
        BadCase{"NegativeSocketMode", [](ServerConfig& c) { c.unix_socket_mode = -1; },
                "--unix_socket_mode"},
        BadCase{"MessageLimitBelow4KiB", [](ServerConfig& c) { c.max_message_bytes = 4095; },
                "--max_message_bytes"},
        BadCase{"MessageLimitAbove1GiB",
                [](ServerConfig& c) { c.max_message_bytes = (int64_t{1} << 30) + 1; },
                "--max_message_bytes"},
        BadCase{"NegativeDrainTimeout", [](ServerConfig& c) { c.drain_timeout_s = -1.0; },
                "--drain_timeout_s"},
        BadCase{"NaNDrainTimeout", [](ServerConfig& c) { c.drain_timeout_s = std::nan(""); },
                "--drain_timeout_s"},
        BadCase{"WorkerSpinBelowAuto", [](ServerConfig& c) { c.worker_spin_us = -2; },
                "--worker_spin_us"},
        BadCase{"WorkerSpinAboveOneSecond", [](ServerConfig& c) { c.worker_spin_us = 1000001; },
                "--worker_spin_us"},
        // spdlog maps an unknown level name to "off": a typo would silence every log line.
        BadCase{"UnknownLogLevel", [](ServerConfig& c) { c.log_level = "verbose"; },
                "--log_level"},
        BadCase{"EmptyLogLevel", [](ServerConfig& c) { c.log_level = ""; }, "--log_level"}),
    [](const ::testing::TestParamInfo<BadCase>& info) { return std::string(info.param.name); });

TEST(ConfigTest, TheDefaultsWithPagesPerDeviceValidate) {
  ServerConfig c = GoodConfig();
  EXPECT_TRUE(c.Validate().ok());
}

TEST(ConfigTest, TheDefaultsWithMemoryFractionValidate) {
  ServerConfig c;
  ASSERT_EQ(c.pages_per_device, 0);
  EXPECT_TRUE(c.Validate().ok());
}

TEST(ConfigTest, TheDefaultsExposeNothingBeyondThisHost) {
  const ServerConfig c;
  EXPECT_EQ(c.metrics_bind, "127.0.0.1");
  EXPECT_EQ(c.unix_socket_mode, 0660);  // owner and group may connect, others may not
  EXPECT_TRUE(c.tcp_address.empty());
  EXPECT_LE(c.max_message_bytes, 4 << 20);
}

TEST(ConfigTest, BoundaryValuesAreAccepted) {
  ServerConfig c = GoodConfig();
  c.model.num_layers = 1024;
  c.model.page_size = 64;
  c.model.window_left = 0;
  c.model.num_qo_heads = 7;
  c.model.num_kv_heads = 7;
  c.max_batch_size = 4096;
  c.max_seq_len = int64_t{1} << 30;
  c.max_tokens_per_request = int64_t{1} << 24;
  c.pages_per_device = (int64_t{1} << 31) - 1;
  c.metrics_port = 0;
  c.unix_socket.clear();
  c.tcp_address = "127.0.0.1:0";
  c.insecure_tcp = true;  // TCP in clear text only when asked for
  c.drain_timeout_s = 0;
  c.worker_spin_us = 1000000;
  EXPECT_TRUE(c.Validate().ok()) << c.Validate();
  c = GoodConfig();
  c.model.page_size = 1;
  c.memory_fraction = 0.95;
  c.pages_per_device = 0;
  EXPECT_TRUE(c.Validate().ok());
}

TEST(ConfigTest, EveryLogLevelTheFlagDocumentsIsAccepted) {
  for (const char* level : {"trace", "debug", "info", "warn", "error"}) {
    ServerConfig c = GoodConfig();
    c.log_level = level;
    EXPECT_TRUE(c.Validate().ok()) << level;
  }
}

TEST(ConfigTest, ZeroSmScaleResolvesToOneOverSqrtHeadDim) {
  for (int64_t head_dim : {64, 128, 80}) {
    ServerConfig c = GoodConfig();
    c.model.head_dim = head_dim;
    c.model.sm_scale = 0.0f;
    ASSERT_TRUE(c.Validate().ok());
    EXPECT_FLOAT_EQ(c.model.sm_scale, 1.0f / std::sqrt(static_cast<float>(head_dim)));
    EXPECT_EQ(c.model.Options().sm_scale, c.model.sm_scale);
  }
}

TEST(ConfigTest, AnExplicitSmScaleIsKept) {
  ServerConfig c = GoodConfig();
  c.model.sm_scale = 0.3f;
  ASSERT_TRUE(c.Validate().ok());
  EXPECT_EQ(c.model.sm_scale, 0.3f);
}

TEST(ConfigTest, EmptyGraphBucketsResolveToTheDefaultForMaxBatchSize) {
  ServerConfig c = GoodConfig();
  c.max_batch_size = 40;
  ASSERT_TRUE(c.Validate().ok());
  EXPECT_EQ(c.graph_buckets, DefaultGraphBuckets(40));
}

TEST(ConfigTest, GivenGraphBucketsAreSortedAndDeduplicated) {
  ServerConfig c = GoodConfig();
  c.max_batch_size = 64;
  c.graph_buckets = {16, 1, 64, 16, 4};
  ASSERT_TRUE(c.Validate().ok());
  EXPECT_EQ(c.graph_buckets, (std::vector<int64_t>{1, 4, 16, 64}));
}

TEST(ConfigTest, ModelShapeDerivesCacheShapeOptionsAndPageBytes) {
  ServerConfig c = GoodConfig();
  c.model.num_layers = 3;
  c.model.num_kv_heads = 4;
  c.model.num_qo_heads = 12;
  c.model.head_dim = 32;
  c.model.page_size = 8;
  c.model.dtype = kernels::DType::kFloat32;
  c.model.layout = kernels::KvLayout::kHND;
  c.model.logits_soft_cap = 30.0f;
  c.model.window_left = 100;
  ASSERT_TRUE(c.Validate().ok());
  EXPECT_EQ(c.model.PageBytes(), 3 * 2 * 8 * 4 * 32 * 4);
  const kernels::KvCacheShape shape = c.model.CacheShape(10);
  EXPECT_EQ(shape.num_layers, 3);
  EXPECT_EQ(shape.num_pages, 10);
  EXPECT_EQ(shape.page_size, 8);
  EXPECT_EQ(shape.num_kv_heads, 4);
  EXPECT_EQ(shape.head_dim, 32);
  EXPECT_EQ(shape.layout, kernels::KvLayout::kHND);
  EXPECT_EQ(shape.dtype, kernels::DType::kFloat32);
  EXPECT_EQ(shape.TotalBytes(), 10 * c.model.PageBytes());
  const kernels::AttentionOptions o = c.model.Options();
  EXPECT_EQ(o.num_qo_heads, 12);
  EXPECT_EQ(o.logits_soft_cap, 30.0f);
  EXPECT_EQ(o.window_left, 100);
}

// ---- DefaultGraphBuckets ----

// 1, 2, 4, then every multiple of 8 up to max, then max itself: sorted, unique, ending at max.
void ExpectVllmLikeBuckets(int64_t max) {
  SCOPED_TRACE(max);
  const std::vector<int64_t> b = DefaultGraphBuckets(max);
  ASSERT_FALSE(b.empty());
  EXPECT_EQ(b.front(), 1);
  EXPECT_EQ(b.back(), max);
  EXPECT_TRUE(std::is_sorted(b.begin(), b.end()));
  EXPECT_EQ(std::adjacent_find(b.begin(), b.end()), b.end()) << "duplicate bucket";
  std::vector<int64_t> want;
  for (int64_t x : {1, 2, 4}) {
    if (x <= max) want.push_back(x);
  }
  for (int64_t x = 8; x <= max; x += 8) want.push_back(x);
  if (want.back() != max) want.push_back(max);
  EXPECT_EQ(b, want);
}

TEST(DefaultGraphBucketsTest, AreOneTwoFourThenStepsOfEightEndingAtMax) {
  for (int64_t max : {1, 2, 3, 4, 5, 7, 8, 9, 16, 20, 24, 100, 256, 4096}) ExpectVllmLikeBuckets(max);
}

TEST(DefaultGraphBucketsTest, For256AreTheVllmCaptureSizes) {
  const std::vector<int64_t> b = DefaultGraphBuckets(256);
  ASSERT_GE(b.size(), 7u);
  EXPECT_EQ(std::vector<int64_t>(b.begin(), b.begin() + 7),
            (std::vector<int64_t>{1, 2, 4, 8, 16, 24, 32}));
  EXPECT_EQ(b.size(), 3u + 32u);
  EXPECT_EQ(b.back(), 256);
}

TEST(DefaultGraphBucketsTest, ForANonMultipleOfEightEndWithMaxItself) {
  EXPECT_EQ(DefaultGraphBuckets(20), (std::vector<int64_t>{1, 2, 4, 8, 16, 20}));
  EXPECT_EQ(DefaultGraphBuckets(3), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(DefaultGraphBuckets(1), (std::vector<int64_t>{1}));
}

// A flag added to flags.cc but not to Describe() would be missing from --check_config's output.
TEST(DescribeTest, PrintsEveryFlagOnceWithItsResolvedValue) {
  absl::StatusOr<ServerConfig> config = ConfigFromFlags();  // the defaults
  ASSERT_TRUE(config.ok()) << config.status();
  const std::string text = Describe(*config);
  int flags = 0;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (!absl::StrContains(flag->Filename(), "server/config/flags.cc")) continue;
    ++flags;
    const std::string line = absl::StrCat("--", name, "=");
    EXPECT_TRUE(absl::StartsWith(text, line) || absl::StrContains(text, "\n" + line)) << name;
  }
  EXPECT_GT(flags, 30);
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), flags);
  EXPECT_TRUE(absl::StrContains(text, "\n--sm_scale=0.125\n"));  // 1/sqrt(64), resolved
  EXPECT_TRUE(absl::StrContains(text, "\n--unix_socket_mode=0660\n"));  // octal, as given
}

TEST(FlagsTest, DevicesAllIsTheDefaultAndAnEmptyListIsRefused) {
  absl::FlagSaver saver;
  absl::StatusOr<ServerConfig> config = ConfigFromFlags();
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->devices.empty());  // every device the platform sees
  EXPECT_TRUE(absl::StrContains(Describe(*config), "\n--devices=all\n"));
  absl::SetFlag(&FLAGS_devices, "1,0");
  config = ConfigFromFlags();
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->devices, (std::vector<int>{1, 0}));
  absl::SetFlag(&FLAGS_devices, " ");
  config = ConfigFromFlags();
  ASSERT_FALSE(config.ok());
  EXPECT_TRUE(absl::StrContains(config.status().message(), "--devices")) << config.status();
}

}  // namespace
}  // namespace attnd
