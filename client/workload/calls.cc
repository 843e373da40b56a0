#include "client/workload/calls.h"

#include "absl/random/distributions.h"
#include "absl/strings/str_format.h"
#include "client/tensor.h"

namespace attnd::workload {
namespace {

void AddItems(const Items& items, google::protobuf::RepeatedPtrField<v1::BatchItem>* out) {
  for (const auto& [seq, n] : items) {
    v1::BatchItem* item = out->Add();
    item->set_seq_id(seq->id);
    item->set_num_new_tokens(static_cast<uint32_t>(n));
  }
}

absl::Status WithLabel(const absl::Status& status, const std::string& label) {
  return absl::Status(status.code(), label + ": " + status.ToString());
}

}  // namespace

std::vector<float> RandomRounded(Session& s, size_t n) {
  std::vector<float> values(n);
  for (float& x : values)
    x = client::RoundToDType(s.model.dtype, absl::Gaussian<float>(s.rng, 0, 1));
  return values;
}

v1::AttentionRequest BuildAttention(const Session& s, uint32_t layer, const Items& items,
                                    const Slot& slot, bool want_lse) {
  const uint64_t t = TotalTokens(items);
  const uint64_t hq = s.model.qo_heads, hk = s.model.kv_heads, d = s.model.head_dim;
  const v1::DType dtype = s.model.dtype;
  v1::AttentionRequest request;
  request.set_device(s.options.device);
  request.set_layer(layer);
  AddItems(items, request.mutable_items());
  *request.mutable_q() = client::MakeTensorRef(s.region, slot.q, dtype, {t, hq, d});
  *request.mutable_k_new() = client::MakeTensorRef(s.region, slot.k, dtype, {t, hk, d});
  *request.mutable_v_new() = client::MakeTensorRef(s.region, slot.v, dtype, {t, hk, d});
  *request.mutable_out() = client::MakeTensorRef(s.region, slot.out, dtype, {t, hq, d});
  if (want_lse) {
    *request.mutable_lse() = client::MakeTensorRef(s.region, slot.lse, v1::DTYPE_FLOAT32, {t, hq});
  }
  return request;
}

absl::StatusOr<v1::AttentionResponse> CallAttention(Session& s, Op op, Transport transport,
                                                    const v1::AttentionRequest& request,
                                                    Latencies* latencies) {
  const Clock::time_point start = Clock::now();
  absl::StatusOr<v1::AttentionResponse> response;
  if (transport == Transport::kUnary) {
    response = op == Op::kPrefill ? s.client.Prefill(request) : s.client.Decode(request);
  } else {
    response = op == Op::kPrefill ? s.stream->Prefill(request) : s.stream->Decode(request);
  }
  const double seconds = SecondsSince(start);
  if (latencies != nullptr) latencies->Add(seconds);
  ++s.accounting.calls;
  if (response.ok()) {
    for (const v1::BatchItem& item : request.items()) s.accounting.tokens += item.num_new_tokens();
  }
  return response;
}

absl::Status AdvanceCopies(Session& s, const std::string& label, uint32_t layer, const Items& items,
                           const google::protobuf::RepeatedField<uint64_t>& lengths, const float* k,
                           const float* v) {
  const auto span = absl::MakeConstSpan(lengths.data(), lengths.size());
  if (k == nullptr || !s.model.fp8())
    return Advance(label, layer, items, span, k, v, s.model.kv_row());
  // fp8 pool: the copies keep what the pool holds.
  const int64_t n = TotalTokens(items) * s.model.kv_row();
  const std::vector<float> held_k = s.model.Held(k, n, layer, false);
  const std::vector<float> held_v = s.model.Held(v, n, layer, true);
  return Advance(label, layer, items, span, held_k.data(), held_v.data(), s.model.kv_row());
}

void VerifySlot(Session& s, const std::string& label, Op op, uint32_t layer, const Items& items,
                const float* q, const Slot& slot, bool want_lse) {
  const int64_t t = TotalTokens(items);
  const std::vector<float> out = s.buffers->ReadOut(slot, t);
  const std::vector<float> lse = want_lse ? s.buffers->ReadLse(slot, t) : std::vector<float>();
  s.verifier.Check(label, op, layer, items, q, out, lse);
}

absl::Status FreshAttention(Session& s, Op op, Transport transport, uint32_t layer,
                            const Items& items, bool want_lse) {
  const int64_t t = TotalTokens(items);
  const Slot& slot = s.buffers->main();
  const std::vector<float> q = RandomRounded(s, t * s.model.q_row());
  const std::vector<float> k = RandomRounded(s, t * s.model.kv_row());
  const std::vector<float> v = RandomRounded(s, t * s.model.kv_row());
  s.buffers->Write(slot.q, q);
  s.buffers->Write(slot.k, k);
  s.buffers->Write(slot.v, v);
  s.buffers->Poison(slot, t);
  const v1::AttentionRequest request = BuildAttention(s, layer, items, slot, want_lse);
  Latencies* latencies = op == Op::kPrefill               ? &s.accounting.prefill
                         : transport == Transport::kUnary ? &s.accounting.decode_unary
                                                          : &s.accounting.decode_stream;
  const std::string label =
      absl::StrFormat("%s%s layer %d (%d items, %d tokens)", OpName(op),
                      transport == Transport::kStream ? " via Stream" : "", layer, items.size(), t);
  absl::StatusOr<v1::AttentionResponse> response =
      CallAttention(s, op, transport, request, latencies);
  if (!response.ok()) return WithLabel(response.status(), label);
  if (absl::Status st =
          AdvanceCopies(s, label, layer, items, response->lengths(), k.data(), v.data());
      !st.ok()) {
    return st;
  }
  VerifySlot(s, label, op, layer, items, q.data(), slot, want_lse);
  return absl::OkStatus();
}

absl::Status FreshAppend(Session& s, uint32_t layer, const Items& items, bool fresh) {
  const uint64_t t = TotalTokens(items);
  const Slot& slot = s.buffers->main();
  std::vector<float> k, v;
  if (fresh) {
    k = RandomRounded(s, t * s.model.kv_row());
    v = RandomRounded(s, t * s.model.kv_row());
    s.buffers->Write(slot.k, k);
    s.buffers->Write(slot.v, v);
  }
  v1::AppendRequest request;
  request.set_device(s.options.device);
  request.set_layer(layer);
  AddItems(items, request.mutable_items());
  const uint64_t hk = s.model.kv_heads, d = s.model.head_dim;
  *request.mutable_k_new() = client::MakeTensorRef(s.region, slot.k, s.model.dtype, {t, hk, d});
  *request.mutable_v_new() = client::MakeTensorRef(s.region, slot.v, s.model.dtype, {t, hk, d});
  const std::string label =
      absl::StrFormat("Append layer %d (%d items, %d tokens)", layer, items.size(), t);
  const Clock::time_point start = Clock::now();
  absl::StatusOr<v1::AppendResponse> response = s.client.Append(request);
  s.accounting.append.Add(SecondsSince(start));
  ++s.accounting.calls;
  if (!response.ok()) return WithLabel(response.status(), label);
  s.accounting.tokens += t;
  return AdvanceCopies(s, label, layer, items, response->lengths(), fresh ? k.data() : nullptr,
                       fresh ? v.data() : nullptr);
}

}  // namespace attnd::workload
