// KV transfer between two (or three) real attnd processes over UCX on loopback (ctest runs this
// suite twice: UCX_TLS=tcp and UCX_TLS=sm,self): a source grants a sequence, destinations pull
// all of it or a head range, and what arrives is compared byte for byte with the source's pages
// (ExportKv on both sides) and by decoding on both sides with the same inputs. fp8 pools move
// their bytes raw too, so a pull needs the same storage and, for fp8 with per-layer scales, the
// same scales; per-token scales travel with their rows.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/shm_buffer.h"
#include "client/tensor.h"
#include "gtest/gtest.h"
#include "testing/harness.h"
#include "testing/server_process.h"

namespace attnd::testing {
namespace {

constexpr uint32_t kLayers = 2;
constexpr uint32_t kHeadDim = 64;
constexpr uint32_t kPage = 16;

uint64_t Seed() {
  static const uint64_t seed = std::random_device{}();
  return seed;
}

// A model of `kv` kv heads and 2 query heads per kv head; every node may pull from any
// source, and lets this uid (the other attnd processes of the test) pull its grants.
// The device destinations serve (ATTND_E2E_KV_DST_DEVICE, 0): 1 on a two-GPU host moves KV
// between GPUs; sources serve device 0.
uint32_t DstDevice() {
  const char* d = getenv("ATTND_E2E_KV_DST_DEVICE");
  return d == nullptr ? 0 : static_cast<uint32_t>(atoi(d));
}

std::vector<std::string> NodeFlags(uint32_t kv, std::string layout = "NHD", int pages = 1024,
                                   bool destination = false) {
  return {"--backend=" + E2eBackend(),
          absl::StrCat("--devices=", destination ? DstDevice() : 0),
          absl::StrCat("--num_layers=", kLayers),
          absl::StrCat("--num_qo_heads=", 2 * kv),
          absl::StrCat("--num_kv_heads=", kv),
          absl::StrCat("--head_dim=", kHeadDim),
          "--dtype=bf16",
          "--kv_layout=" + layout,
          absl::StrCat("--page_size=", kPage),
          absl::StrCat("--pages_per_device=", pages),
          absl::StrCat("--kv_peers=uid:", geteuid()),
          "--kv_sources=*"};
}

struct Node {
  std::unique_ptr<ServerProcess> server;
  std::unique_ptr<client::Client> client;
  std::unique_ptr<Harness> harness;
  uint32_t device = 0;
  Harness& h() { return *harness; }
  client::Client& c() { return *client; }
};

std::unique_ptr<Node> StartNode(std::vector<std::string> flags, uint64_t max_tokens = 512) {
  auto node = std::make_unique<Node>();
  auto server = ServerProcess::Start(flags);
  EXPECT_TRUE(server.ok()) << server.status();
  if (!server.ok()) return nullptr;
  node->server = *std::move(server);
  for (const std::string& f : flags)
    if (f.rfind("--devices=", 0) == 0) node->device = static_cast<uint32_t>(atoi(f.c_str() + 10));
  auto c = client::Client::Connect(node->server->unix_target());
  EXPECT_TRUE(c.ok()) << c.status();
  if (!c.ok()) return nullptr;
  node->client = *std::move(c);
  auto h = Harness::Create(node->client.get(), "main", node->device, max_tokens, Seed());
  EXPECT_TRUE(h.ok()) << h.status();
  if (!h.ok()) return nullptr;
  node->harness = *std::move(h);
  return node;
}

absl::StatusOr<v1::KvGrant> Grant(Node& n, uint64_t seq, uint32_t max_pulls = 0,
                                  uint32_t ttl_ms = 0) {
  v1::GrantKvRequest r;
  r.set_device(n.device);
  r.set_seq_id(seq);
  r.set_max_pulls(max_pulls);
  r.set_ttl_ms(ttl_ms);
  return n.c().GrantKv(r);
}

absl::StatusOr<v1::PullKvResponse> Pull(Node& dst, Node& src, const std::string& grant,
                                        uint64_t seq, uint32_t head_begin = 0,
                                        uint32_t head_end = 0) {
  v1::PullKvRequest r;
  r.set_source(src.server->unix_target());
  r.set_grant(grant);
  r.set_head_begin(head_begin);
  r.set_head_end(head_end);
  r.set_seq_id(seq);
  r.set_device(dst.device);
  return dst.c().PullKv(r);
}

// The node's KV of positions [0, tokens) of heads [h0, h1) of every layer, as ExportKv lays it
// out ([layers][2][tokens][heads][dim], bf16); the buffer is poisoned first.
std::vector<uint8_t> Export(Node& n, uint64_t seq, uint64_t tokens, uint32_t h0, uint32_t h1) {
  const uint64_t bytes = uint64_t{kLayers} * 2 * tokens * (h1 - h0) * kHeadDim * 2;
  const std::string name = absl::StrCat("export-", seq, "-", h0);
  auto buf = client::SharedMemoryBuffer::Create(client::SharedMemoryBuffer::UniqueKey("x"), bytes);
  EXPECT_TRUE(buf.ok());
  if (!buf.ok()) return {};
  std::memset((*buf)->data(), 0xa5, bytes);
  EXPECT_TRUE(n.c().RegisterHostRegion(name, (*buf)->key(), 0, bytes).ok());
  v1::ExportKvRequest r;
  r.set_device(n.device);
  r.set_seq_id(seq);
  r.set_layer_end(kLayers);
  r.set_head_begin(h0);
  r.set_head_end(h1);
  r.set_num_tokens(tokens);
  *r.mutable_dst() = client::MakeTensorRef(name, 0, v1::DTYPE_BFLOAT16,
                                           {kLayers, 2, tokens, h1 - h0, kHeadDim});
  const absl::Status s = n.c().ExportKv(r).status();
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_TRUE(n.c().UnregisterRegion(name).ok());
  const auto* p = static_cast<const uint8_t*>((*buf)->data());
  return std::vector<uint8_t>(p, p + bytes);
}

// Prefills `seq` with `tokens` tokens on every layer (checked against the fp64 reference).
void Prefill(Node& n, uint64_t seq, uint32_t tokens) {
  ASSERT_TRUE(n.h().CreateSequence(seq).ok());
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    const absl::Status s = n.h().Attend(layer, {{seq, tokens}}, /*decode=*/false);
    ASSERT_TRUE(s.ok()) << s;
  }
}

uint64_t FreePages(Node& n) {
  auto info = n.c().GetServerInfo();
  EXPECT_TRUE(info.ok());
  return info.ok() ? info->devices(0).free_pages() : 0;
}

TEST(KvTransfer, AWholeSequenceArrivesByteForByteAndDecodesLikeTheSource) {
  auto src = StartNode(NodeFlags(4));
  auto dst = StartNode(NodeFlags(4, "NHD", 1024, true));
  ASSERT_TRUE(src && dst);
  Prefill(*src, 1, 37);  // two full pages and a partial one
  auto grant = Grant(*src, 1);
  ASSERT_TRUE(grant.ok()) << grant.status();
  EXPECT_EQ(grant->num_tokens(), 37u);
  auto pulled = Pull(*dst, *src, grant->grant(), 9);
  ASSERT_TRUE(pulled.ok()) << pulled.status();
  EXPECT_EQ(pulled->layer_lengths(0), 37u);
  EXPECT_EQ(pulled->layer_lengths(1), 37u);
  EXPECT_EQ(pulled->bytes(), uint64_t{kLayers} * 2 * 37 * 4 * kHeadDim * 2);
  EXPECT_EQ(Export(*src, 1, 37, 0, 4), Export(*dst, 9, 37, 0, 4));
  if (pulled->path() == "ucx") {
    // Whole pages of both K and V are contiguous: at most one request per (layer, page).
    EXPECT_LE(pulled->requests(), uint64_t{kLayers} * 3);
  } else {  // one node, CUDA: one kernel, a warp per (layer, page, K/V) block
    EXPECT_EQ(pulled->path(), "cuda_ipc");
    EXPECT_EQ(pulled->requests(), uint64_t{kLayers} * 3 * 2);
  }
  // The destination's history is the source's; its decodes check against the fp64 reference.
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    dst->h().SetHistory(9, layer, src->h().HistoryK(1, layer), src->h().HistoryV(1, layer));
    ASSERT_TRUE(dst->h().Attend(layer, {{9, 1}}, /*decode=*/true).ok());
  }
}

