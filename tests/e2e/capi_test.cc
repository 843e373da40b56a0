// End-to-end tests of the C ABI (client/capi/attnd_c.h, libattnd_c.so) against a real attnd:
// what the Python binding does, through the C functions only, with every output checked against
// the client's fp64 reference on fresh random inputs. capi_harness.h says why attnd is started
// and ServerInfo read the way they are here.
#include <chrono>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/capi/attnd_c.h"
#include "gtest/gtest.h"
#include "tests/e2e/capi_harness.h"

namespace attnd::testing {
namespace {

uint64_t Seed() {
  static const uint64_t seed = std::random_device{}();
  return seed;
}

// ---- The fixture: attnd, a connected client, a registered region ----

class CApi : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(server_.WaitListening()) << server_.Log();
    ASSERT_EQ(attnd_connect(server_.target().c_str(), 5.0, &client_, err_, kErrLen), 0) << err_;
    // Ready once device 0 serves; the info must parse on every try.
    for (int i = 0; i < 300 && !info_.serving; ++i) {
      ASSERT_EQ(FetchInfo(&info_bytes_), 0) << err_;
      ASSERT_TRUE(ParseInfo(info_bytes_, &info_)) << "ServerInfo does not parse";
      if (!info_.serving) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ASSERT_TRUE(info_.serving) << server_.Log();
    work_ = std::make_unique<CApiWorkload>(info_, Seed());
    ASSERT_EQ(work_->Register(client_, err_), 0) << err_;
  }

  void TearDown() override {
    if (stream_ != nullptr) attnd_stream_close(stream_, nullptr, 0);
    if (client_ != nullptr) attnd_unregister_region(client_, "main", nullptr, 0);
    // Hang up before SIGTERM: attnd's shutdown waits for connected clients to leave.
    attnd_client_free(client_);
  }

  int FetchInfo(std::vector<uint8_t>* bytes) {
    bytes->resize(64 << 10);
    size_t len = 0;
    const int rc = attnd_server_info(client_, bytes->data(), bytes->size(), &len, err_, kErrLen);
    bytes->resize(rc == 0 ? len : 0);
    return rc;
  }

  void Create(std::initializer_list<uint64_t> ids) {
    for (uint64_t id : ids) ASSERT_EQ(attnd_create_sequence(client_, 0, id, err_, kErrLen), 0) << err_;
  }

  void OpenStream() { ASSERT_EQ(attnd_stream_open(client_, &stream_, err_, kErrLen), 0) << err_; }

  // Receives the oldest answer on the stream and checks it against slot s.
  void ReceiveAndCheck(size_t s, bool wrote_outputs) {
    uint64_t tag = 0, lengths[64];
    size_t n = 0;
    ASSERT_EQ(attnd_stream_receive(stream_, &tag, lengths, 64, &n, err_, kErrLen), 0) << err_;
    EXPECT_EQ(tag, ++received_);
    EXPECT_TRUE(work_->Check(s, wrote_outputs, lengths, n)) << "tag " << tag;
  }

  // Sends call on the stream and receives its checked answer.
  void StreamRoundTrip(const attnd_call& call, size_t s) {
    uint64_t tag = 0;
    ASSERT_EQ(attnd_stream_send(stream_, &call, &tag, err_, kErrLen), 0) << err_;
    ReceiveAndCheck(s, call.op != ATTND_OP_APPEND);
  }

  // Unary call, answer checked against slot s.
  void UnaryRoundTrip(const attnd_call& call, size_t s) {
    std::vector<uint64_t> lengths(call.num_items);
    ASSERT_EQ(attnd_call_unary(client_, &call, lengths.data(), lengths.size(), err_, kErrLen), 0)
        << err_;
    EXPECT_TRUE(work_->Check(s, call.op != ATTND_OP_APPEND, lengths.data(), lengths.size()));
  }

  // One decode step of every layer for seqs, each answer checked.
  void DecodeStep(std::vector<attnd_item> seqs) {
    for (uint32_t layer = 0; layer < kLayers; ++layer)
      UnaryRoundTrip(work_->Build(ATTND_OP_DECODE, 0, layer, seqs), 0);
  }

