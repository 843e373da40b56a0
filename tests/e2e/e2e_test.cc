// End-to-end behaviour of a real attnd process driven by the real client: correctness over both
// transports and the stream, sequence operations, health, reflection, metrics, unregistering
// under load, clients that vanish mid-stream, several devices at once, and draining on SIGTERM.
#include <atomic>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/tensor.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "gtest/gtest.h"
#include "testing/harness.h"
#include "testing/server_process.h"
#include "testing/stage_metrics.h"

namespace attnd::testing {
namespace {

uint64_t Seed() {
  static const uint64_t seed = std::random_device{}();
  return seed;
}

std::vector<std::string> ModelFlags(std::string dtype = "bf16", std::string layout = "NHD") {
  return {"--backend=cpu", "--num_layers=2", "--num_qo_heads=8", "--num_kv_heads=2",
          "--head_dim=64", "--dtype=" + dtype, "--kv_layout=" + layout, "--page_size=16",
          "--pages_per_device=2048"};
}

struct Served {
  std::unique_ptr<ServerProcess> server;
  std::unique_ptr<client::Client> client;
  std::unique_ptr<Harness> harness;
};

Served Serve(std::vector<std::string> flags, bool tcp = false, uint32_t device = 0,
             uint64_t max_tokens = 4096) {
  Served s;
  // Over TCP the client has no uid of its own: a token that names one lets it share memory.
  const UidToken uid_token = MakeUidToken();
  if (tcp) flags.push_back(uid_token.flag);
  auto server = ServerProcess::Start(std::move(flags));
  EXPECT_TRUE(server.ok()) << server.status();
  if (!server.ok()) return s;
  s.server = *std::move(server);
  client::ClientOptions options;
  if (tcp) options.token = uid_token.token;
  auto c = client::Client::Connect(tcp ? s.server->tcp_target() : s.server->unix_target(), options);
  EXPECT_TRUE(c.ok()) << c.status();
  s.client = *std::move(c);
  auto h = Harness::Create(s.client.get(), "main", device, max_tokens, Seed());
  EXPECT_TRUE(h.ok()) << h.status();
  s.harness = *std::move(h);
  return s;
}

// Prompts of lengths 1, page-1, page+1, 100 and 300, prefilled on every layer, then decode steps.
void RunPrefillThenDecode(Harness& h, int steps, Path path = Path::kUnary,
                          client::DataStream* stream = nullptr) {
  const std::vector<Item> prompts = {{1, 1}, {2, 15}, {3, 17}, {4, 100}, {5, 300}};
  for (const Item& p : prompts) ASSERT_TRUE(h.CreateSequence(p.seq_id).ok());
  for (uint32_t layer = 0; layer < 2; ++layer) {
    const absl::Status s = h.Attend(layer, prompts, /*decode=*/false, /*with_lse=*/true, path, stream);
    ASSERT_TRUE(s.ok()) << s;
  }
  for (int step = 0; step < steps; ++step) {
    for (uint32_t layer = 0; layer < 2; ++layer) {
      const absl::Status s = h.Attend(layer, {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}},
                                      /*decode=*/true, step % 2 == 0, path, stream);
      ASSERT_TRUE(s.ok()) << "step " << step << " layer " << layer << ": " << s;
    }
  }
}

TEST(EndToEnd, PrefillAndDecodeMatchTheReferenceOverTheUnixSocket) {
  SCOPED_TRACE(absl::StrCat("seed ", Seed()));
  Served s = Serve(ModelFlags());
  ASSERT_NE(s.harness, nullptr);
  RunPrefillThenDecode(*s.harness, 6);
  // Unregister while the server is up, and hang up: gRPC's shutdown waits for connected
  // clients to leave after its GOAWAY (about 5 s for an idle C++ channel).
  s.harness.reset();
  s.client.reset();
  EXPECT_EQ(s.server->Terminate(), 0) << s.server->Log();
}

TEST(EndToEnd, PrefillAndDecodeMatchTheReferenceOverTcp) {
  SCOPED_TRACE(absl::StrCat("seed ", Seed()));
  Served s = Serve(ModelFlags(), /*tcp=*/true);
  ASSERT_NE(s.harness, nullptr);
  RunPrefillThenDecode(*s.harness, 6);
}

TEST(EndToEnd, Fp16HndPoolMatchesTheReference) {
  SCOPED_TRACE(absl::StrCat("seed ", Seed()));
  Served s = Serve(ModelFlags("fp16", "HND"));
  ASSERT_NE(s.harness, nullptr);
  RunPrefillThenDecode(*s.harness, 3);
}

TEST(EndToEnd, SoftCapAndSlidingWindowMatchTheReference) {
  SCOPED_TRACE(absl::StrCat("seed ", Seed()));
  // fp32 on the CPU (its tightest tolerance); the CUDA kernels serve 16-bit types only.
  std::vector<std::string> flags = ModelFlags(E2eBackend() == "cuda" ? "bf16" : "fp32");
  flags.push_back("--logits_soft_cap=5");
  flags.push_back("--window_left=37");
  Served s = Serve(flags);
  ASSERT_NE(s.harness, nullptr);
  RunPrefillThenDecode(*s.harness, 3);
}

TEST(EndToEnd, StreamCarriesPrefillAndDecodeWithTheSameResults) {
  SCOPED_TRACE(absl::StrCat("seed ", Seed()));
  Served s = Serve(ModelFlags());
  ASSERT_NE(s.harness, nullptr);
  auto stream = s.client->OpenStream();
  ASSERT_TRUE(stream.ok()) << stream.status();
  RunPrefillThenDecode(*s.harness, 4, Path::kStream, stream->get());
  // An error answers that one request and leaves the stream open.
  v1::AttentionRequest bad = s.harness->BuildAttention(0, {{404, 1}}, false);
  auto r = (*stream)->Decode(bad);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
  EXPECT_TRUE(s.harness->Attend(0, {{1, 1}}, true, false, Path::kStream, stream->get()).ok());
  EXPECT_TRUE((*stream)->Close().ok());
}

TEST(EndToEnd, PipelinedStreamRequestsAreAnsweredInOrder) {
  Served s = Serve(ModelFlags());
  ASSERT_NE(s.harness, nullptr);
  for (uint64_t id = 1; id <= 4; ++id) ASSERT_TRUE(s.harness->CreateSequence(id).ok());
  auto stream = s.client->OpenStream();
  ASSERT_TRUE(stream.ok());
  // Appends only write K/V, so several can be in flight; the last one names a missing sequence.
  std::vector<uint64_t> tags;
  for (uint64_t id = 1; id <= 5; ++id) {
    auto tag = (*stream)->SendAppend(s.harness->BuildAppend(0, {{id, 3}}));
    ASSERT_TRUE(tag.ok());
    tags.push_back(*tag);
  }
  for (uint64_t i = 0; i < tags.size(); ++i) {
    auto resp = (*stream)->Receive();
    ASSERT_TRUE(resp.ok()) << resp.status();
    EXPECT_EQ(resp->tag(), tags[i]);
    EXPECT_EQ(client::StreamResponseStatus(*resp).code(),
              i < 4 ? absl::StatusCode::kOk : absl::StatusCode::kNotFound);
  }
  EXPECT_TRUE((*stream)->Close().ok());
}

TEST(EndToEnd, ForkedSequencesDivergeAndTruncateRollsBack) {
  SCOPED_TRACE(absl::StrCat("seed ", Seed()));
  Served s = Serve(ModelFlags());
  ASSERT_NE(s.harness, nullptr);
  Harness& h = *s.harness;
  ASSERT_TRUE(h.CreateSequence(1).ok());
  for (uint32_t layer = 0; layer < 2; ++layer) ASSERT_TRUE(h.Attend(layer, {{1, 40}}, false).ok());
  auto child = s.client->ForkSequence(0, 1, 2);
  ASSERT_TRUE(child.ok()) << child.status();
  h.ForkHistory(1, 2);
  EXPECT_EQ(child->shared_pages(), 3u);  // 40 tokens in pages of 16
  // Both continue differently through the shared partial page, in one batch and apart.
  for (int step = 0; step < 3; ++step) {
    for (uint32_t layer = 0; layer < 2; ++layer) {
      ASSERT_TRUE(h.Attend(layer, {{1, 1}, {2, 1}}, true).ok());
      ASSERT_TRUE(h.Attend(layer, {{2, 1}}, true).ok());
    }
  }
  auto truncated = s.client->TruncateSequence(0, 2, 20);
  ASSERT_TRUE(truncated.ok());
  h.TruncateHistory(2, 20);
  EXPECT_EQ(truncated->layer_lengths(0), 20u);
  EXPECT_EQ(truncated->num_pages(), 2u);
  for (uint32_t layer = 0; layer < 2; ++layer) ASSERT_TRUE(h.Attend(layer, {{2, 1}, {1, 1}}, true).ok());
  // Releasing the parent keeps the pages the child still shares.
  ASSERT_TRUE(s.client->ReleaseSequence(0, 1).ok());
  for (uint32_t layer = 0; layer < 2; ++layer) ASSERT_TRUE(h.Attend(layer, {{2, 1}}, true).ok());
}

TEST(EndToEnd, AppendOnlyImportThenDecodeSeesTheImportedKv) {
  SCOPED_TRACE(absl::StrCat("seed ", Seed()));
  Served s = Serve(ModelFlags());
  ASSERT_NE(s.harness, nullptr);
  Harness& h = *s.harness;
  ASSERT_TRUE(h.CreateSequence(9).ok());
  for (uint32_t layer = 0; layer < 2; ++layer) {
    const absl::Status st = h.RunAppend(h.BuildAppend(layer, {{9, 77}}));
    ASSERT_TRUE(st.ok()) << st;
  }
  for (uint32_t layer = 0; layer < 2; ++layer) ASSERT_TRUE(h.Attend(layer, {{9, 1}}, true, true).ok());
}

TEST(EndToEnd, ExportedHeadRangesImportIntoAnotherSequenceUnchanged) {
  Served s = Serve(ModelFlags());
  ASSERT_NE(s.harness, nullptr);
  Harness& h = *s.harness;
  ASSERT_TRUE(h.CreateSequence(1).ok());
  ASSERT_TRUE(h.CreateSequence(2).ok());
  for (uint32_t layer = 0; layer < 2; ++layer) ASSERT_TRUE(h.Attend(layer, {{1, 21}}, false).ok());
  // A second region holds two transfer buffers: one per kv head, as two TP-2 shards would.
  const uint64_t shard_bytes = 2 * 2 * 21 * 1 * 64 * 2;
  auto buf = client::SharedMemoryBuffer::Create(client::SharedMemoryBuffer::UniqueKey("xfer"),
                                                4 * shard_bytes);
  ASSERT_TRUE(buf.ok());
  ASSERT_TRUE(s.client->RegisterHostRegion("xfer", (*buf)->key(), 0, 4 * shard_bytes).ok());
  auto transfer = [&](bool import, uint64_t seq, uint32_t head, uint64_t offset) {
    const v1::TensorRef ref =
        client::MakeTensorRef("xfer", offset, v1::DTYPE_BFLOAT16, {2, 2, 21, 1, 64});
    if (import) {
      v1::ImportKvRequest r;
      r.set_seq_id(seq); r.set_layer_end(2); r.set_head_begin(head); r.set_head_end(head + 1);
      r.set_num_tokens(21);
      *r.mutable_src() = ref;
      return s.client->ImportKv(r).status();
    }
    v1::ExportKvRequest r;
    r.set_seq_id(seq); r.set_layer_end(2); r.set_head_begin(head); r.set_head_end(head + 1);
    r.set_num_tokens(21);
    *r.mutable_dst() = ref;
    return s.client->ExportKv(r).status();
  };
  std::memset((*buf)->data(), 0xff, 4 * shard_bytes);
  for (uint32_t head = 0; head < 2; ++head) ASSERT_TRUE(transfer(false, 1, head, head * shard_bytes).ok());
  for (uint32_t head = 0; head < 2; ++head) ASSERT_TRUE(transfer(true, 2, head, head * shard_bytes).ok());
  for (uint32_t head = 0; head < 2; ++head) ASSERT_TRUE(transfer(false, 2, head, (2 + head) * shard_bytes).ok());
  const auto* bytes = static_cast<const uint8_t*>((*buf)->data());
  EXPECT_EQ(std::memcmp(bytes, bytes + 2 * shard_bytes, 2 * shard_bytes), 0);
  auto info = s.client->GetSequence(0, 2);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->layer_lengths(0), 21u);
  EXPECT_EQ(info->layer_lengths(1), 21u);
  // The imported sequence decodes like the original.
  for (uint32_t layer = 0; layer < 2; ++layer) {
    h.SetHistory(2, layer, h.HistoryK(1, layer), h.HistoryV(1, layer));
    ASSERT_TRUE(h.Attend(layer, {{2, 1}}, true).ok());
  }
  ASSERT_TRUE(s.client->UnregisterRegion("xfer").ok());
}