// The source's decode of one token and the destinations' decodes of the same inputs, split by
// head: destination i holds kv heads [4i, 4i + 4) and query heads [8i, 8i + 8).
void ExpectHalvesDecodeLikeTheSource(Node& src, uint64_t src_seq, std::vector<Node*> halves,
                                     uint64_t dst_seq) {
  const uint64_t es = 2, q_row = 16 * kHeadDim * es, kv_row = 8 * kHeadDim * es;
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    // Deterministic mode: a fixed split of the keys, whatever the batch and the head count.
    v1::AttentionRequest sreq = src.h().BuildAttention(layer, {{src_seq, 1}}, false);
    sreq.set_deterministic(true);
    ASSERT_TRUE(src.h().RunAttention(sreq, /*decode=*/true).ok());
    const uint8_t* s = src.h().bytes();
    for (size_t i = 0; i < halves.size(); ++i) {
      Harness& d = halves[i]->h();
      v1::AttentionRequest dreq = d.BuildAttention(layer, {{dst_seq, 1}}, false);
      dreq.set_deterministic(true);
      auto* b = static_cast<uint8_t*>(d.buffer().data());
      std::memcpy(b + d.q_offset(), s + src.h().q_offset() + i * q_row / 2, q_row / 2);
      std::memcpy(b + d.k_offset(), s + src.h().k_offset() + i * kv_row / 2, kv_row / 2);
      std::memcpy(b + d.v_offset(), s + src.h().v_offset() + i * kv_row / 2, kv_row / 2);
      ASSERT_TRUE(halves[i]->c().Decode(dreq).ok());
      EXPECT_EQ(std::memcmp(b + d.out_offset(), s + src.h().out_offset() + i * q_row / 2,
                            q_row / 2),
                0)
          << "layer " << layer << ", half " << i << ": the outputs differ";
    }
  }
}