  std::vector<uint64_t> Lengths(uint64_t seq_id, int* rc) {
    std::vector<uint64_t> lengths(8);
    size_t n = 0;
    *rc = attnd_get_sequence(client_, 0, seq_id, lengths.data(), lengths.size(), &n, err_, kErrLen);
    lengths.resize(std::min(n, lengths.size()));
    return lengths;
  }

  CApiServer server_;
  attnd_client* client_ = nullptr;
  attnd_stream* stream_ = nullptr;
  std::vector<uint8_t> info_bytes_;
  Info info_;
  std::unique_ptr<CApiWorkload> work_;
  uint64_t received_ = 0;
  char err_[kErrLen] = {};
};

TEST(CApiAlone, AbiVersionIsTwo) { EXPECT_EQ(attnd_abi_version(), 2); }

TEST(CApiAlone, ConnectingToNoServerIsUnavailableAndLeavesNoHandle) {
  char err[kErrLen];
  attnd_client* client = reinterpret_cast<attnd_client*>(&err);  // must be overwritten
  EXPECT_EQ(attnd_connect("unix:///tmp/attnd-capi-nobody.sock", 0.2, &client, err, kErrLen), 14);
  EXPECT_EQ(client, nullptr);
  EXPECT_NE(std::string(err).find("attnd-capi-nobody.sock"), std::string::npos) << err;
}

TEST_F(CApi, ClientsConnectedUnderOtherNamesSeeNoneOfEachOthersSequences) {
  attnd_client* a = nullptr;
  attnd_client* b = nullptr;
  ASSERT_EQ(attnd_connect_as(server_.target().c_str(), 5.0, nullptr, "capi-a", &a, err_, kErrLen), 0)
      << err_;
  ASSERT_EQ(attnd_connect_as(server_.target().c_str(), 5.0, "", "capi-b", &b, err_, kErrLen), 0)
      << err_;
  ASSERT_EQ(attnd_create_sequence(a, 0, 77, err_, kErrLen), 0) << err_;
  uint64_t lengths[kLayers];
  size_t layers = 0;
  EXPECT_EQ(attnd_get_sequence(a, 0, 77, lengths, kLayers, &layers, err_, kErrLen), 0) << err_;
  EXPECT_EQ(attnd_get_sequence(b, 0, 77, lengths, kLayers, &layers, err_, kErrLen), 5) << err_;
  EXPECT_EQ(attnd_get_sequence(client_, 0, 77, lengths, kLayers, &layers, err_, kErrLen), 5);
  EXPECT_EQ(attnd_release_sequence(b, 0, 77, nullptr, err_, kErrLen), 5);
  EXPECT_EQ(attnd_release_sequence(a, 0, 77, nullptr, err_, kErrLen), 0) << err_;
  // A name the server refuses is the connection's first call's answer, not a crash.
  attnd_client* bad = nullptr;
  ASSERT_EQ(attnd_connect_as(server_.target().c_str(), 5.0, nullptr, "a b", &bad, err_, kErrLen), 0);
  EXPECT_EQ(attnd_create_sequence(bad, 0, 1, err_, kErrLen), 3);
  EXPECT_NE(std::string(err_).find("attnd-client"), std::string::npos) << err_;
  attnd_client_free(bad);
  attnd_client_free(a);
  attnd_client_free(b);
}

TEST_F(CApi, ServerInfoParsesAsTheServersModel) {
  EXPECT_EQ(info_.num_layers, kLayers);
  EXPECT_EQ(info_.num_qo_heads, 8u);
  EXPECT_EQ(info_.num_kv_heads, 2u);
  EXPECT_EQ(info_.head_dim, 64u);
  EXPECT_EQ(info_.page_size, 16u);
  EXPECT_EQ(info_.dtype, ATTND_DTYPE_BFLOAT16);
}

TEST_F(CApi, ServerInfoTooBigForTheBufferReportsItsSizeAndCopiesNothing) {
  size_t len = 0;
  EXPECT_EQ(attnd_server_info(client_, nullptr, 0, &len, err_, kErrLen), 8);
  EXPECT_EQ(len, info_bytes_.size());
  std::vector<uint8_t> small(len - 1, 0xab);
  EXPECT_EQ(attnd_server_info(client_, small.data(), small.size(), &len, err_, kErrLen), 8);
  EXPECT_EQ(small, std::vector<uint8_t>(len - 1, 0xab));
}

TEST_F(CApi, StreamPrefillThenPipelinedDecodesMatchTheReference) {
  SCOPED_TRACE(absl::StrCat("seed ", Seed()));
  Create({1, 2, 3, 4, 5});
  OpenStream();
  const std::vector<attnd_item> prompts = {{1, 1}, {2, 15}, {3, 17}, {4, 100}, {5, 300}};
  for (uint32_t layer = 0; layer < kLayers; ++layer)
    StreamRoundTrip(work_->Build(ATTND_OP_PREFILL, 0, layer, prompts, /*with_lse=*/true), 0);
  // Every layer of several steps in flight at once, each in its own slot, answered in order.
  std::deque<size_t> in_flight;
  size_t next = 0;
  for (int step = 0; step < 6; ++step) {
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      if (in_flight.size() == kSlots) {
        ReceiveAndCheck(in_flight.front(), true);
        in_flight.pop_front();
      }
      const size_t s = next++ % kSlots;
      attnd_call call = work_->Build(ATTND_OP_DECODE, s, layer,
                                     {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {5, 1}}, step % 2 == 0);
      uint64_t tag = 0;
      ASSERT_EQ(attnd_stream_send(stream_, &call, &tag, err_, kErrLen), 0) << err_;
      in_flight.push_back(s);
    }
  }
  EXPECT_EQ(attnd_stream_pending(stream_), kSlots);
  for (; !in_flight.empty(); in_flight.pop_front()) ReceiveAndCheck(in_flight.front(), true);
  EXPECT_EQ(attnd_stream_close(stream_, err_, kErrLen), 0) << err_;
  stream_ = nullptr;
}

