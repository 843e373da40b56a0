// The CUDA backend through a real attnd process: decode through captured graphs gives the same
// bits as eager launches, a batch padded up to its bucket gives each sequence the bits it gets
// alone (deterministic mode), and a graph captured at start-up (no sequences at all) replays
// correctly once sequences hold 32k tokens. Skips without a GPU.
#include <cuda_runtime_api.h>

#include <cstring>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/tensor.h"
#include "gtest/gtest.h"
#include "testing/harness.h"
#include "testing/server_process.h"

namespace attnd::testing {
namespace {

bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

std::vector<std::string> Flags(bool graphs) {
  return {"--backend=cuda", "--devices=0", "--num_layers=2", "--num_qo_heads=8",
          "--num_kv_heads=2", "--head_dim=64", "--dtype=bf16", "--page_size=16",
          "--pages_per_device=8192", "--max_seq_len=40000",
          absl::StrCat("--cuda_graphs=", graphs ? "true" : "false")};
}

struct Served {
  std::unique_ptr<ServerProcess> server;
  std::unique_ptr<client::Client> client;
  std::unique_ptr<Harness> harness;
};

Served Serve(bool graphs, uint64_t seed) {
  Served s;
  auto server = ServerProcess::Start(Flags(graphs));
  EXPECT_TRUE(server.ok()) << server.status();
  if (!server.ok()) return s;
  s.server = *std::move(server);
  s.client = *client::Client::Connect(s.server->unix_target());
  auto h = Harness::Create(s.client.get(), "h", 0, 4096, seed);
  EXPECT_TRUE(h.ok()) << h.status();
  s.harness = *std::move(h);
  return s;
}

uint64_t OutBytes(uint64_t tokens) { return tokens * 8 * 64 * 2; }

TEST(CudaServerTest, GraphReplayGivesTheBitsOfEagerLaunches) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  Served graph = Serve(true, seed), eager = Serve(false, seed);
  ASSERT_NE(graph.harness, nullptr);
  ASSERT_NE(eager.harness, nullptr);
  const std::vector<Item> prompts = {{1, 33}, {2, 1}, {3, 700}};
  for (Served* s : {&graph, &eager}) {
    for (const Item& p : prompts) ASSERT_TRUE(s->harness->CreateSequence(p.seq_id).ok());
    for (uint32_t layer = 0; layer < 2; ++layer)
      ASSERT_TRUE(s->harness->Attend(layer, prompts, /*decode=*/false).ok());
  }
  for (int step = 0; step < 5; ++step) {
    for (uint32_t layer = 0; layer < 2; ++layer) {
      for (Served* s : {&graph, &eager}) {
        v1::AttentionRequest req = s->harness->BuildAttention(layer, {{1, 1}, {2, 1}, {3, 1}}, true);
        req.set_deterministic(true);
        ASSERT_TRUE(s->harness->RunAttention(req, /*decode=*/true).ok());
      }
      ASSERT_EQ(std::memcmp(graph.harness->bytes() + graph.harness->out_offset(),
                            eager.harness->bytes() + eager.harness->out_offset(), OutBytes(3)),
                0)
          << "step " << step << " layer " << layer;
    }
  }
  auto info = graph.client->GetServerInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_GT(info->graph_buckets_size(), 0);
}

TEST(CudaServerTest, ABatchOfThreePaddedToFourGivesEachSequenceItsBitsAlone) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  // Same seed: both regions hold the same inputs; one server runs the batch, the other each
  // sequence alone, reading the same rows.
  Served batched = Serve(true, seed), alone = Serve(true, seed);
  ASSERT_NE(batched.harness, nullptr);
  ASSERT_NE(alone.harness, nullptr);
  const std::vector<Item> prompts = {{1, 100}, {2, 2000}, {3, 17}};
  for (Served* s : {&batched, &alone}) {
    for (const Item& p : prompts) ASSERT_TRUE(s->harness->CreateSequence(p.seq_id).ok());
    for (uint32_t layer = 0; layer < 2; ++layer)
      ASSERT_TRUE(s->harness->Attend(layer, prompts, false).ok());
  }
  const uint64_t q_row = 8 * 64 * 2, kv_row = 2 * 64 * 2;
  for (uint32_t layer = 0; layer < 2; ++layer) {
    v1::AttentionRequest b = batched.harness->BuildAttention(layer, {{1, 1}, {2, 1}, {3, 1}}, false);
    v1::AttentionRequest a = alone.harness->BuildAttention(layer, {{1, 1}, {2, 1}, {3, 1}}, false);
    b.set_deterministic(true);
    ASSERT_TRUE(batched.client->Decode(b).ok());
    for (int i = 0; i < 3; ++i) {
      v1::AttentionRequest one;
      one.set_layer(layer);
      one.set_deterministic(true);
      auto* item = one.add_items();
      item->set_seq_id(static_cast<uint64_t>(i + 1));
      item->set_num_new_tokens(1);
      auto row = [&](const v1::TensorRef& ref, uint64_t bytes) {
        v1::TensorRef r = ref;
        r.set_offset(ref.offset() + static_cast<uint64_t>(i) * bytes);
        r.set_shape(0, 1);
        return r;
      };
      *one.mutable_q() = row(a.q(), q_row);
      *one.mutable_k_new() = row(a.k_new(), kv_row);
      *one.mutable_v_new() = row(a.v_new(), kv_row);
      *one.mutable_out() = row(a.out(), q_row);
      const auto r = alone.client->Decode(one);
      ASSERT_TRUE(r.ok()) << r.status();
    }
    ASSERT_EQ(std::memcmp(batched.harness->bytes() + batched.harness->out_offset(),
                          alone.harness->bytes() + alone.harness->out_offset(), OutBytes(3)),
              0)
        << "layer " << layer;
  }
}