// `extra` flags go to all three nodes (--kv_cache_dtype=fp8_per_token: the scales of each half's
// heads move with them).
void SplitEightHeadsIntoTwoHalves(const std::string& layout,
                                  const std::vector<std::string>& extra = {}) {
  const auto flags = [&](uint32_t kv, bool destination) {
    std::vector<std::string> f = NodeFlags(kv, layout, 1024, destination);
    f.insert(f.end(), extra.begin(), extra.end());
    return f;
  };
  const bool per_token =
      std::find(extra.begin(), extra.end(), "--kv_cache_dtype=fp8_per_token") != extra.end();
  auto src = StartNode(flags(8, false));
  auto d0 = StartNode(flags(4, true));
  auto d1 = StartNode(flags(4, true));
  ASSERT_TRUE(src && d0 && d1);
  Prefill(*src, 1, 53);
  auto grant = Grant(*src, 1, /*max_pulls=*/2);
  ASSERT_TRUE(grant.ok()) << grant.status();
  auto p0 = Pull(*d0, *src, grant->grant(), 3, 0, 4);
  auto p1 = Pull(*d1, *src, grant->grant(), 3, 4, 8);
  ASSERT_TRUE(p0.ok()) << p0.status();
  ASSERT_TRUE(p1.ok()) << p1.status();
  EXPECT_EQ(Export(*src, 1, 53, 0, 4), Export(*d0, 3, 53, 0, 4));
  EXPECT_EQ(Export(*src, 1, 53, 4, 8), Export(*d1, 3, 53, 0, 4));
  // HND over UCX: one request per (layer, full page, K/V) and per (layer, K/V, head) of the
  // last page; as many again for per-token scales.
  if (layout == "HND" && p0->path() == "ucx") {
    EXPECT_LE(p0->requests(), uint64_t{kLayers} * 2 * (3 + 4) * (per_token ? 2 : 1));
  }
  ExpectHalvesDecodeLikeTheSource(*src, 1, {d0.get(), d1.get()}, 3);
  // Two pulls were allowed: a third finds no grant.
  auto third = Pull(*d0, *src, grant->grant(), 4, 0, 4);
  EXPECT_EQ(third.status().code(), absl::StatusCode::kNotFound) << third.status();
}

