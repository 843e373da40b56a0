// Tests of the KV pool's storage and scales in server/config: --kv_cache_dtype and
// --kv_scales_file (ConfigFromFlags, ParseKvScales), and ServerConfig::Validate()'s checks of
// them: an fp8 pool is for 16-bit models, per-layer scales are for fp8 pools with per-layer
// scales only (not model-dtype pools, not per-token ones, which compute their own), every layer
// ends up with a finite, positive pair, and every refusal names its flag (and the line or layer).
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/config/config.h"
#include "server/config/flags.h"
#include "tests/unit/unit_test_util.h"

ABSL_DECLARE_FLAG(int64_t, num_layers);
ABSL_DECLARE_FLAG(std::string, dtype);
ABSL_DECLARE_FLAG(std::string, kv_cache_dtype);
ABSL_DECLARE_FLAG(std::string, kv_scales_file);

namespace attnd {
namespace {

using kernels::DType;
using kernels::KvScales;
using kernels::KvStorage;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

bool SameBits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

// An fp8 config of four layers that Validate() accepts.
ServerConfig Fp8Config() {
  ServerConfig c;
  c.pages_per_device = 64;
  c.model.num_layers = 4;
  c.model.kv_storage = KvStorage::kFp8E4M3;
  return c;
}

// Random positive scales over several binades, as calibration would produce.
std::vector<KvScales> RandomScales(std::mt19937& rng, size_t n) {
  std::uniform_real_distribution<float> exponent(-8.0f, 4.0f);
  std::vector<KvScales> scales(n);
  for (KvScales& s : scales) s = {std::exp2(exponent(rng)), std::exp2(exponent(rng))};
  return scales;
}

// A file under the test's temporary directory, removed when the test ends.
class TempFile {
 public:
  explicit TempFile(const std::string& text) {
    static int counter = 0;
    path_ = absl::StrCat(::testing::TempDir(), "/kv_scales_", getpid(), "_", counter++, ".txt");
    std::ofstream(path_) << text;
  }
  ~TempFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// ---- Validate() ----

TEST(KvCacheConfigTest, TheDefaultIsAModelDtypePoolWithEveryScaleOne) {
  ServerConfig c;
  c.pages_per_device = 64;
  ASSERT_TRUE(c.Validate().ok()) << c.Validate();
  EXPECT_EQ(c.model.kv_storage, KvStorage::kModelDType);
  ASSERT_EQ(c.model.kv_scales.size(), static_cast<size_t>(c.model.num_layers));
  for (const KvScales& s : c.model.kv_scales) {
    EXPECT_EQ(s.k, 1.0f);
    EXPECT_EQ(s.v, 1.0f);
  }
  EXPECT_EQ(c.model.CacheShape(1).StorageDType(), c.model.dtype);
}

TEST(KvCacheConfigTest, AnFp8PoolHalvesThePagesOfA16BitModelAndKeepsItsDtype) {
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    ServerConfig model = Fp8Config();
    model.model.kv_storage = KvStorage::kModelDType;
    model.model.dtype = dtype;
    ServerConfig fp8 = Fp8Config();
    fp8.model.dtype = dtype;
    ASSERT_TRUE(model.Validate().ok());
    ASSERT_TRUE(fp8.Validate().ok()) << fp8.Validate();
    EXPECT_EQ(2 * fp8.model.PageBytes(), model.model.PageBytes());
    const kernels::KvCacheShape shape = fp8.model.CacheShape(10);
    EXPECT_EQ(shape.dtype, dtype);  // q, k_new, v_new, out and transfer buffers
    EXPECT_EQ(shape.storage, KvStorage::kFp8E4M3);
    EXPECT_EQ(shape.ElemBytes(), 1);
    EXPECT_EQ(shape.TotalBytes(), 10 * fp8.model.PageBytes());
  }
}

// A per-token pool's page is an fp8 page plus an f32 scale per token, kv head, K/V and layer;
// the pool's scales start at a 256-byte boundary after the pages. Its layers' per-layer scales
// stay 1: there are none.
TEST(KvCacheConfigTest, APerTokenPoolAddsFourBytesPerTokenHeadAndKvToAnFp8Page) {
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    ServerConfig fp8 = Fp8Config();
    fp8.model.dtype = dtype;
    ServerConfig token = fp8;
    token.model.kv_storage = KvStorage::kFp8E4M3PerToken;
    ASSERT_TRUE(fp8.Validate().ok());
    ASSERT_TRUE(token.Validate().ok()) << token.Validate();
    const ModelShape& m = token.model;
    const int64_t scale_bytes = m.num_layers * 2 * m.page_size * m.num_kv_heads * 4;
    EXPECT_EQ(m.PageBytes(), fp8.model.PageBytes() + scale_bytes);
    const kernels::KvCacheShape shape = m.CacheShape(10);
    EXPECT_EQ(shape.dtype, dtype);
    EXPECT_EQ(shape.storage, KvStorage::kFp8E4M3PerToken);
    EXPECT_EQ(shape.ElemBytes(), 1);
    const int64_t pages_bytes = 10 * fp8.model.PageBytes();
    EXPECT_EQ(shape.TotalBytes(), (pages_bytes + 255) / 256 * 256 + 10 * scale_bytes);
    ASSERT_EQ(m.kv_scales.size(), static_cast<size_t>(m.num_layers));
    for (const KvScales& s : m.kv_scales) {
      EXPECT_EQ(s.k, 1.0f);
      EXPECT_EQ(s.v, 1.0f);
    }
  }
}

TEST(KvCacheConfigTest, OneScalePairAppliesToEveryLayer) {
  std::mt19937 rng(testing_util::TestSeed());
  ServerConfig c = Fp8Config();
  c.model.kv_scales = RandomScales(rng, 1);
  const KvScales want = c.model.kv_scales[0];
  ASSERT_TRUE(c.Validate().ok()) << c.Validate();
  ASSERT_EQ(c.model.kv_scales.size(), 4u);
  for (const KvScales& s : c.model.kv_scales) {
    EXPECT_TRUE(SameBits(s.k, want.k));
    EXPECT_TRUE(SameBits(s.v, want.v));
  }
}

TEST(KvCacheConfigTest, PerLayerScalesAreKeptInLayerOrder) {
  std::mt19937 rng(testing_util::TestSeed());
  ServerConfig c = Fp8Config();
  const std::vector<KvScales> want = RandomScales(rng, 4);
  c.model.kv_scales = want;
  ASSERT_TRUE(c.Validate().ok()) << c.Validate();
  ASSERT_EQ(c.model.kv_scales.size(), 4u);
  for (size_t l = 0; l < want.size(); ++l) {
    EXPECT_TRUE(SameBits(c.model.kv_scales[l].k, want[l].k)) << "layer " << l;
    EXPECT_TRUE(SameBits(c.model.kv_scales[l].v, want[l].v)) << "layer " << l;
  }
}

struct KvBadCase {
  const char* name;
  std::function<void(ServerConfig&)> change;
  const char* flag;    // the message must name it
  const char* detail;  // and this (a layer, the reason)
};

void PrintTo(const KvBadCase& c, std::ostream* os) { *os << c.name; }

class KvCacheConfigRejectsTest : public ::testing::TestWithParam<KvBadCase> {};

TEST_P(KvCacheConfigRejectsTest, ValidateRejectsNamingTheFlagAndWhere) {
  ServerConfig c = Fp8Config();
  ASSERT_TRUE(ServerConfig(c).Validate().ok());
  GetParam().change(c);
  const absl::Status s = c.Validate();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), GetParam().flag)) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), GetParam().detail)) << s;
}