// Deterministic mode: a single-token item of a Prefill call gets the same bits whether or not
// a long chunk shares the call (both run the prefill kernel; without care an all-decode Prefill
// call would take the decode kernel, which sums in another order).
TEST(CudaServerTest, DeterministicPrefillCallGivesADecodeItemItsBitsWithOrWithoutAChunk) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  Served s = Serve(true, seed);
  ASSERT_NE(s.harness, nullptr);
  Harness& h = *s.harness;
  const std::vector<Item> prompts = {{1, 2000}, {2, 600}};
  for (const Item& p : prompts) ASSERT_TRUE(h.CreateSequence(p.seq_id).ok());
  for (uint32_t layer = 0; layer < 2; ++layer) ASSERT_TRUE(h.Attend(layer, prompts, false).ok());
  const uint64_t q_row = 8 * 64 * 2, kv_row = 2 * 64 * 2;
  auto* region = static_cast<uint8_t*>(h.buffer().data());
  // Row 0 (sequence 1's token) of the call with the chunk, kept to replay it alone.
  v1::AttentionRequest with_chunk = h.BuildAttention(0, {{1, 1}, {2, 300}}, false);
  with_chunk.set_deterministic(true);
  const std::vector<uint8_t> q(region + h.q_offset(), region + h.q_offset() + q_row);
  const std::vector<uint8_t> k(region + h.k_offset(), region + h.k_offset() + kv_row);
  const std::vector<uint8_t> v(region + h.v_offset(), region + h.v_offset() + kv_row);
  auto put_row0 = [&] {
    std::memcpy(region + h.q_offset(), q.data(), q_row);
    std::memcpy(region + h.k_offset(), k.data(), kv_row);
    std::memcpy(region + h.v_offset(), v.data(), kv_row);
  };
  v1::AttentionRequest alone = h.BuildAttention(0, {{1, 1}}, false);
  alone.set_deterministic(true);
  put_row0();
  auto r = s.client->Prefill(alone);
  ASSERT_TRUE(r.ok()) << r.status();
  const std::vector<uint8_t> out_alone(region + h.out_offset(), region + h.out_offset() + q_row);
  // Back to 2000 tokens, then the same token beside a 300-token chunk.
  ASSERT_TRUE(s.client->TruncateSequence(0, 1, 2000).ok());
  with_chunk = h.BuildAttention(0, {{1, 1}, {2, 300}}, false);
  with_chunk.set_deterministic(true);
  put_row0();
  r = s.client->Prefill(with_chunk);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(std::memcmp(region + h.out_offset(), out_alone.data(), q_row), 0);
}