TEST(KvTransfer, EightHeadsSplitIntoTwoDestinationsDecodeBitForBitLikeTheSourceNHD) {
  SplitEightHeadsIntoTwoHalves("NHD");
}

TEST(KvTransfer, EightHeadsSplitIntoTwoDestinationsDecodeBitForBitLikeTheSourceHND) {
  SplitEightHeadsIntoTwoHalves("HND");
}

TEST(KvTransfer, ConcurrentPullsAllArriveIntact) {
  auto src = StartNode(NodeFlags(4));
  auto dst = StartNode(NodeFlags(4, "NHD", 1024, true));
  ASSERT_TRUE(src && dst);
  constexpr int kPulls = 6;
  std::vector<std::string> grants;
  for (int i = 0; i < kPulls; ++i) {
    Prefill(*src, 100 + i, 20 + 13 * i);
    auto g = Grant(*src, 100 + i);
    ASSERT_TRUE(g.ok()) << g.status();
    grants.push_back(g->grant());
  }
  std::vector<absl::Status> results(kPulls);
  std::vector<std::thread> threads;
  for (int i = 0; i < kPulls; ++i)
    threads.emplace_back([&, i] { results[i] = Pull(*dst, *src, grants[i], 200 + i).status(); });
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < kPulls; ++i) {
    ASSERT_TRUE(results[i].ok()) << "pull " << i << ": " << results[i];
    EXPECT_EQ(Export(*src, 100 + i, 20 + 13 * i, 0, 4), Export(*dst, 200 + i, 20 + 13 * i, 0, 4))
        << "pull " << i;
  }
}

TEST(KvTransfer, ASourceThatReleasesItsSequenceMidPullStillDeliversWhatItGranted) {
  auto src = StartNode(NodeFlags(4));
  std::vector<std::string> flags = NodeFlags(4, "NHD", 1024, true);
  flags.push_back("--debug_pull_pause_ms=600");
  auto dst = StartNode(flags);
  ASSERT_TRUE(src && dst);
  Prefill(*src, 1, 40);
  const std::vector<uint8_t> granted = Export(*src, 1, 40, 0, 4);
  auto grant = Grant(*src, 1);
  ASSERT_TRUE(grant.ok()) << grant.status();
  absl::StatusOr<v1::PullKvResponse> pulled;
  std::thread puller([&] { pulled = Pull(*dst, *src, grant->grant(), 5); });
  absl::SleepFor(absl::Milliseconds(200));  // the pull is open and paused
  ASSERT_TRUE(src->c().ReleaseSequence(0, 1).ok());
  Prefill(*src, 2, 64);  // new writes land on other pages: the granted ones are held
  puller.join();
  ASSERT_TRUE(pulled.ok()) << pulled.status();
  EXPECT_EQ(Export(*dst, 5, 40, 0, 4), granted);
}

TEST(KvTransfer, ASourceThatDiesMidPullLeavesTheDestinationAsItWas) {
  auto src = StartNode(NodeFlags(4));
  auto spare = StartNode(NodeFlags(4));
  std::vector<std::string> flags = NodeFlags(4, "NHD", 1024, true);
  flags.push_back("--debug_pull_pause_ms=600");
  flags.push_back("--kv_pull_timeout_s=5");  // a transport that cannot tell the peer is gone
  auto dst = StartNode(flags);
  ASSERT_TRUE(src && spare && dst);
  Prefill(*src, 1, 40);
  auto grant = Grant(*src, 1);
  ASSERT_TRUE(grant.ok()) << grant.status();
  const uint64_t free_before = FreePages(*dst);
  absl::StatusOr<v1::PullKvResponse> pulled;
  std::thread puller([&] { pulled = Pull(*dst, *src, grant->grant(), 5); });
  absl::SleepFor(absl::Milliseconds(200));  // opened: the destination knows the source's pool
  kill(src->server->pid(), SIGKILL);
  puller.join();
  ASSERT_FALSE(pulled.ok());
  EXPECT_TRUE(pulled.status().code() == absl::StatusCode::kUnavailable ||
              pulled.status().code() == absl::StatusCode::kDeadlineExceeded)
      << pulled.status();
  EXPECT_EQ(FreePages(*dst), free_before);
  EXPECT_EQ(dst->c().GetSequence(dst->device, 5).status().code(), absl::StatusCode::kNotFound);
  // The destination still pulls from a live source.
  Prefill(*spare, 1, 17);
  auto g2 = Grant(*spare, 1);
  ASSERT_TRUE(g2.ok());
  auto again = Pull(*dst, *spare, g2->grant(), 5);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(Export(*spare, 1, 17, 0, 4), Export(*dst, 5, 17, 0, 4));
}