TEST(EndToEnd, ReflectionListsTheAttentionAndHealthServices) {
  Served s = Serve(ModelFlags());
  ASSERT_NE(s.server, nullptr);
  auto channel = grpc::CreateChannel(s.server->unix_target(), grpc::InsecureChannelCredentials());
  auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub(channel);
  grpc::ClientContext ctx;
  auto stream = stub->ServerReflectionInfo(&ctx);
  grpc::reflection::v1alpha::ServerReflectionRequest req;
  req.set_list_services("");
  ASSERT_TRUE(stream->Write(req));
  grpc::reflection::v1alpha::ServerReflectionResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  std::vector<std::string> names;
  for (const auto& svc : resp.list_services_response().service()) names.push_back(svc.name());
  EXPECT_NE(std::find(names.begin(), names.end(), "attnd.v1.Attention"), names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "grpc.health.v1.Health"), names.end());
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST(EndToEnd, HealthReportsTheServerTheServiceAndEachDevice) {
  if (E2eBackend() == "cuda" && E2eCudaDevices() < 2) GTEST_SKIP() << "one CUDA device";
  std::vector<std::string> flags = ModelFlags();
  flags.push_back("--devices=0,1");
  Served s = Serve(flags);
  ASSERT_NE(s.client, nullptr);
  for (const char* name : {"", "attnd.v1.Attention", "attnd.v1.Attention/device/0",
                           "attnd.v1.Attention/device/1"}) {
    auto status = s.client->Health(name);
    ASSERT_TRUE(status.ok()) << name << ": " << status.status();
    EXPECT_EQ(*status, grpc::health::v1::HealthCheckResponse::SERVING) << name;
  }
  EXPECT_EQ(s.client->Health("attnd.v1.Attention/device/2").status().code(),
            absl::StatusCode::kNotFound);
}