// Per-layer scales of four layers, all 1 but one value.
std::function<void(ServerConfig&)> BadScaleAt(size_t layer, bool k, float value) {
  return [=](ServerConfig& c) {
    c.model.kv_scales.assign(4, KvScales{});
    (k ? c.model.kv_scales[layer].k : c.model.kv_scales[layer].v) = value;
  };
}

INSTANTIATE_TEST_SUITE_P(
    EveryBadKvCacheSetting, KvCacheConfigRejectsTest,
    ::testing::Values(
        KvBadCase{"Fp8WithAnFp32Model", [](ServerConfig& c) { c.model.dtype = DType::kFloat32; },
                  "--kv_cache_dtype", "fp16"},
        KvBadCase{"Fp8PerTokenWithAnFp32Model",
                  [](ServerConfig& c) {
                    c.model.kv_storage = KvStorage::kFp8E4M3PerToken;
                    c.model.dtype = DType::kFloat32;
                  },
                  "--kv_cache_dtype=fp8_per_token", "fp16"},
        KvBadCase{"AScalesFileWithAPerTokenPool",
                  [](ServerConfig& c) {
                    c.model.kv_storage = KvStorage::kFp8E4M3PerToken;
                    c.kv_scales_file = "scales.txt";
                  },
                  "--kv_scales_file", "--kv_cache_dtype=fp8_per_token"},
        KvBadCase{"ScalesOtherThanOneWithAPerTokenPool",
                  [](ServerConfig& c) {
                    c.model.kv_storage = KvStorage::kFp8E4M3PerToken;
                    c.model.kv_scales = {{1.0f, 0.5f}};
                  },
                  "--kv_scales_file", "--kv_cache_dtype=fp8_per_token"},
        KvBadCase{"AScalesFileWithAModelDtypePool",
                  [](ServerConfig& c) {
                    c.model.kv_storage = KvStorage::kModelDType;
                    c.kv_scales_file = "scales.txt";
                  },
                  "--kv_scales_file", "fp8"},
        KvBadCase{"ScalesOtherThanOneWithAModelDtypePool",
                  [](ServerConfig& c) {
                    c.model.kv_storage = KvStorage::kModelDType;
                    c.model.kv_scales = {{0.5f, 1.0f}};
                  },
                  "--kv_scales_file", "fp8"},
        KvBadCase{"TwoScaleLinesForFourLayers",
                  [](ServerConfig& c) { c.model.kv_scales.assign(2, KvScales{}); },
                  "--kv_scales_file", "--num_layers=4"},
        KvBadCase{"ZeroKScale", BadScaleAt(2, true, 0.0f), "--kv_scales_file", "layer 2: k_scale"},
        KvBadCase{"NegativeVScale", BadScaleAt(3, false, -0.5f), "--kv_scales_file",
                  "layer 3: v_scale"},
        KvBadCase{"NaNKScale", BadScaleAt(1, true, kNaN), "--kv_scales_file", "layer 1: k_scale"},
        KvBadCase{"InfiniteVScale", BadScaleAt(0, false, kInf), "--kv_scales_file",
                  "layer 0: v_scale"},
        KvBadCase{"ABadPairForEveryLayer",
                  [](ServerConfig& c) { c.model.kv_scales = {{1.0f, 0.0f}}; }, "--kv_scales_file",
                  "layer 0: v_scale"}),
    [](const ::testing::TestParamInfo<KvBadCase>& info) { return std::string(info.param.name); });