TEST(KvTransfer, ADestinationOutOfPagesChangesNothingAndTheGrantStaysUsable) {
  auto src = StartNode(NodeFlags(4));
  auto small = StartNode(NodeFlags(4, "NHD", /*pages=*/4, true));
  auto big = StartNode(NodeFlags(4, "NHD", 1024, true));
  ASSERT_TRUE(src && small && big);
  Prefill(*src, 1, 100);  // 7 pages
  auto grant = Grant(*src, 1, /*max_pulls=*/1);
  ASSERT_TRUE(grant.ok());
  const uint64_t free_before = FreePages(*small);
  auto refused = Pull(*small, *src, grant->grant(), 1);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_EQ(FreePages(*small), free_before);
  EXPECT_EQ(small->c().GetSequence(small->device, 1).status().code(), absl::StatusCode::kNotFound);
  // The refused pull did not count: the grant's one pull is still there.
  auto pulled = Pull(*big, *src, grant->grant(), 1);
  ASSERT_TRUE(pulled.ok()) << pulled.status();
}

TEST(KvTransfer, BadPullsAreRefusedNamingTheFieldAndChangeNothing) {
  auto src = StartNode(NodeFlags(4));
  auto dst = StartNode(NodeFlags(4, "NHD", 1024, true));
  auto wide = StartNode(NodeFlags(8, "NHD", 1024, true));
  ASSERT_TRUE(src && dst && wide);
  Prefill(*src, 1, 20);
  Prefill(*dst, 7, 5);
  auto grant = Grant(*src, 1);
  ASSERT_TRUE(grant.ok());
  const auto expect = [](const absl::Status& s, absl::StatusCode code, const char* field) {
    EXPECT_EQ(s.code(), code) << s;
    EXPECT_NE(s.message().find(field), std::string::npos) << s;
  };
  expect(Pull(*dst, *src, "short", 2).status(), absl::StatusCode::kInvalidArgument, "grant");
  expect(Pull(*dst, *src, std::string(16, 'x'), 2).status(), absl::StatusCode::kNotFound,
         "grant");
  expect(Pull(*dst, *src, grant->grant(), 7).status(), absl::StatusCode::kFailedPrecondition,
         "seq_id");
  expect(Pull(*dst, *src, grant->grant(), 2, 0, 2).status(), absl::StatusCode::kInvalidArgument,
         "head_begin");
  expect(Pull(*wide, *src, grant->grant(), 2).status(), absl::StatusCode::kInvalidArgument,
         "head_begin");
  expect(Grant(*src, 99).status(), absl::StatusCode::kNotFound, "seq_id");
  EXPECT_EQ(dst->c().GetSequence(dst->device, 2).status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(src->c().RevokeKv(grant->grant()).ok());
  expect(Pull(*dst, *src, grant->grant(), 2).status(), absl::StatusCode::kNotFound, "grant");
}

TEST(KvTransfer, OnlyListedPeersOpenPullsAndOnlyListedSourcesArePulledFrom) {
  std::vector<std::string> closed = NodeFlags(4);
  closed.erase(std::remove_if(closed.begin(), closed.end(),
                              [](const std::string& f) {
                                return f.rfind("--kv_peers", 0) == 0 ||
                                       f.rfind("--kv_sources", 0) == 0;
                              }),
               closed.end());
  auto src = StartNode(closed);
  auto open_dst = StartNode(NodeFlags(4, "NHD", 1024, true));
  auto closed_dst = StartNode(closed);
  ASSERT_TRUE(src && open_dst && closed_dst);
  Prefill(*src, 1, 20);
  auto grant = Grant(*src, 1);
  ASSERT_TRUE(grant.ok());
  auto s1 = Pull(*open_dst, *src, grant->grant(), 1).status();
  EXPECT_EQ(s1.code(), absl::StatusCode::kPermissionDenied) << s1;
  EXPECT_NE(s1.message().find("--kv_peers"), std::string::npos) << s1;
  auto s2 = Pull(*closed_dst, *src, grant->grant(), 1).status();
  EXPECT_EQ(s2.code(), absl::StatusCode::kPermissionDenied) << s2;
  EXPECT_NE(s2.message().find("--kv_sources"), std::string::npos) << s2;
}

// ---- fp8 pools ----

std::vector<std::string> Fp8NodeFlags(bool destination) {
  std::vector<std::string> flags = NodeFlags(4, "NHD", 1024, destination);
  flags.push_back("--kv_cache_dtype=fp8");
  flags.push_back("--kv_scale_setters=*");
  return flags;
}

// Random scales of every layer, log-uniform in [1/64, 1/2].
std::vector<float> RandomScales(std::mt19937_64& rng) {
  std::uniform_real_distribution<float> exponent(-6.0f, -1.0f);
  std::vector<float> out(kLayers);
  for (float& s : out) s = std::exp2(exponent(rng));
  return out;
}

TEST(KvTransfer, AnFp8SequenceWithEqualScalesArrivesByteForByteAndDecodesLikeTheSource) {
  auto src = StartNode(Fp8NodeFlags(false));
  auto dst = StartNode(Fp8NodeFlags(true));
  ASSERT_TRUE(src && dst);
  std::mt19937_64 rng(Seed());
  const std::vector<float> k = RandomScales(rng), v = RandomScales(rng);
  ASSERT_TRUE(src->h().SetKvScales(0, k, v).ok());
  ASSERT_TRUE(dst->h().SetKvScales(0, k, v).ok());
  Prefill(*src, 1, 37);  // checked against the reference over the pool's fp8 values
  auto grant = Grant(*src, 1);
  ASSERT_TRUE(grant.ok()) << grant.status();
  auto pulled = Pull(*dst, *src, grant->grant(), 9);
  ASSERT_TRUE(pulled.ok()) << pulled.status();
  EXPECT_EQ(pulled->bytes(), uint64_t{kLayers} * 2 * 37 * 4 * kHeadDim * 1);  // a byte each
  EXPECT_EQ(Export(*src, 1, 37, 0, 4), Export(*dst, 9, 37, 0, 4));
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    dst->h().SetHistory(9, layer, src->h().HistoryK(1, layer), src->h().HistoryV(1, layer));
    ASSERT_TRUE(dst->h().Attend(layer, {{9, 1}}, /*decode=*/true).ok());
  }
}