TEST_F(CApi, UnaryPrefillAndDecodeMatchTheReference) {
  SCOPED_TRACE(absl::StrCat("seed ", Seed()));
  Create({1, 2});
  for (uint32_t layer = 0; layer < kLayers; ++layer)
    UnaryRoundTrip(work_->Build(ATTND_OP_PREFILL, 0, layer, {{1, 33}, {2, 7}}, true), 0);
  for (int step = 0; step < 3; ++step) DecodeStep({{1, 1}, {2, 1}});
}

TEST_F(CApi, StreamAppendThenDecodeSeesTheAppendedKv) {
  SCOPED_TRACE(absl::StrCat("seed ", Seed()));
  Create({9});
  OpenStream();
  for (uint32_t layer = 0; layer < kLayers; ++layer)
    StreamRoundTrip(work_->Build(ATTND_OP_APPEND, 0, layer, {{9, 77}}), 0);
  for (uint32_t layer = 0; layer < kLayers; ++layer)
    StreamRoundTrip(work_->Build(ATTND_OP_DECODE, 0, layer, {{9, 1}}, true), 0);
}

TEST_F(CApi, ForkedSequenceContinuesFromItsParent) {
  Create({1});
  for (uint32_t layer = 0; layer < kLayers; ++layer)
    UnaryRoundTrip(work_->Build(ATTND_OP_PREFILL, 0, layer, {{1, 40}}), 0);
  ASSERT_EQ(attnd_fork_sequence(client_, 0, 1, 2, err_, kErrLen), 0) << err_;
  work_->Fork(1, 2);
  int rc = 0;
  EXPECT_EQ(Lengths(2, &rc), std::vector<uint64_t>(kLayers, 40));
  EXPECT_EQ(rc, 0) << err_;
  for (int step = 0; step < 2; ++step) DecodeStep({{1, 1}, {2, 1}});
}

TEST_F(CApi, TruncateRollsTheSequenceBack) {
  Create({1});
  for (uint32_t layer = 0; layer < kLayers; ++layer)
    UnaryRoundTrip(work_->Build(ATTND_OP_PREFILL, 0, layer, {{1, 40}}), 0);
  ASSERT_EQ(attnd_truncate_sequence(client_, 0, 1, 20, err_, kErrLen), 0) << err_;
  work_->Truncate(1, 20);
  int rc = 0;
  EXPECT_EQ(Lengths(1, &rc), std::vector<uint64_t>(kLayers, 20));
  EXPECT_EQ(rc, 0) << err_;
  DecodeStep({{1, 1}});
}