double MetricValue(const std::string& text, const std::string& series) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::StartsWith(line, series + " ")) {
      double v = 0;
      if (absl::SimpleAtod(line.substr(series.size() + 1), &v)) return v;
    }
  }
  return -1;
}

TEST(EndToEnd, MetricsCountRequestsPagesSequencesTokensAndBatchSizes) {
  std::vector<std::string> flags = ModelFlags();
  flags.push_back("--metrics_port=auto");
  Served s = Serve(flags);
  ASSERT_NE(s.harness, nullptr);
  RunPrefillThenDecode(*s.harness, 2);
  (void)s.client->Decode(s.harness->BuildAttention(0, {{77, 1}}, false));  // NOT_FOUND
  auto text = HttpGet(s.server->metrics_port(), "/metrics");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(MetricValue(*text, R"(attnd_requests_total{code="OK",rpc="Decode"})"), 4);
  EXPECT_EQ(MetricValue(*text, R"(attnd_requests_total{code="NOT_FOUND",rpc="Decode"})"), 1);
  EXPECT_EQ(MetricValue(*text, R"(attnd_requests_total{code="OK",rpc="Prefill"})"), 2);
  EXPECT_EQ(MetricValue(*text, R"(attnd_live_sequences{device="0"})"), 5);
  EXPECT_EQ(MetricValue(*text, R"(attnd_pages_total{device="0"})"), 2048);
  // 1 + 1 + 2 + 7 + 19 pages for prompts of 1, 15, 17, 100, 300 (+2 decode tokens each).
  EXPECT_EQ(MetricValue(*text, R"(attnd_pages_used{device="0"})"), 1 + 2 + 2 + 7 + 19);
  EXPECT_EQ(MetricValue(*text, R"(attnd_tokens_appended_total{device="0"})"),
            2 * (433 + 2 * 5));
  EXPECT_EQ(MetricValue(*text, R"(attnd_batch_size_count{rpc="Decode"})"), 5);
  EXPECT_GT(MetricValue(*text, R"(attnd_request_duration_seconds_sum{code="OK",rpc="Decode"})"), 0);
  // GetStats reports the same counts.
  auto stats = s.client->GetStats();
  ASSERT_TRUE(stats.ok());
  bool found = false;
  for (const v1::RpcStats& r : stats->rpcs()) {
    if (r.rpc() == "Decode" && r.code() == "OK") {
      EXPECT_EQ(r.count(), 4u);
      found = true;
    }
  }
  EXPECT_TRUE(found);
  EXPECT_EQ(stats->devices(0).tokens_appended(), 2u * (433 + 2 * 5));
}