TEST(KvTransfer, Fp8PullsRefuseAnotherStorageOrOtherScalesNamingThemAndChangeNothing) {
  auto src = StartNode(Fp8NodeFlags(false));
  auto model = StartNode(NodeFlags(4, "NHD", 1024, true));  // bf16 pool
  auto other = StartNode(Fp8NodeFlags(true));
  ASSERT_TRUE(src && model && other);
  std::mt19937_64 rng(Seed() + 1);
  const std::vector<float> k = RandomScales(rng), v = RandomScales(rng);
  std::vector<float> v_other = v;
  v_other[1] = std::nextafter(v[1], 1.0f);  // one ulp: scales are compared bit for bit
  ASSERT_TRUE(src->h().SetKvScales(0, k, v).ok());
  ASSERT_TRUE(other->h().SetKvScales(0, k, v_other).ok());
  Prefill(*src, 1, 21);
  auto grant = Grant(*src, 1);
  ASSERT_TRUE(grant.ok()) << grant.status();
  const auto expect_refused = [&](Node& dst, const std::vector<std::string>& fragments) {
    const uint64_t free_before = FreePages(dst);
    const absl::Status s = Pull(dst, *src, grant->grant(), 2).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    for (const std::string& f : fragments)
      EXPECT_NE(s.message().find(f), std::string::npos) << "'" << f << "' not in: " << s;
    EXPECT_EQ(FreePages(dst), free_before);
    EXPECT_EQ(dst.c().GetSequence(dst.device, 2).status().code(), absl::StatusCode::kNotFound);
  };
  expect_refused(*model, {"kv_cache_dtype"});
  expect_refused(*other, {"v_scale", "layer 1"});
  // Its pool empty, the destination takes the source's scales, and the same grant pulls.
  ASSERT_TRUE(other->h().SetKvScales(1, {k[1]}, {v[1]}).ok());
  auto pulled = Pull(*other, *src, grant->grant(), 2);
  ASSERT_TRUE(pulled.ok()) << pulled.status();
  EXPECT_EQ(Export(*src, 1, 21, 0, 4), Export(*other, 2, 21, 0, 4));
}

