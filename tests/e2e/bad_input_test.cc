// The bad-input table: each row sends one malformed request to a real attnd and expects a
// specific gRPC code, a message naming the field, and no change at all: every sequence's
// lengths and pages, the free-page count, the region list and every byte of the client's
// region (outputs included) are the same afterwards.
#include <cstring>
#include <functional>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/tensor.h"
#include "gtest/gtest.h"
#include "testing/harness.h"
#include "testing/server_process.h"

namespace attnd::testing {
namespace {

constexpr uint32_t kQoHeads = 4, kKvHeads = 2, kHeadDim = 64, kLayers = 2;
constexpr uint64_t kPages = 48, kPageSize = 4, kMaxBatch = 8;

struct Snapshot {
  std::vector<std::string> sequences;  // "id:len,len:pages"
  uint64_t free_pages = 0;
  std::vector<std::string> regions;
  std::vector<uint8_t> bytes;

  bool operator==(const Snapshot& o) const {
    return sequences == o.sequences && free_pages == o.free_pages && regions == o.regions &&
           bytes == o.bytes;
  }
};

class BadInputTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto server = ServerProcess::Start({"--backend=cpu", "--devices=0",
                                        absl::StrCat("--num_layers=", kLayers),
                                        absl::StrCat("--num_qo_heads=", kQoHeads),
                                        absl::StrCat("--num_kv_heads=", kKvHeads),
                                        absl::StrCat("--head_dim=", kHeadDim), "--dtype=bf16",
                                        absl::StrCat("--page_size=", kPageSize),
                                        absl::StrCat("--pages_per_device=", kPages),
                                        absl::StrCat("--max_batch_size=", kMaxBatch),
                                        "--max_seq_len=1000"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    EXPECT_EQ(server_->Terminate(), 0) << server_->Log();
    delete server_;
  }

  void SetUp() override {
    auto c = client::Client::Connect(server_->unix_target());
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = *std::move(c);
    const uint64_t seed = std::random_device{}();
    SCOPED_TRACE(absl::StrCat("seed ", seed));
    auto h = Harness::Create(client_.get(), "bad-input", 0, 1024, seed);
    ASSERT_TRUE(h.ok()) << h.status();
    harness_ = *std::move(h);
    // Two sequences with history that does not end on a page boundary.
    for (uint64_t id : {1, 2}) ASSERT_TRUE(harness_->CreateSequence(id).ok());
    for (uint32_t layer = 0; layer < kLayers; ++layer)
      ASSERT_TRUE(harness_->Attend(layer, {{1, 5}, {2, 3}}, false).ok());
  }

  void TearDown() override {
    for (uint64_t id : {1, 2, 3}) (void)client_->ReleaseSequence(0, id);
    harness_.reset();
  }

  Snapshot Take() {
    Snapshot s;
    auto seqs = client_->ListSequences(0);
    EXPECT_TRUE(seqs.ok()) << seqs.status();
    for (const v1::SequenceInfo& seq : seqs->sequences()) {
      std::string line = absl::StrCat(seq.seq_id(), ":");
      for (uint64_t len : seq.layer_lengths()) absl::StrAppend(&line, len, ",");
      absl::StrAppend(&line, ":", seq.num_pages());
      s.sequences.push_back(line);
    }
    auto info = client_->GetServerInfo();
    EXPECT_TRUE(info.ok());
    s.free_pages = info->devices(0).free_pages();
    auto regions = client_->ListRegions();
    EXPECT_TRUE(regions.ok());
    for (const v1::RegionInfo& r : regions->regions())
      s.regions.push_back(absl::StrCat(r.name(), "/", r.byte_size()));
    const auto* data = static_cast<const uint8_t*>(harness_->buffer().data());
    s.bytes.assign(data, data + harness_->buffer().size());
    return s;
  }

  // A valid Decode of sequences 1 and 2 at layer 0, with lse.
  v1::AttentionRequest ValidDecode() { return harness_->BuildAttention(0, {{1, 1}, {2, 1}}, true); }

  static ServerProcess* server_;
  std::unique_ptr<client::Client> client_;
  std::unique_ptr<Harness> harness_;
};

ServerProcess* BadInputTest::server_ = nullptr;

// A row prepares its request (which may write inputs into the region) and returns the call
// that sends it; the snapshot is taken between the two.
using Call = std::function<absl::Status()>;
using Prepare = std::function<Call(client::Client&, Harness&, v1::AttentionRequest)>;

struct Row {
  const char* name;
  absl::StatusCode code;
  const char* field;  // the message must name it
  Prepare prepare;
};

Call DecodeCall(client::Client& c, v1::AttentionRequest r) {
  return [&c, r] { return c.Decode(r).status(); };
}
Call PrefillCall(client::Client& c, v1::AttentionRequest r) {
  return [&c, r] { return c.Prefill(r).status(); };
}
Call AppendCall(client::Client& c, v1::AppendRequest r) {
  return [&c, r] { return c.Append(r).status(); };
}

// Rows whose tensor references are malformed: region, offset, shape, dtype, alignment, aliasing.
std::vector<Row> TensorRows() {
  using C = absl::StatusCode;
  using R = v1::AttentionRequest;
  using Cl = client::Client;
  return {
      {"UnknownRegion", C::kNotFound, "q.region",
       [](Cl& c, Harness&, R r) { r.mutable_q()->set_region("no-such-region"); return DecodeCall(c, r); }},
      {"OffsetPastRegionEnd", C::kInvalidArgument, "out",
       [](Cl& c, Harness& h, R r) { r.mutable_out()->set_offset(h.buffer().size() - 64); return DecodeCall(c, r); }},
      {"OffsetNear2To64", C::kInvalidArgument, "k_new",
       [](Cl& c, Harness&, R r) {
         r.mutable_k_new()->set_offset(std::numeric_limits<uint64_t>::max() - 1);
         return DecodeCall(c, r);
       }},
      {"ShapeNear2To64", C::kInvalidArgument, "q.shape",
       [](Cl& c, Harness&, R r) {
         r.mutable_q()->set_shape(0, uint64_t{1} << 62);
         r.mutable_q()->set_shape(1, uint64_t{1} << 62);
         return DecodeCall(c, r);
       }},
      {"WrongDtype", C::kInvalidArgument, "q.dtype",
       [](Cl& c, Harness&, R r) { r.mutable_q()->set_dtype(v1::DTYPE_FLOAT16); return DecodeCall(c, r); }},
      {"WrongLseDtype", C::kInvalidArgument, "lse.dtype",
       [](Cl& c, Harness&, R r) { r.mutable_lse()->set_dtype(v1::DTYPE_BFLOAT16); return DecodeCall(c, r); }},
      {"WrongRank", C::kInvalidArgument, "v_new.shape",
       [](Cl& c, Harness&, R r) { r.mutable_v_new()->mutable_shape()->RemoveLast(); return DecodeCall(c, r); }},
      {"TokenCountNotMatchingItems", C::kInvalidArgument, "q.shape",
       [](Cl& c, Harness&, R r) { r.mutable_q()->set_shape(0, 3); return DecodeCall(c, r); }},
      {"HeadCountNotMatchingModel", C::kInvalidArgument, "q.shape",
       [](Cl& c, Harness&, R r) { r.mutable_q()->set_shape(1, kQoHeads * 2); return DecodeCall(c, r); }},
      {"HeadDimNotMatchingModel", C::kInvalidArgument, "k_new.shape",
       [](Cl& c, Harness&, R r) { r.mutable_k_new()->set_shape(2, kHeadDim / 2); return DecodeCall(c, r); }},
      {"MisalignedOffset", C::kInvalidArgument, "q.offset",
       [](Cl& c, Harness&, R r) { r.mutable_q()->set_offset(r.q().offset() + 1); return DecodeCall(c, r); }},
      {"OutputAliasesInput", C::kInvalidArgument, "out",
       [](Cl& c, Harness&, R r) { r.mutable_out()->set_offset(r.q().offset()); return DecodeCall(c, r); }},
  };
}

// Rows whose batch is malformed: device, sequences, layer, token counts, limits, pages, Append,
// event sync.
std::vector<Row> BatchRows() {
  using C = absl::StatusCode;
  using R = v1::AttentionRequest;
  using Cl = client::Client;
  return {
      {"UnknownDevice", C::kInvalidArgument, "device",
       [](Cl& c, Harness&, R r) { r.set_device(7); return DecodeCall(c, r); }},
      {"UnknownSequence", C::kNotFound, "items[1].seq_id",
       [](Cl& c, Harness&, R r) { r.mutable_items(1)->set_seq_id(999); return DecodeCall(c, r); }},
      {"SameSequenceTwiceInBatch", C::kInvalidArgument, "items[1].seq_id",
       [](Cl& c, Harness&, R r) { r.mutable_items(1)->set_seq_id(1); return DecodeCall(c, r); }},
      {"LayerOutOfRange", C::kInvalidArgument, "layer",
       [](Cl& c, Harness&, R r) { r.set_layer(kLayers); return DecodeCall(c, r); }},
      {"EmptyBatch", C::kInvalidArgument, "items",
       [](Cl& c, Harness&, R r) { r.clear_items(); return DecodeCall(c, r); }},
      {"ZeroNewTokens", C::kInvalidArgument, "items[0].num_new_tokens",
       [](Cl& c, Harness&, R r) { r.mutable_items(0)->set_num_new_tokens(0); return PrefillCall(c, r); }},
      {"DecodeWithTwoTokens", C::kInvalidArgument, "items[0].num_new_tokens",
       [](Cl& c, Harness& h, R) { return DecodeCall(c, h.BuildAttention(0, {{1, 2}, {2, 1}}, false)); }},
      {"BatchAboveMaxBatchSize", C::kInvalidArgument, "max_batch_size",
       [](Cl& c, Harness&, R r) {
         for (uint64_t i = 0; i < kMaxBatch; ++i) {
           auto* item = r.add_items();
           item->set_seq_id(100 + i);
           item->set_num_new_tokens(1);
         }
         return DecodeCall(c, r);
       }},
      {"SequenceBeyondMaxSeqLen", C::kInvalidArgument, "max_seq_len",
       [](Cl& c, Harness& h, R) { return PrefillCall(c, h.BuildAttention(0, {{1, 1}, {2, 998}}, false)); }},
      // 48 pages of 4 tokens, 3 in use: sequence 1's 8 more tokens fit (2 pages), sequence 2's
      // 180 (45 pages) do not fit beside them: neither may grow.
      {"OutOfPagesFirstItemFits", C::kResourceExhausted, "free pages",
       [](Cl& c, Harness& h, R) { return PrefillCall(c, h.BuildAttention(1, {{1, 8}, {2, 180}}, false)); }},
      {"AppendUnknownSequence", C::kNotFound, "items[1].seq_id",
       [](Cl& c, Harness& h, R) { return AppendCall(c, h.BuildAppend(0, {{1, 3}, {42, 3}})); }},
      {"AppendWrongShape", C::kInvalidArgument, "k_new.shape",
       [](Cl& c, Harness& h, R) {
         v1::AppendRequest a = h.BuildAppend(0, {{1, 3}});
         a.mutable_k_new()->set_shape(0, 4);
         return AppendCall(c, a);
       }},
      // The CPU backend has no events; the CUDA backend has none of that name.
      {"UnusableEventSync", E2eBackend() == "cuda" ? C::kNotFound : C::kFailedPrecondition,
       "sync",
       [](Cl& c, Harness&, R r) { r.mutable_sync()->set_signal_event("e"); return DecodeCall(c, r); }},
  };
}

// Rows of sequence management: create, fork, truncate, release.
std::vector<Row> SequenceRows() {
  using C = absl::StatusCode;
  using R = v1::AttentionRequest;
  using Cl = client::Client;
  return {
      {"CreateDuplicateSequence", C::kAlreadyExists, "seq_id",
       [](Cl& c, Harness&, R) -> Call { return [&c] { return c.CreateSequence(0, 1).status(); }; }},
      {"CreateOnUnknownDevice", C::kInvalidArgument, "device",
       [](Cl& c, Harness&, R) -> Call { return [&c] { return c.CreateSequence(3, 77).status(); }; }},
      {"ForkOntoExistingChild", C::kAlreadyExists, "child_id",
       [](Cl& c, Harness&, R) -> Call { return [&c] { return c.ForkSequence(0, 1, 2).status(); }; }},
      {"ForkUnknownParent", C::kNotFound, "parent_id",
       [](Cl& c, Harness&, R) -> Call { return [&c] { return c.ForkSequence(0, 55, 56).status(); }; }},
      {"TruncateUnknownSequence", C::kNotFound, "seq_id",
       [](Cl& c, Harness&, R) -> Call { return [&c] { return c.TruncateSequence(0, 55, 1).status(); }; }},
      {"ReleaseUnknownSequence", C::kNotFound, "seq_id",
       [](Cl& c, Harness&, R) -> Call { return [&c] { return c.ReleaseSequence(0, 55).status(); }; }},
  };
}

// Rows of region management: register and unregister.
std::vector<Row> RegionRows() {
  using C = absl::StatusCode;
  using R = v1::AttentionRequest;
  using Cl = client::Client;
  return {
      {"RegisterDuplicateRegionName", C::kAlreadyExists, "name",
       [](Cl& c, Harness& h, R) -> Call {
         return [&c, &h] { return c.RegisterHostRegion(h.region(), h.buffer().key(), 0, 64); };
       }},
      {"RegisterMissingShmObject", C::kNotFound, "shm_key",
       [](Cl& c, Harness&, R) -> Call {
         return [&c] { return c.RegisterHostRegion("x", "/attnd-no-such-object", 0, 64); };
       }},
      {"RegisterRegionLargerThanObject", C::kInvalidArgument, "byte_size",
       [](Cl& c, Harness& h, R) -> Call {
         return [&c, &h] { return c.RegisterHostRegion("x", h.buffer().key(), 0, h.buffer().size() + 1); };
       }},
      {"RegisterRegionOffsetOverflow", C::kInvalidArgument, "overflow",
       [](Cl& c, Harness& h, R) -> Call {
         return [&c, &h] {
           return c.RegisterHostRegion("x", h.buffer().key(), std::numeric_limits<uint64_t>::max() - 8, 64);
         };
       }},
      // The CPU backend cannot open IPC handles; the CUDA backend rejects an all-zero one.
      {"RegisterCudaRegionWithoutAUsableHandle",
       E2eBackend() == "cuda" ? C::kInvalidArgument : C::kFailedPrecondition,
       E2eBackend() == "cuda" ? "ipc_handle" : "CPU backend",
       [](Cl& c, Harness&, R) -> Call {
         return [&c] { return c.RegisterCudaRegion("x", std::string(64, '\0'), 0, 64); };
       }},
      {"UnregisterUnknownRegion", C::kNotFound, "name",
       [](Cl& c, Harness&, R) -> Call { return [&c] { return c.UnregisterRegion("no-such-region"); }; }},
  };
}

// Rows of KV export and import.
std::vector<Row> KvTransferRows() {
  using C = absl::StatusCode;
  using R = v1::AttentionRequest;
  using Cl = client::Client;
  return {
      {"ExportMoreTokensThanHeld", C::kFailedPrecondition, "num_tokens",
       [](Cl& c, Harness& h, R r) -> Call {
         v1::ExportKvRequest e;
         e.set_seq_id(1);
         e.set_layer_begin(0);
         e.set_layer_end(1);
         e.set_head_begin(0);
         e.set_head_end(1);
         e.set_num_tokens(6);
         *e.mutable_dst() = client::MakeTensorRef(h.region(), r.out().offset(), v1::DTYPE_BFLOAT16,
                                                  {1, 2, 6, 1, kHeadDim});
         return [&c, e] { return c.ExportKv(e).status(); };
       }},
      {"ImportOverPartlyFilledLayer", C::kFailedPrecondition, "num_tokens",
       [](Cl& c, Harness& h, R r) -> Call {
         v1::ImportKvRequest e;
         e.set_seq_id(1);
         e.set_layer_begin(0);
         e.set_layer_end(1);
         e.set_head_begin(0);
         e.set_head_end(2);
         e.set_num_tokens(3);
         *e.mutable_src() = client::MakeTensorRef(h.region(), r.q().offset(), v1::DTYPE_BFLOAT16,
                                                  {1, 2, 3, 2, kHeadDim});
         return [&c, e] { return c.ImportKv(e).status(); };
       }},
  };
}

// Every row, in this order: tensors, batches, sequences, regions, KV transfers.
const std::vector<Row>& Rows() {
  static const auto* rows = [] {
    auto* all = new std::vector<Row>;
    for (std::vector<Row> (*part)() :
         {TensorRows, BatchRows, SequenceRows, RegionRows, KvTransferRows}) {
      std::vector<Row> p = part();
      all->insert(all->end(), std::make_move_iterator(p.begin()),
                  std::make_move_iterator(p.end()));
    }
    return all;
  }();
  return *rows;
}

TEST_F(BadInputTest, EveryRowIsRejectedWithItsCodeAndChangesNothing) {
  for (const Row& row : Rows()) {
    SCOPED_TRACE(row.name);
    const Call call = row.prepare(*client_, *harness_, ValidDecode());
    const Snapshot before = Take();
    const absl::Status status = call();
    EXPECT_EQ(status.code(), row.code) << status;
    EXPECT_NE(status.message().find(row.field), absl::string_view::npos)
        << "message does not name '" << row.field << "': " << status.message();
    const Snapshot after = Take();
    EXPECT_EQ(before.sequences, after.sequences);
    EXPECT_EQ(before.free_pages, after.free_pages);
    EXPECT_EQ(before.regions, after.regions);
    EXPECT_TRUE(before.bytes == after.bytes) << "the region's bytes changed";
  }
  // The server is still healthy and serves a valid request after all of that.
  EXPECT_TRUE(harness_->RunAttention(ValidDecode(), /*decode=*/true).ok());
}

TEST_F(BadInputTest, TheValidBaselineOfTheTableSucceeds) {
  // Guards the table: every row must differ from a request that works.
  const absl::Status s = harness_->RunAttention(ValidDecode(), /*decode=*/true);
  EXPECT_TRUE(s.ok()) << s;
}

}  // namespace
}  // namespace attnd::testing