TEST(EndToEnd, StageMetricsAccountForEveryRequestThatReachedADeviceWorker) {
  std::vector<std::string> flags = ModelFlags();
  flags.push_back("--metrics_port=auto");
  Served s = Serve(flags);
  ASSERT_NE(s.harness, nullptr);
  Harness& h = *s.harness;
  RunPrefillThenDecode(h, 2);  // 2 Prefill + 4 Decode calls, unary
  auto stream = s.client->OpenStream();
  ASSERT_TRUE(stream.ok());
  for (int i = 0; i < 3; ++i)
    ASSERT_TRUE(h.Attend(0, {{1, 1}}, true, false, Path::kStream, stream->get()).ok());
  // Refused on the worker (unknown sequence): timed. Refused up front (no items): not.
  v1::AttentionRequest unknown = h.BuildAttention(0, {{77, 1}}, false);
  EXPECT_EQ((*stream)->Decode(unknown).status().code(), absl::StatusCode::kNotFound);
  v1::AttentionRequest empty = unknown;
  empty.clear_items();
  EXPECT_EQ((*stream)->Decode(empty).status().code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE((*stream)->Close().ok());

  auto stages = ReadStageHistograms(s.server->metrics_port());
  ASSERT_TRUE(stages.ok()) << stages.status();
  auto count = [&](const std::string& rpc, const std::string& stage) {
    auto it = stages->find({rpc, stage});
    return it == stages->end() ? -1.0 : it->second.count;
  };
  for (const char* stage : {"validate", "queue", "host", "device", "reply", "total"}) {
    SCOPED_TRACE(stage);
    EXPECT_EQ(count("Prefill", stage), 2);
    EXPECT_EQ(count("Decode", stage), 4);
    EXPECT_EQ(count("Stream.Decode", stage), 4);  // 3 served + 1 refused on the worker
  }
  EXPECT_LE(count("Decode", "write"), 0);  // unary calls have no Stream write
  EXPECT_EQ(count("Stream.Decode", "write"), 4);
  // The stages between receipt and reply tile the total exactly, request by request.
  for (const char* rpc : {"Prefill", "Decode", "Stream.Decode"}) {
    SCOPED_TRACE(rpc);
    double parts = 0;
    for (const char* stage : {"validate", "queue", "host", "device", "reply"})
      parts += stages->at({rpc, stage}).sum;
    const double total = stages->at({rpc, "total"}).sum;
    EXPECT_GT(total, 0);
    EXPECT_NEAR(parts, total, 1e-6 * total + 1e-9);
    EXPECT_GT(Quantile(stages->at({rpc, "total"}), 0.5), 0);
  }
}

TEST(EndToEnd, UnregisteringARegionInUseLetsEveryRequestFinishCleanly) {
  Served s = Serve(ModelFlags());
  ASSERT_NE(s.harness, nullptr);
  Harness& h = *s.harness;
  ASSERT_TRUE(h.CreateSequence(1).ok());
  // A long prefill is in flight while the region is unregistered: it either finished with the
  // region still mapped (OK) or never found it (NOT_FOUND); never a crash or garbage.
  v1::AttentionRequest req = h.BuildAttention(0, {{1, 2000}}, false);
  std::atomic<int> code{-1};
  std::thread caller([&] { code = static_cast<int>(s.client->Prefill(req).status().code()); });
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_TRUE(s.client->UnregisterRegion(h.region()).ok());
  caller.join();
  EXPECT_TRUE(code == 0 || code == static_cast<int>(absl::StatusCode::kNotFound)) << code;
  auto seq = s.client->GetSequence(0, 1);
  ASSERT_TRUE(seq.ok());
  EXPECT_EQ(seq->layer_lengths(0), code == 0 ? 2000u : 0u);
  auto regions = s.client->ListRegions();
  ASSERT_TRUE(regions.ok());
  EXPECT_EQ(regions->regions_size(), 0);
  EXPECT_EQ(s.client->Decode(h.BuildAttention(0, {{1, 1}}, false)).status().code(),
            absl::StatusCode::kNotFound);
  // Unregister while the server is up, and hang up: gRPC's shutdown waits for connected
  // clients to leave after its GOAWAY (about 5 s for an idle C++ channel).
  s.harness.reset();
  s.client.reset();
  EXPECT_EQ(s.server->Terminate(), 0) << s.server->Log();
}

TEST(EndToEnd, AClientVanishingMidStreamLeavesEverySequenceWholeAndTheServerServing) {
  Served s = Serve(ModelFlags());
  ASSERT_NE(s.harness, nullptr);
  Harness& h = *s.harness;
  for (uint64_t id = 1; id <= 8; ++id) ASSERT_TRUE(h.CreateSequence(id).ok());
  {
    auto stream = s.client->OpenStream();
    ASSERT_TRUE(stream.ok());
    for (uint64_t id = 1; id <= 8; ++id)
      ASSERT_TRUE((*stream)->SendAppend(h.BuildAppend(0, {{id, 500}})).ok());
    // Destroyed without Close: the client cancels the call with requests in flight.
  }
  // Each append happened entirely or not at all.
  for (uint64_t id = 1; id <= 8; ++id) {
    auto seq = s.client->GetSequence(0, id);
    ASSERT_TRUE(seq.ok());
    EXPECT_TRUE(seq->layer_lengths(0) == 0 || seq->layer_lengths(0) == 500) << seq->layer_lengths(0);
    EXPECT_EQ(seq->num_pages(), (seq->layer_lengths(0) + 15) / 16);
  }
  auto health = s.client->Health("");
  ASSERT_TRUE(health.ok());
  EXPECT_EQ(*health, grpc::health::v1::HealthCheckResponse::SERVING);
  ASSERT_TRUE(h.CreateSequence(100).ok());
  EXPECT_TRUE(h.Attend(0, {{100, 5}}, false).ok());
  // Unregister while the server is up, and hang up: gRPC's shutdown waits for connected
  // clients to leave after its GOAWAY (about 5 s for an idle C++ channel).
  s.harness.reset();
  s.client.reset();
  EXPECT_EQ(s.server->Terminate(), 0) << s.server->Log();
}

TEST(EndToEnd, TwoDevicesServeTwoClientThreadsAtOnce) {
  SCOPED_TRACE(absl::StrCat("seed ", Seed()));
  if (E2eBackend() == "cuda" && E2eCudaDevices() < 2) GTEST_SKIP() << "one CUDA device";
  std::vector<std::string> flags = ModelFlags();
  flags.push_back("--devices=0,1");
  Served s = Serve(flags);
  ASSERT_NE(s.harness, nullptr);
  auto h1 = Harness::Create(s.client.get(), "device1", 1, 4096, Seed() + 1);
  ASSERT_TRUE(h1.ok());
  std::thread t0([&] { RunPrefillThenDecode(*s.harness, 3); });
  std::thread t1([&] { RunPrefillThenDecode(**h1, 3); });
  t0.join();
  t1.join();
  auto info = s.client->GetServerInfo();
  ASSERT_TRUE(info.ok());
  ASSERT_EQ(info->devices_size(), 2);
  EXPECT_EQ(info->devices(0).live_sequences(), 5u);
  EXPECT_EQ(info->devices(1).live_sequences(), 5u);
  // Sequence ids are per device: 1 exists on both; releasing on one leaves the other.
  ASSERT_TRUE(s.client->ReleaseSequence(1, 1).ok());
  EXPECT_TRUE(s.client->GetSequence(0, 1).ok());
  EXPECT_EQ(s.client->GetSequence(1, 1).status().code(), absl::StatusCode::kNotFound);
}

TEST(EndToEnd, SigtermDrainsInFlightCallsThenExitsZero) {
  Served s = Serve(ModelFlags());
  ASSERT_NE(s.harness, nullptr);
  Harness& h = *s.harness;
  ASSERT_TRUE(h.CreateSequence(1).ok());
  v1::AttentionRequest req = h.BuildAttention(0, {{1, 4000}}, false);
  absl::Status result;
  std::thread caller([&] { result = s.client->Prefill(req).status(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(s.server->Terminate(), 0) << s.server->Log();
  caller.join();
  // The call was accepted before the signal, so it completes; after it the server is gone.
  EXPECT_TRUE(result.ok()) << result;
  EXPECT_NE(s.server->Log().find("draining"), std::string::npos);
  EXPECT_FALSE(s.client->GetServerInfo().ok());
}

}  // namespace
}  // namespace attnd::testing