// ---- ParseKvScales ----

TEST(ParseKvScalesTest, ReadsOnePairPerLineSkippingCommentsAndBlankLines) {
  std::mt19937 rng(testing_util::TestSeed());
  const std::vector<KvScales> want = RandomScales(rng, 5);
  std::string text = "# calibrated scales\n\n";
  for (size_t l = 0; l < want.size(); ++l) {
    // Every separator and line ending a hand-written file may have.
    absl::StrAppend(&text, l % 2 ? "\t" : "  ", absl::StrFormat("%.9g", want[l].k),
                    l % 2 ? "\t" : " ", absl::StrFormat("%.9g", want[l].v),
                    l == 1 ? "  # layer 1\n" : l == 2 ? "\r\n" : "\n");
    if (l == 2) text += "   \n";
  }
  absl::StatusOr<std::vector<KvScales>> got = ParseKvScales(text);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), want.size());
  for (size_t l = 0; l < want.size(); ++l) {
    EXPECT_TRUE(SameBits((*got)[l].k, want[l].k)) << "line of layer " << l;
    EXPECT_TRUE(SameBits((*got)[l].v, want[l].v)) << "line of layer " << l;
  }
}

TEST(ParseKvScalesTest, RefusesABadLineNamingItsNumber) {
  for (const char* bad : {"1 2 3", "0.5", "half 1", "1 1e", "0 1", "1 -2", "nan 1", "1 inf"}) {
    const std::string text = absl::StrCat("# header\n1 1\n\n", bad, "\n1 1\n");
    absl::StatusOr<std::vector<KvScales>> got = ParseKvScales(text);
    ASSERT_FALSE(got.ok()) << "'" << bad << "' accepted";
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StartsWith(got.status().message(), "line 4: ")) << got.status();
  }
}