TEST_F(CApi, ReleaseFreesThePagesAndForgetsTheSequence) {
  Create({1});
  UnaryRoundTrip(work_->Build(ATTND_OP_APPEND, 0, 0, {{1, 40}}), 0);
  uint64_t freed = 0;
  ASSERT_EQ(attnd_release_sequence(client_, 0, 1, &freed, err_, kErrLen), 0) << err_;
  EXPECT_EQ(freed, 3u);  // 40 tokens in pages of 16
  int rc = 0;
  Lengths(1, &rc);
  EXPECT_EQ(rc, 5) << err_;
}

// The model-dtype server refuses scales: the call reached it, its code and message came back.
TEST_F(CApi, SetKvScalesReachesTheServer) {
  const float k[2] = {0.5f, 0.25f}, v[2] = {0.125f, 1.0f};
  EXPECT_EQ(attnd_set_kv_scales(client_, 0, 0, k, v, 2, err_, kErrLen), 9);
  EXPECT_NE(std::string(err_).find("kv_cache_dtype"), std::string::npos) << err_;
  EXPECT_EQ(attnd_set_kv_scales(client_, 0, 0, nullptr, v, 2, err_, kErrLen), 3);
  EXPECT_NE(std::string(err_).find("k_scales is NULL"), std::string::npos) << err_;
}

TEST_F(CApi, RefusedCallIsNotFoundNamingSeqIdAndLeavesTheStreamUsable) {
  Create({1});
  OpenStream();
  StreamRoundTrip(work_->Build(ATTND_OP_PREFILL, 0, 0, {{1, 5}}), 0);
  attnd_call bad = work_->Build(ATTND_OP_DECODE, 1, 0, {{404, 1}}, false, /*expect_ok=*/false);
  uint64_t tag = 0, lengths[4];
  size_t n = 7;
  ASSERT_EQ(attnd_stream_send(stream_, &bad, &tag, err_, kErrLen), 0) << err_;
  EXPECT_EQ(attnd_stream_receive(stream_, &tag, lengths, 4, &n, err_, kErrLen), 5);
  EXPECT_NE(std::string(err_).find("seq_id"), std::string::npos) << err_;
  EXPECT_EQ(tag, 2u);
  EXPECT_EQ(n, 0u);
  received_ = tag;
  StreamRoundTrip(work_->Build(ATTND_OP_DECODE, 2, 0, {{1, 1}}), 2);
}

TEST_F(CApi, StreamOutlivesItsClient) {
  Create({1});
  OpenStream();
  attnd_client_free(client_);
  client_ = nullptr;
  StreamRoundTrip(work_->Build(ATTND_OP_PREFILL, 0, 0, {{1, 3}}), 0);
  EXPECT_EQ(attnd_stream_close(stream_, err_, kErrLen), 0) << err_;
  stream_ = nullptr;
}

TEST_F(CApi, ReceiveWithNothingPendingIsFailedPrecondition) {
  OpenStream();
  uint64_t tag = 99;
  EXPECT_EQ(attnd_stream_receive(stream_, &tag, nullptr, 0, nullptr, err_, kErrLen), 9);
  EXPECT_EQ(tag, 0u);
}

TEST_F(CApi, NullHandlesAndOutputsAreInvalidArgumentNamingThem) {
  attnd_call call = work_->Build(ATTND_OP_DECODE, 0, 0, {{1, 1}}, false, false);
  attnd_client* other = nullptr;
  size_t len = 0;
  const std::pair<std::function<int()>, const char*> cases[] = {
      {[&] { return attnd_call_unary(nullptr, &call, nullptr, 0, err_, kErrLen); },
       "client is NULL"},
      {[&] { return attnd_stream_send(nullptr, &call, nullptr, err_, kErrLen); },
       "stream is NULL"},
      {[&] { return attnd_server_info(client_, nullptr, 0, nullptr, err_, kErrLen); },
       "len is NULL"},
      {[&] { return attnd_server_info(client_, nullptr, 4, &len, err_, kErrLen); },
       "buf is NULL but cap is 4"},
      {[&] { return attnd_register_host_region(client_, "r", nullptr, 0, 1, err_, kErrLen); },
       "shm_key is NULL"},
      {[&] { return attnd_connect(nullptr, 1, &other, err_, kErrLen); }, "target is NULL"},
      {[&] { return attnd_connect(server_.target().c_str(), 1, nullptr, err_, kErrLen); },
       "out is NULL"},
      {[&] { return attnd_connect(server_.target().c_str(), -1, &other, err_, kErrLen); },
       "connect_timeout_s is -1"},
  };
  for (const auto& [call_it, message] : cases) {
    EXPECT_EQ(call_it(), 3) << message;
    EXPECT_NE(std::string(err_).find(message), std::string::npos) << err_;
  }
  EXPECT_EQ(other, nullptr);
}