TEST(CudaServerTest, AGraphCapturedAtStartUpReplaysCorrectlyAt32kTokens) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  Served s = Serve(true, seed);
  ASSERT_NE(s.harness, nullptr);
  Harness& h = *s.harness;
  ASSERT_TRUE(h.CreateSequence(1).ok());
  ASSERT_TRUE(h.CreateSequence(2).ok());
  for (uint32_t layer = 0; layer < 2; ++layer) {
    // 16 tokens, decoded through the graph.
    ASSERT_TRUE(h.RunAppend(h.BuildAppend(layer, {{1, 16}, {2, 15}})).ok());
    ASSERT_TRUE(h.Attend(layer, {{1, 1}, {2, 1}}, true, true).ok());
  }
  // Grow both past 32k tokens through Append, then decode through the same graph.
  for (int chunk = 0; chunk < 16; ++chunk)
    for (uint32_t layer = 0; layer < 2; ++layer)
      ASSERT_TRUE(h.RunAppend(h.BuildAppend(layer, {{1, 2048}, {2, 2048}})).ok());
  for (uint32_t layer = 0; layer < 2; ++layer) {
    const absl::Status st = h.Attend(layer, {{1, 1}, {2, 1}}, true, true);
    ASSERT_TRUE(st.ok()) << st;
  }
  EXPECT_EQ(h.HistoryLength(1, 0), 16u + 1 + 16 * 2048 + 1);
}

// Invariant 6: a sticky device error marks the device NOT_SERVING, is logged with the request,
// and the device takes no more work (UNAVAILABLE) instead of answering with garbage.
TEST(CudaServerTest, AStickyDeviceErrorStopsTheDeviceAndFlipsHealth) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  std::vector<std::string> flags = Flags(true);
  flags.push_back("--debug_fault_layer=1");
  auto server = ServerProcess::Start(flags);
  ASSERT_TRUE(server.ok()) << server.status();
  auto c = *client::Client::Connect((*server)->unix_target());
  auto h = Harness::Create(c.get(), "h", 0, 64, std::random_device{}());
  ASSERT_TRUE(h.ok()) << h.status();
  ASSERT_TRUE((*h)->CreateSequence(1).ok());
  ASSERT_TRUE((*h)->Attend(0, {{1, 5}}, false).ok());  // layer 0 works
  const absl::Status fault = (*h)->Attend(1, {{1, 5}}, false);
  EXPECT_EQ(fault.code(), absl::StatusCode::kInternal) << fault;
  for (const char* name : {"", "attnd.v1.Attention", "attnd.v1.Attention/device/0"}) {
    auto status = c->Health(name);
    ASSERT_TRUE(status.ok()) << name;
    EXPECT_EQ(*status, grpc::health::v1::HealthCheckResponse::NOT_SERVING) << name;
  }
  const absl::Status after = (*h)->Attend(0, {{1, 1}}, true);
  EXPECT_EQ(after.code(), absl::StatusCode::kUnavailable) << after;
  auto info = c->GetServerInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_FALSE(info->devices(0).serving());
  h->reset();
  c.reset();
  const std::string log = (*server)->Log();
  EXPECT_NE(log.find("fault, no more work is taken"), std::string::npos) << log;
  EXPECT_NE(log.find("Prefill layer=1 items=1"), std::string::npos) << log;
  EXPECT_EQ((*server)->Terminate(), 0) << (*server)->Log();
}

}  // namespace
}  // namespace attnd::testing