TEST(ParseKvScalesTest, RefusesTextWithoutAPair) {
  for (const char* empty : {"", "\n\n", "# only a comment\n   \n"})
    EXPECT_FALSE(ParseKvScales(empty).ok()) << "'" << empty << "'";
}

// ---- The flags ----

TEST(KvCacheFlagsTest, KvCacheDtypeTakesAutoFp8AndFp8PerTokenAndDescribePrintsThem) {
  absl::FlagSaver saver;
  struct Accepted {
    const char* value;
    KvStorage storage;
    const char* described;  // Describe's line, itself a value the flag takes
  };
  for (const Accepted& a : {Accepted{"auto", KvStorage::kModelDType, "auto"},
                            Accepted{"fp8", KvStorage::kFp8E4M3, "fp8_e4m3"},
                            Accepted{"fp8_e4m3", KvStorage::kFp8E4M3, "fp8_e4m3"},
                            Accepted{"FP8", KvStorage::kFp8E4M3, "fp8_e4m3"},
                            Accepted{"fp8_per_token", KvStorage::kFp8E4M3PerToken, "fp8_per_token"},
                            Accepted{"fp8_e4m3_per_token", KvStorage::kFp8E4M3PerToken,
                                     "fp8_per_token"},
                            Accepted{"FP8_Per_Token", KvStorage::kFp8E4M3PerToken,
                                     "fp8_per_token"}}) {
    absl::SetFlag(&FLAGS_kv_cache_dtype, a.value);
    absl::StatusOr<ServerConfig> c = ConfigFromFlags();
    ASSERT_TRUE(c.ok()) << a.value << ": " << c.status();
    EXPECT_EQ(c->model.kv_storage, a.storage) << a.value;
    EXPECT_TRUE(absl::StrContains(Describe(*c),
                                  absl::StrCat("\n--kv_cache_dtype=", a.described, "\n")))
        << a.value;
  }
  for (const char* bad : {"fp8_e5m2", "int8", "per_token", "fp8_per_layer", ""}) {
    absl::SetFlag(&FLAGS_kv_cache_dtype, bad);
    absl::StatusOr<ServerConfig> c = ConfigFromFlags();
    ASSERT_FALSE(c.ok()) << bad;
    EXPECT_TRUE(absl::StrContains(c.status().message(), "--kv_cache_dtype")) << c.status();
  }
}

TEST(KvCacheFlagsTest, AnFp8PoolOfAnFp32ModelIsRefused) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_kv_cache_dtype, "fp8");
  absl::SetFlag(&FLAGS_dtype, "fp32");
  absl::StatusOr<ServerConfig> c = ConfigFromFlags();
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(absl::StrContains(c.status().message(), "--kv_cache_dtype")) << c.status();
}

TEST(KvCacheFlagsTest, AnFp8PerTokenPoolOfAnFp32ModelIsRefused) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_kv_cache_dtype, "fp8_per_token");
  absl::SetFlag(&FLAGS_dtype, "fp32");
  absl::StatusOr<ServerConfig> c = ConfigFromFlags();
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(absl::StrContains(c.status().message(), "--kv_cache_dtype=fp8_per_token"))
      << c.status();
}

