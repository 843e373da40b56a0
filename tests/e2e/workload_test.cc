// The workload library (client/workload/) against a real attnd: the prefill + decode schedule
// that `attnctl demo` runs passes every check of its fp64 verifier over the Unix socket and
// over TCP, uses every kind of data call, leaves nothing behind on the server, times its
// benchmark over every transport, and stops with a clear status when it cannot run. On an fp8
// pool it checks against what the pool holds (scale * fp8(x / scale), with the layer's scale or
// the row's own).
#include "client/workload/workload.h"

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "gtest/gtest.h"
#include "testing/server_process.h"

namespace attnd::workload {
namespace {

using testing::MakeUidToken;
using testing::ServerProcess;
using testing::UidToken;

uint64_t Seed() {
  static const uint64_t seed = RandomSeed();
  return seed;
}

struct Served {
  std::unique_ptr<ServerProcess> server;
  std::unique_ptr<client::Client> client;
};

// A small CPU model on one device; `tcp` connects over TCP instead of the Unix socket; `extra`
// flags follow the model's.
Served Serve(bool tcp = false, const std::vector<std::string>& extra = {}) {
  Served s;
  // Over TCP the client has no uid of its own: a token that names one lets it share memory.
  const UidToken uid_token = MakeUidToken();
  std::vector<std::string> flags = {"--backend=cpu", "--num_layers=2", "--num_qo_heads=8",
                                    "--num_kv_heads=2", "--head_dim=64", "--dtype=bf16",
                                    "--page_size=16", "--pages_per_device=2048"};
  if (tcp) flags.push_back(uid_token.flag);
  flags.insert(flags.end(), extra.begin(), extra.end());
  auto server = ServerProcess::Start(flags);
  if (!server.ok()) {
    ADD_FAILURE() << server.status();
    return s;
  }
  s.server = *std::move(server);
  client::ClientOptions options;
  if (tcp) options.token = uid_token.token;
  auto c = client::Client::Connect(tcp ? s.server->tcp_target() : s.server->unix_target(), options);
  if (!c.ok()) {
    ADD_FAILURE() << c.status();
    return s;
  }
  s.client = *std::move(c);
  return s;
}

// A few sequences, a few steps, no benchmark: seconds on the CPU backend.
WorkloadOptions ShortWorkload() {
  WorkloadOptions options;
  options.sequences = 5;
  options.steps = 6;
  options.max_prompt = 80;
  options.prefill_chunk = 32;
  options.prefill_tokens = 96;
  options.bench_batch = 0;
  options.seed = Seed();
  return options;
}

// Why a run did not pass, for assertion messages.
std::string Why(const WorkloadResult& result) {
  return absl::StrCat("seed ", result.seed, ": ", result.status.ToString(), "; ",
                      result.failures.size(),
                      " failed checks: ", absl::StrJoin(result.failures, "; "));
}

TEST(Workload, AShortWorkloadOverTheUnixSocketPassesEveryCheck) {
  Served s = Serve();
  ASSERT_NE(s.client, nullptr);
  const WorkloadResult result = RunWorkload(*s.client, ShortWorkload());
  EXPECT_TRUE(result.passed()) << Why(result);
  EXPECT_GT(result.checks.outputs, 0);
  EXPECT_GT(result.checks.lse, 0);
}

TEST(Workload, AShortWorkloadOverTcpPassesEveryCheck) {
  Served s = Serve(/*tcp=*/true);
  ASSERT_NE(s.client, nullptr);
  const WorkloadResult result = RunWorkload(*s.client, ShortWorkload());
  EXPECT_TRUE(result.passed()) << Why(result);
  EXPECT_GT(result.checks.outputs, 0);
}

TEST(Workload, EveryKindOfDataCallIsMadeAndEveryAttentionOutputChecked) {
  Served s = Serve();
  ASSERT_NE(s.client, nullptr);
  const WorkloadResult result = RunWorkload(*s.client, ShortWorkload());
  ASSERT_TRUE(result.passed()) << Why(result);
  const Accounting& a = result.accounting;
  EXPECT_GT(a.prefill.count(), 0u);
  EXPECT_GT(a.decode_unary.count(), 0u);
  EXPECT_GT(a.decode_stream.count(), 0u);
  EXPECT_GT(a.append.count(), 0u);  // the imported prompt
  EXPECT_EQ(a.calls, static_cast<int64_t>(a.prefill.count() + a.decode_unary.count() +
                                          a.decode_stream.count() + a.append.count()));
  EXPECT_EQ(result.checks.outputs, static_cast<int64_t>(a.prefill.count() + a.decode_unary.count() +
                                                        a.decode_stream.count()));
  EXPECT_GT(a.tokens, 0);
}

TEST(Workload, TheServerHoldsNoSequenceRegionOrPageOfTheWorkloadAfterIt) {
  Served s = Serve();
  ASSERT_NE(s.client, nullptr);
  ASSERT_TRUE(RunWorkload(*s.client, ShortWorkload()).passed());
  auto sequences = s.client->ListSequences(0);
  ASSERT_TRUE(sequences.ok()) << sequences.status();
  EXPECT_EQ(sequences->sequences_size(), 0);
  auto regions = s.client->ListRegions();
  ASSERT_TRUE(regions.ok()) << regions.status();
  EXPECT_EQ(regions->regions_size(), 0);
  auto info = s.client->GetServerInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->devices(0).free_pages(), info->devices(0).total_pages());
}

TEST(Workload, TheDecodeBenchmarkTimesAndChecksEveryTransport) {
  Served s = Serve();
  ASSERT_NE(s.client, nullptr);
  WorkloadOptions options = ShortWorkload();
  options.bench_batch = 4;
  options.bench_context = 40;
  options.bench_calls = 6;
  const WorkloadResult result = RunWorkload(*s.client, options);
  ASSERT_TRUE(result.passed()) << Why(result);
  ASSERT_TRUE(result.bench.has_value());
  const BenchResult& bench = *result.bench;
  EXPECT_EQ(bench.batch, 4);
  EXPECT_EQ(bench.unary.count(), 6u);
  EXPECT_EQ(bench.stream.count(), 6u);
  // Rounds of `pipeline` calls (one per layer, at least 4) until `calls` are covered.
  EXPECT_EQ(bench.pipeline, 4);
  EXPECT_EQ(bench.rounds.count(), 2u);
  // The workload's own attention calls are checked one by one; the benchmark adds its first
  // unary call, its first stream call and the two layer-0 calls of its first pipelined round.
  const Accounting& a = result.accounting;
  EXPECT_EQ(result.checks.outputs, static_cast<int64_t>(a.prefill.count() + a.decode_unary.count() +
                                                        a.decode_stream.count()) +
                                       4);
}

TEST(Workload, AWorkloadOnAnFp8PoolPassesEveryCheckAgainstWhatThePoolHolds) {
  Served s = Serve(false, {"--kv_cache_dtype=fp8", "--kv_scale_setters=*"});
  ASSERT_NE(s.client, nullptr);
  // Scales other than 1, set before any KV is stored (the workload reads them from the server).
  std::mt19937_64 rng(Seed());
  std::uniform_real_distribution<float> exponent(-6.0f, -1.0f);
  std::vector<float> k(2), v(2);
  for (float& x : k) x = std::exp2(exponent(rng));
  for (float& x : v) x = std::exp2(exponent(rng));
  ASSERT_TRUE(s.client->SetKvScales(0, 0, k, v).ok());
  WorkloadOptions options = ShortWorkload();
  options.bench_batch = 4;
  options.bench_context = 40;
  options.bench_calls = 6;
  const WorkloadResult result = RunWorkload(*s.client, options);
  EXPECT_TRUE(result.passed()) << Why(result);
  EXPECT_GT(result.checks.outputs, 0);
}

// Per-token scales: the workload reads the storage from the server and holds each row as its
// own scale times its codes.
TEST(Workload, AWorkloadOnAPerTokenFp8PoolPassesEveryCheckAgainstWhatThePoolHolds) {
  Served s = Serve(false, {"--kv_cache_dtype=fp8_per_token"});
  ASSERT_NE(s.client, nullptr);
  WorkloadOptions options = ShortWorkload();
  options.bench_batch = 4;
  options.bench_context = 40;
  options.bench_calls = 6;
  const WorkloadResult result = RunWorkload(*s.client, options);
  EXPECT_TRUE(result.passed()) << Why(result);
  EXPECT_GT(result.checks.outputs, 0);
}

TEST(Workload, ADeviceTheServerDoesNotHaveStopsTheRunWithFailedPrecondition) {
  Served s = Serve();
  ASSERT_NE(s.client, nullptr);
  WorkloadOptions options = ShortWorkload();
  options.device = 7;
  const WorkloadResult result = RunWorkload(*s.client, options);
  EXPECT_EQ(result.status.code(), absl::StatusCode::kFailedPrecondition) << result.status;
  EXPECT_TRUE(result.failures.empty()) << Why(result);
  EXPECT_EQ(result.accounting.calls, 0);
}

TEST(Workload, OptionsNoWorkloadCanRunAreRefusedWithInvalidArgumentBeforeAnyCall) {
  // No server behind the target: a refused run never calls it.
  client::ClientOptions no_wait;
  no_wait.connect_timeout = absl::ZeroDuration();
  auto c = client::Client::Connect("unix:///nonexistent/attnd.sock", no_wait);
  ASSERT_TRUE(c.ok()) << c.status();
  WorkloadOptions no_sequences = ShortWorkload();
  no_sequences.sequences = 0;
  EXPECT_EQ(RunWorkload(**c, no_sequences).status.code(), absl::StatusCode::kInvalidArgument);
  WorkloadOptions negative_steps = ShortWorkload();
  negative_steps.steps = -1;
  EXPECT_EQ(RunWorkload(**c, negative_steps).status.code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace attnd::workload
