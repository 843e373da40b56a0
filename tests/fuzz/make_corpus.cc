// Writes request_fuzzer's seed corpus: a few small valid requests of each kind against the
// fuzzed engine's starting state (request_kinds.h), each file the kind's byte followed by the
// serialized message. tests/fuzz/corpus/ is this program's output, checked in;
// scripts/fuzz.sh fails when the two differ.
//
//   request_fuzzer_corpus DIR
#include <cstdio>
#include <fstream>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>

#include "attnd/v1/attention.pb.h"
#include "google/protobuf/message_lite.h"
#include "tests/fuzz/request_kinds.h"

namespace attnd::fuzz {
namespace {

// Where seeds put each tensor in the fuzzer's region: room for 8 tokens each.
constexpr uint64_t kQ = 0, kK = 4096, kV = 8192, kOut = 12288, kLse = 16384, kKv = 20480;

std::string g_dir;
bool g_failed = false;

void Write(Kind kind, const char* name, const google::protobuf::MessageLite& msg) {
  const std::string path = g_dir + "/" + name;
  std::ofstream out(path, std::ios::binary);
  out.put(static_cast<char>(kind));
  out << msg.SerializeAsString();
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    g_failed = true;
  }
}

v1::TensorRef Ref(uint64_t offset, v1::DType dtype, std::initializer_list<uint64_t> shape) {
  v1::TensorRef ref;
  ref.set_region(kRegion);
  ref.set_offset(offset);
  ref.set_dtype(dtype);
  for (uint64_t d : shape) ref.add_shape(d);
  return ref;
}

// {seq_id, num_new_tokens} of each item.
using Items = std::initializer_list<std::pair<uint64_t, uint32_t>>;

v1::AttentionRequest Attention(uint32_t layer, Items items, bool lse) {
  v1::AttentionRequest req;
  req.set_layer(layer);
  uint64_t t = 0;
  for (const auto& [id, n] : items) {
    v1::BatchItem* item = req.add_items();
    item->set_seq_id(id);
    item->set_num_new_tokens(n);
    t += n;
  }
  *req.mutable_q() = Ref(kQ, v1::DTYPE_BFLOAT16, {t, kQoHeads, kHeadDim});
  *req.mutable_k_new() = Ref(kK, v1::DTYPE_BFLOAT16, {t, kKvHeads, kHeadDim});
  *req.mutable_v_new() = Ref(kV, v1::DTYPE_BFLOAT16, {t, kKvHeads, kHeadDim});
  *req.mutable_out() = Ref(kOut, v1::DTYPE_BFLOAT16, {t, kQoHeads, kHeadDim});
  if (lse) *req.mutable_lse() = Ref(kLse, v1::DTYPE_FLOAT32, {t, kQoHeads});
  return req;
}

v1::AppendRequest Append(uint32_t layer, Items items) {
  const v1::AttentionRequest a = Attention(layer, items, false);
  v1::AppendRequest req;
  req.set_layer(layer);
  *req.mutable_items() = a.items();
  *req.mutable_k_new() = a.k_new();
  *req.mutable_v_new() = a.v_new();
  return req;
}

template <typename Req>
Req Transfer(uint64_t seq, uint32_t heads_begin, uint32_t heads_end, uint64_t tokens) {
  Req req;
  req.set_seq_id(seq);
  req.set_layer_begin(0);
  req.set_layer_end(kLayers);
  req.set_head_begin(heads_begin);
  req.set_head_end(heads_end);
  req.set_num_tokens(tokens);
  const uint64_t heads = heads_end - heads_begin;
  v1::TensorRef buffer = Ref(kKv, v1::DTYPE_BFLOAT16, {kLayers, 2, tokens, heads, kHeadDim});
  if constexpr (std::is_same_v<Req, v1::ExportKvRequest>) {
    *req.mutable_dst() = buffer;
  } else {
    *req.mutable_src() = buffer;
  }
  return req;
}

void DataSeeds() {
  Write(Kind::kAppend, "append-1", Append(0, {{kEmptySeq, 3}}));
  v1::AppendRequest expected = Append(1, {{kFilledSeq, 2}, {kEmptySeq, 1}});
  expected.mutable_items(0)->set_expected_length(kFilledTokens);
  Write(Kind::kAppend, "append-2", expected);
  Write(Kind::kPrefill, "prefill-1", Attention(0, {{kEmptySeq, 4}}, /*lse=*/true));
  v1::AttentionRequest batch = Attention(1, {{kEmptySeq, 3}, {kFilledSeq, 2}}, false);
  batch.set_deterministic(true);
  Write(Kind::kPrefill, "prefill-2", batch);
  Write(Kind::kDecode, "decode-1", Attention(0, {{kFilledSeq, 1}}, false));
  Write(Kind::kDecode, "decode-2", Attention(1, {{kFilledSeq, 1}, {kEmptySeq, 1}}, true));
  v1::StreamRequest stream;
  stream.set_tag(7);
  *stream.mutable_append() = Append(1, {{kFilledSeq, 1}});
  Write(Kind::kStream, "stream-append", stream);
  *stream.mutable_prefill() = Attention(0, {{kEmptySeq, 2}}, true);
  Write(Kind::kStream, "stream-prefill", stream);
  *stream.mutable_decode() = Attention(1, {{kFilledSeq, 1}}, false);
  Write(Kind::kStream, "stream-decode", stream);
  Write(Kind::kExportKv, "export-1", Transfer<v1::ExportKvRequest>(kFilledSeq, 0, kKvHeads, 5));
  Write(Kind::kExportKv, "export-2", Transfer<v1::ExportKvRequest>(kFilledSeq, 1, 2, 3));
  Write(Kind::kImportKv, "import-1", Transfer<v1::ImportKvRequest>(kEmptySeq, 0, kKvHeads, 6));
  Write(Kind::kImportKv, "import-2", Transfer<v1::ImportKvRequest>(kFilledSeq, 0, 1, 5));
}

void ControlSeeds() {
  v1::RegisterHostRegionRequest host;
  host.set_name("x");
  host.set_shm_key("/attnd-x");
  host.set_byte_size(4096);
  Write(Kind::kRegisterHostRegion, "register-host", host);
  v1::RegisterCudaRegionRequest cuda;
  cuda.set_name("c");
  cuda.set_ipc_handle(std::string(64, '\1'));
  cuda.set_byte_size(4096);
  Write(Kind::kRegisterCudaRegion, "register-cuda", cuda);
  v1::RegisterCudaEventRequest event;
  event.set_name("e");
  event.set_ipc_handle(std::string(64, '\2'));
  Write(Kind::kRegisterCudaEvent, "register-event", event);
  v1::UnregisterRegionRequest unregister;
  unregister.set_name(kRegion);
  Write(Kind::kUnregisterRegion, "unregister-io", unregister);
  v1::UnregisterCudaEventRequest unregister_event;
  unregister_event.set_name("e");
  Write(Kind::kUnregisterCudaEvent, "unregister-event", unregister_event);
  v1::CreateSequenceRequest create;
  create.set_seq_id(3);
  Write(Kind::kCreateSequence, "create", create);
  v1::ForkSequenceRequest fork;
  fork.set_parent_id(kFilledSeq);
  fork.set_child_id(3);
  Write(Kind::kForkSequence, "fork", fork);
  v1::TruncateSequenceRequest truncate;
  truncate.set_seq_id(kFilledSeq);
  truncate.set_length(3);
  Write(Kind::kTruncateSequence, "truncate", truncate);
  v1::ReleaseSequenceRequest release;
  release.set_seq_id(kFilledSeq);
  Write(Kind::kReleaseSequence, "release", release);
  v1::GetSequenceRequest get;
  get.set_seq_id(kFilledSeq);
  Write(Kind::kGetSequence, "get", get);
  Write(Kind::kListSequences, "list", v1::ListSequencesRequest());
}

}  // namespace
}  // namespace attnd::fuzz

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  attnd::fuzz::g_dir = argv[1];
  attnd::fuzz::DataSeeds();
  attnd::fuzz::ControlSeeds();
  return attnd::fuzz::g_failed ? 1 : 0;
}