// Per-token scales are computed at append: a scales file would be ignored, so it is refused,
// naming both flags.
TEST(KvCacheFlagsTest, AScalesFileWithAnFp8PerTokenPoolIsRefusedNamingBothFlags) {
  absl::FlagSaver saver;
  TempFile file("0.5 0.25\n");
  absl::SetFlag(&FLAGS_kv_cache_dtype, "fp8_per_token");
  absl::SetFlag(&FLAGS_kv_scales_file, file.path());
  absl::StatusOr<ServerConfig> c = ConfigFromFlags();
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(c.status().message(), "--kv_scales_file")) << c.status();
  EXPECT_TRUE(absl::StrContains(c.status().message(), "--kv_cache_dtype=fp8_per_token"))
      << c.status();
}

TEST(KvCacheFlagsTest, AScalesFileGivesEveryLayerItsLine) {
  absl::FlagSaver saver;
  std::mt19937 rng(testing_util::TestSeed());
  const std::vector<KvScales> want = RandomScales(rng, 3);
  std::string text = "# k_scale v_scale, layer order\n";
  for (const KvScales& s : want) absl::StrAppend(&text, absl::StrFormat("%.9g %.9g\n", s.k, s.v));
  TempFile file(text);
  absl::SetFlag(&FLAGS_num_layers, 3);
  absl::SetFlag(&FLAGS_kv_cache_dtype, "fp8");
  absl::SetFlag(&FLAGS_kv_scales_file, file.path());
  absl::StatusOr<ServerConfig> c = ConfigFromFlags();
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_EQ(c->model.kv_scales.size(), 3u);
  for (size_t l = 0; l < want.size(); ++l) {
    EXPECT_TRUE(SameBits(c->model.kv_scales[l].k, want[l].k)) << "layer " << l;
    EXPECT_TRUE(SameBits(c->model.kv_scales[l].v, want[l].v)) << "layer " << l;
  }
  EXPECT_TRUE(absl::StrContains(Describe(*c), absl::StrCat("\n--kv_scales_file=", file.path(), "\n")));
}

TEST(KvCacheFlagsTest, AScalesFileWithAModelDtypePoolIsRefused) {
  absl::FlagSaver saver;
  TempFile file("0.5 0.25\n");
  absl::SetFlag(&FLAGS_kv_scales_file, file.path());  // --kv_cache_dtype=auto
  absl::StatusOr<ServerConfig> c = ConfigFromFlags();
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(absl::StrContains(c.status().message(), "--kv_scales_file")) << c.status();
}

TEST(KvCacheFlagsTest, AScalesFileThatCannotBeReadIsRefusedNamingTheFlag) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_kv_cache_dtype, "fp8");
  absl::SetFlag(&FLAGS_kv_scales_file, ::testing::TempDir() + "/no-such-kv-scales-file");
  absl::StatusOr<ServerConfig> c = ConfigFromFlags();
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(absl::StrContains(c.status().message(), "--kv_scales_file")) << c.status();
}

TEST(KvCacheFlagsTest, ABadLineInTheScalesFileIsRefusedNamingTheFlagAndTheLine) {
  absl::FlagSaver saver;
  TempFile file("1 1\n# comment\n1 0\n");
  absl::SetFlag(&FLAGS_num_layers, 2);
  absl::SetFlag(&FLAGS_kv_cache_dtype, "fp8");
  absl::SetFlag(&FLAGS_kv_scales_file, file.path());
  absl::StatusOr<ServerConfig> c = ConfigFromFlags();
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(absl::StrContains(c.status().message(), "--kv_scales_file")) << c.status();
  EXPECT_TRUE(absl::StrContains(c.status().message(), "line 3")) << c.status();
}

TEST(KvCacheFlagsTest, AScalesFileWithTheWrongNumberOfLinesIsRefused) {
  absl::FlagSaver saver;
  TempFile file("1 1\n2 2\n");
  absl::SetFlag(&FLAGS_num_layers, 3);
  absl::SetFlag(&FLAGS_kv_cache_dtype, "fp8");
  absl::SetFlag(&FLAGS_kv_scales_file, file.path());
  absl::StatusOr<ServerConfig> c = ConfigFromFlags();
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(absl::StrContains(c.status().message(), "--num_layers=3")) << c.status();
}

}  // namespace
}  // namespace attnd