// ---- fp8 pools with per-token scales ----

std::vector<std::string> PerTokenNodeFlags(uint32_t kv, bool destination) {
  std::vector<std::string> flags = NodeFlags(kv, "NHD", 1024, destination);
  flags.push_back("--kv_cache_dtype=fp8_per_token");
  return flags;
}

// No scales to agree on: each row's scale moves with its codes (4 more bytes per row), and the
// destination decodes against the source's history (each row's scale times its codes).
TEST(KvTransfer, APerTokenSequenceArrivesWithItsScalesByteForByteAndDecodesLikeTheSource) {
  auto src = StartNode(PerTokenNodeFlags(4, false));
  auto dst = StartNode(PerTokenNodeFlags(4, true));
  ASSERT_TRUE(src && dst);
  Prefill(*src, 1, 37);
  auto grant = Grant(*src, 1);
  ASSERT_TRUE(grant.ok()) << grant.status();
  auto pulled = Pull(*dst, *src, grant->grant(), 9);
  ASSERT_TRUE(pulled.ok()) << pulled.status();
  EXPECT_EQ(pulled->bytes(), uint64_t{kLayers} * 2 * 37 * 4 * (kHeadDim * 1 + 4));
  EXPECT_EQ(Export(*src, 1, 37, 0, 4), Export(*dst, 9, 37, 0, 4));
  for (uint32_t layer = 0; layer < kLayers; ++layer) {
    dst->h().SetHistory(9, layer, src->h().HistoryK(1, layer), src->h().HistoryV(1, layer));
    ASSERT_TRUE(dst->h().Attend(layer, {{9, 1}}, /*decode=*/true).ok());
  }
}

TEST(KvTransfer, APerTokenSequenceSplitIntoTwoDestinationsDecodesBitForBitLikeTheSource) {
  SplitEightHeadsIntoTwoHalves("HND", {"--kv_cache_dtype=fp8_per_token"});
}

TEST(KvTransfer, PerTokenAndPerLayerFp8PoolsRefuseToPullFromEachOtherNamingBoth) {
  auto src = StartNode(PerTokenNodeFlags(4, false));
  auto dst = StartNode(Fp8NodeFlags(true));
  ASSERT_TRUE(src && dst);
  Prefill(*src, 1, 21);
  auto grant = Grant(*src, 1);
  ASSERT_TRUE(grant.ok()) << grant.status();
  const uint64_t free_before = FreePages(*dst);
  const absl::Status s = Pull(*dst, *src, grant->grant(), 2).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("kv_cache_dtype"), std::string::npos) << s;
  EXPECT_NE(s.message().find("fp8_per_token"), std::string::npos) << s;
  EXPECT_EQ(FreePages(*dst), free_before);
  EXPECT_EQ(dst->c().GetSequence(dst->device, 2).status().code(), absl::StatusCode::kNotFound);
}

TEST(KvTransfer, AGrantHoldsItsPagesUntilItEndsThenGivesThemBack) {
  std::vector<std::string> flags = NodeFlags(4);
  flags.push_back("--lease_timeout_s=0.4");  // the sweep runs every 100 ms
  auto src = StartNode(flags);
  ASSERT_TRUE(src);
  const uint64_t free_at_start = FreePages(*src);
  Prefill(*src, 1, 40);  // 3 pages
  auto grant = Grant(*src, 1, 0, /*ttl_ms=*/300);
  ASSERT_TRUE(grant.ok());
  ASSERT_TRUE(src->c().ReleaseSequence(0, 1).ok());
  EXPECT_EQ(FreePages(*src), free_at_start - 3);  // held by the grant
  absl::SleepFor(absl::Milliseconds(700));
  EXPECT_EQ(FreePages(*src), free_at_start);
}

}  // namespace
}  // namespace attnd::testing