// A valid call broken one way; `field` is what the message must name.
struct BadCall {
  const char* name;
  void (*spoil)(attnd_call*);
  const char* field;
};

// Names the case in test listings (ctest shows GetParam()).
void PrintTo(const BadCall& bad, std::ostream* os) { *os << bad.name; }

class CApiBadCall : public CApi, public ::testing::WithParamInterface<BadCall> {};

TEST_P(CApiBadCall, IsInvalidArgumentBeforeAnyRpc) {
  Create({1});
  OpenStream();
  attnd_call call = work_->Build(ATTND_OP_PREFILL, 0, 0, {{1, 2}}, true);
  attnd_call bad = call;
  if (GetParam().spoil != nullptr) GetParam().spoil(&bad);
  const attnd_call* arg = GetParam().spoil != nullptr ? &bad : nullptr;
  EXPECT_EQ(attnd_call_unary(client_, arg, nullptr, 0, err_, kErrLen), 3);
  EXPECT_NE(std::string(err_).find(GetParam().field), std::string::npos) << err_;
  uint64_t tag = 77;
  EXPECT_EQ(attnd_stream_send(stream_, arg, &tag, err_, kErrLen), 3);
  EXPECT_NE(std::string(err_).find(GetParam().field), std::string::npos) << err_;
  // Nothing went out: no tag was taken and the stream carries the next call as its first.
  EXPECT_EQ(tag, 77u);
  EXPECT_EQ(attnd_stream_pending(stream_), 0u);
  StreamRoundTrip(call, 0);
}

INSTANTIATE_TEST_SUITE_P(
    CApi, CApiBadCall,
    ::testing::Values(
        BadCall{"NullCall", nullptr, "call is NULL"},
        BadCall{"NullItems", [](attnd_call* c) { c->items = nullptr; },
                "call.items is NULL but call.num_items is 1"},
        BadCall{"UnknownOp", [](attnd_call* c) { c->op = 9; }, "call.op is 9"},
        BadCall{"NdimAboveFour", [](attnd_call* c) { c->q.ndim = 5; }, "call.q.ndim is 5"},
        BadCall{"NegativeNdim", [](attnd_call* c) { c->lse.ndim = -1; }, "call.lse.ndim is -1"}),
    [](const ::testing::TestParamInfo<BadCall>& info) { return std::string(info.param.name); });

TEST_F(CApi, ErrorMessagesAreCutToTheBufferAndEndInNul) {
  char full[kErrLen], small[8];
  ASSERT_EQ(attnd_create_sequence(client_, 7, 1, full, sizeof(full)), 3);  // no device 7
  ASSERT_GT(strlen(full), sizeof(small));
  memset(small, 'x', sizeof(small));
  EXPECT_EQ(attnd_create_sequence(client_, 7, 1, small, sizeof(small)), 3);
  EXPECT_EQ(std::string(small), std::string(full, sizeof(small) - 1));
  char one = 'x';
  EXPECT_EQ(attnd_create_sequence(client_, 7, 1, &one, 1), 3);
  EXPECT_EQ(one, '\0');
  EXPECT_EQ(attnd_create_sequence(client_, 7, 1, nullptr, 0), 3);
}

TEST_F(CApi, SuccessLeavesAnEmptyMessage) {
  strcpy(err_, "stale");
  EXPECT_EQ(attnd_create_sequence(client_, 0, 1, err_, kErrLen), 0);
  EXPECT_STREQ(err_, "");
}

}  // namespace
}  // namespace attnd::testing
