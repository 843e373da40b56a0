#include "testing/harness.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "client/half.h"
#include "client/reference.h"
#include "client/tensor.h"

namespace attnd::testing {
namespace {

// Appends what a per-token fp8 pool holds of the row values[begin, begin + n) to `held`.
void AppendTokenScaledRow(const std::vector<float>& values, uint64_t begin, uint64_t n,
                          std::vector<float>* held) {
  float amax = 0.0f;
  for (uint64_t i = begin; i < begin + n; ++i) amax = std::fmax(amax, std::fabs(values[i]));
  const float scale = amax > 0.0f ? amax / 448.0f : 1.0f;
  for (uint64_t i = begin; i < begin + n; ++i)
    held->push_back(scale *
                    client::Fp8E4M3BitsToFloat(client::FloatToFp8E4M3Bits(values[i] / scale)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Harness>> Harness::Create(client::Client* c,
                                                         std::string region_name,
                                                         uint32_t device, uint64_t max_tokens,
                                                         uint64_t seed) {
  auto info = c->GetServerInfo();
  if (!info.ok()) return info.status();
  const v1::ModelConfig& m = info->model();
  const uint64_t elem = client::DTypeSize(m.dtype());
  const uint64_t bytes = max_tokens * (2 * m.num_qo_heads() + 2 * m.num_kv_heads()) *
                             m.head_dim() * elem +
                         max_tokens * m.num_qo_heads() * 4 + 5 * 4096;
  auto buffer = client::SharedMemoryBuffer::Create(client::SharedMemoryBuffer::UniqueKey("e2e"),
                                                   bytes);
  if (!buffer.ok()) return buffer.status();
  if (absl::Status s = c->RegisterHostRegion(region_name, (*buffer)->key(), 0, bytes); !s.ok())
    return s;
  return std::unique_ptr<Harness>(new Harness(c, *std::move(info), std::move(region_name), device,
                                              *std::move(buffer), max_tokens, seed));
}

Harness::Harness(client::Client* c, v1::ServerInfo info, std::string region, uint32_t device,
                 std::unique_ptr<client::SharedMemoryBuffer> buffer, uint64_t max_tokens,
                 uint64_t seed)
    : client_(c), info_(std::move(info)), region_(std::move(region)), device_(device),
      buffer_(std::move(buffer)), rng_(seed) {
  const v1::ModelConfig& m = info_.model();
  const uint64_t elem = client::DTypeSize(m.dtype());
  client::RegionAllocator alloc(buffer_->size());
  layout_.q = *alloc.Allocate(max_tokens * m.num_qo_heads() * m.head_dim() * elem);
  layout_.k = *alloc.Allocate(max_tokens * m.num_kv_heads() * m.head_dim() * elem);
  layout_.v = *alloc.Allocate(max_tokens * m.num_kv_heads() * m.head_dim() * elem);
  layout_.out = *alloc.Allocate(max_tokens * m.num_qo_heads() * m.head_dim() * elem);
  layout_.lse = *alloc.Allocate(max_tokens * m.num_qo_heads() * 4);
}

Harness::~Harness() {
  if (!unregister_on_destroy_) return;
  // Bounded: the server may already be gone.
  client::CallOptions call;
  call.timeout = absl::Seconds(1);
  (void)client_->UnregisterRegion(region_, call);
}

double Harness::tolerance() const {
  switch (info_.model().dtype()) {
    case v1::DTYPE_FLOAT32:
      return 1e-4;
    case v1::DTYPE_FLOAT16:
      return 2e-3;
    default:
      return 1e-2;
  }
}

absl::Status Harness::CreateSequence(uint64_t seq_id) {
  auto info = client_->CreateSequence(device_, seq_id);
  if (!info.ok()) return info.status();
  History& h = history_[seq_id];
  h.k.assign(info_.model().num_layers(), {});
  h.v.assign(info_.model().num_layers(), {});
  return absl::OkStatus();
}

absl::Status Harness::SetKvScales(uint32_t layer_begin, const std::vector<float>& k_scales,
                                  const std::vector<float>& v_scales) {
  if (absl::Status s = client_->SetKvScales(device_, layer_begin, k_scales, v_scales); !s.ok())
    return s;
  auto info = client_->GetServerInfo();
  if (!info.ok()) return info.status();
  info_ = *std::move(info);
  return absl::OkStatus();
}

float Harness::Held(float value, uint32_t layer, int kv) const {
  if (info_.model().kv_cache_dtype() != v1::KV_CACHE_DTYPE_FP8_E4M3) return value;
  for (const v1::DeviceInfo& d : info_.devices()) {
    if (d.device() != device_) continue;
    const float scale = kv == 0 ? d.k_scales(static_cast<int>(layer))
                                : d.v_scales(static_cast<int>(layer));
    return scale * client::Fp8E4M3BitsToFloat(client::FloatToFp8E4M3Bits(value / scale));
  }
  return value;
}

void Harness::Record(uint64_t seq_id, uint32_t layer, uint64_t offset, uint64_t n) {
  History& h = history_[seq_id];
  if (info_.model().kv_cache_dtype() == v1::KV_CACHE_DTYPE_FP8_E4M3_PER_TOKEN) {
    const uint64_t d = info_.model().head_dim();  // offset and n are whole rows
    for (uint64_t row = offset; row < offset + n; row += d) {
      AppendTokenScaledRow(last_k_, row, d, &h.k[layer]);
      AppendTokenScaledRow(last_v_, row, d, &h.v[layer]);
    }
    return;
  }
  for (uint64_t i = offset; i < offset + n; ++i) {
    h.k[layer].push_back(Held(last_k_[i], layer, 0));
    h.v[layer].push_back(Held(last_v_[i], layer, 1));
  }
}

std::vector<float> Harness::RandomRows(uint64_t rows, uint64_t heads) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> out(rows * heads * info_.model().head_dim());
  for (float& x : out) x = client::RoundToDType(info_.model().dtype(), dist(rng_));
  return out;
}

void Harness::Write(uint64_t offset, const std::vector<float>& values) {
  client::EncodeFloats(info_.model().dtype(), values,
                       static_cast<uint8_t*>(buffer_->data()) + offset);
}

std::vector<float> Harness::Read(uint64_t offset, uint64_t count, v1::DType dtype) const {
  std::vector<float> out(count);
  client::DecodeFloats(dtype, static_cast<const uint8_t*>(buffer_->data()) + offset,
                       absl::MakeSpan(out));
  return out;
}

v1::AttentionRequest Harness::BuildAttention(uint32_t layer, const std::vector<Item>& items,
                                             bool with_lse) {
  const v1::ModelConfig& m = info_.model();
  uint64_t total = 0;
  v1::AttentionRequest req;
  req.set_device(device_);
  req.set_layer(layer);
  for (const Item& item : items) {
    v1::BatchItem* b = req.add_items();
    b->set_seq_id(item.seq_id);
    b->set_num_new_tokens(item.num_new_tokens);
    total += item.num_new_tokens;
  }
  last_q_ = RandomRows(total, m.num_qo_heads());
  last_k_ = RandomRows(total, m.num_kv_heads());
  last_v_ = RandomRows(total, m.num_kv_heads());
  Write(layout_.q, last_q_);
  Write(layout_.k, last_k_);
  Write(layout_.v, last_v_);
  // Poison: NaN in every output element, so an element the server skips fails the check.
  const uint64_t elem = client::DTypeSize(m.dtype());
  std::memset(static_cast<uint8_t*>(buffer_->data()) + layout_.out, 0xff,
              total * m.num_qo_heads() * m.head_dim() * elem);
  std::memset(static_cast<uint8_t*>(buffer_->data()) + layout_.lse, 0xff,
              total * m.num_qo_heads() * 4);
  *req.mutable_q() = client::MakeTensorRef(region_, layout_.q, m.dtype(),
                                           {total, m.num_qo_heads(), m.head_dim()});
  *req.mutable_k_new() = client::MakeTensorRef(region_, layout_.k, m.dtype(),
                                               {total, m.num_kv_heads(), m.head_dim()});
  *req.mutable_v_new() = client::MakeTensorRef(region_, layout_.v, m.dtype(),
                                               {total, m.num_kv_heads(), m.head_dim()});
  *req.mutable_out() = client::MakeTensorRef(region_, layout_.out, m.dtype(),
                                             {total, m.num_qo_heads(), m.head_dim()});
  if (with_lse)
    *req.mutable_lse() =
        client::MakeTensorRef(region_, layout_.lse, v1::DTYPE_FLOAT32, {total, m.num_qo_heads()});
  return req;
}

v1::AppendRequest Harness::BuildAppend(uint32_t layer, const std::vector<Item>& items) {
  v1::AttentionRequest a = BuildAttention(layer, items, false);
  v1::AppendRequest req;
  req.set_device(a.device());
  req.set_layer(a.layer());
  *req.mutable_items() = a.items();
  *req.mutable_k_new() = a.k_new();
  *req.mutable_v_new() = a.v_new();
  return req;
}

absl::Status Harness::RunAppend(const v1::AppendRequest& request) {
  auto resp = client_->Append(request);
  if (!resp.ok()) return resp.status();
  const uint64_t row = info_.model().num_kv_heads() * info_.model().head_dim();
  uint64_t offset = 0;
  for (const v1::BatchItem& item : request.items()) {
    const uint64_t n = item.num_new_tokens() * row;
    Record(item.seq_id(), request.layer(), offset, n);
    offset += n;
  }
  return absl::OkStatus();
}

absl::Status Harness::RunAttention(const v1::AttentionRequest& request, bool decode, Path path,
                                   client::DataStream* stream) {
  absl::StatusOr<v1::AttentionResponse> resp;
  if (path == Path::kStream) {
    resp = decode ? stream->Decode(request) : stream->Prefill(request);
  } else {
    resp = decode ? client_->Decode(request) : client_->Prefill(request);
  }
  if (!resp.ok()) return resp.status();
  const uint64_t row = info_.model().num_kv_heads() * info_.model().head_dim();
  uint64_t offset = 0;
  for (int i = 0; i < request.items_size(); ++i) {
    const v1::BatchItem& item = request.items(i);
    const uint64_t n = item.num_new_tokens() * row;
    Record(item.seq_id(), request.layer(), offset, n);
    offset += n;
    const uint64_t held = history_[item.seq_id()].k[request.layer()].size() / row;
    if (resp->lengths(i) != held)
      return absl::InternalError(absl::StrCat("items[", i, "]: server length ", resp->lengths(i),
                                              ", client history ", held));
  }
  return Check(request, last_q_);
}

absl::Status Harness::Check(const v1::AttentionRequest& request, const std::vector<float>& q) {
  const v1::ModelConfig& m = info_.model();
  const client::AttentionParams params = client::ParamsFromModel(m);
  const uint64_t q_row = m.num_qo_heads() * m.head_dim();
  const uint64_t kv_row = m.num_kv_heads() * m.head_dim();
  uint64_t total = 0;
  for (const v1::BatchItem& item : request.items()) total += item.num_new_tokens();
  const std::vector<float> out = Read(layout_.out, total * q_row, m.dtype());
  const std::vector<float> lse = Read(layout_.lse, total * m.num_qo_heads(), v1::DTYPE_FLOAT32);
  uint64_t row = 0;
  for (int i = 0; i < request.items_size(); ++i) {
    const v1::BatchItem& item = request.items(i);
    const History& h = history_[item.seq_id()];
    const auto& k = h.k[request.layer()];
    const auto& v = h.v[request.layer()];
    const int64_t n = item.num_new_tokens();
    const int64_t kv_len = static_cast<int64_t>(k.size() / kv_row);
    std::vector<double> ref_out(n * q_row), ref_lse(n * m.num_qo_heads());
    client::DenseAttentionReference(params, q.data() + row * q_row, n, k.data(), v.data(), kv_len,
                                    ref_out.data(), ref_lse.data());
    const double err = client::RelativeL2Error(
        absl::MakeConstSpan(out.data() + row * q_row, n * q_row), ref_out);
    max_error_ = std::max(max_error_, err);
    if (!(err < tolerance()))
      return absl::InternalError(absl::StrCat("items[", i, "] seq ", item.seq_id(),
                                              ": relative error ", err, " >= ", tolerance()));
    if (!request.lse().region().empty()) {
      const double lse_err = client::MaxAbsError(
          absl::MakeConstSpan(lse.data() + row * m.num_qo_heads(), n * m.num_qo_heads()),
          ref_lse);
      if (!(lse_err < 1e-2))
        return absl::InternalError(
            absl::StrCat("items[", i, "] seq ", item.seq_id(), ": lse error ", lse_err));
    }
    row += static_cast<uint64_t>(n);
  }
  return absl::OkStatus();
}

absl::Status Harness::Attend(uint32_t layer, const std::vector<Item>& items, bool decode,
                             bool with_lse, Path path, client::DataStream* stream) {
  return RunAttention(BuildAttention(layer, items, with_lse), decode, path, stream);
}

void Harness::ForkHistory(uint64_t parent, uint64_t child) { history_[child] = history_[parent]; }

void Harness::TruncateHistory(uint64_t seq_id, uint64_t length) {
  const uint64_t row = info_.model().num_kv_heads() * info_.model().head_dim();
  History& h = history_[seq_id];
  for (auto* side : {&h.k, &h.v}) {
    for (auto& layer : *side) {
      if (layer.size() > length * row) layer.resize(length * row);
    }
  }
}

uint64_t Harness::HistoryLength(uint64_t seq_id, uint32_t layer) const {
  const uint64_t row = info_.model().num_kv_heads() * info_.model().head_dim();
  return history_.at(seq_id).k[layer].size() / row;
}

void Harness::SetHistory(uint64_t seq_id, uint32_t layer, std::vector<float> k,
                         std::vector<float> v) {
  History& h = history_[seq_id];
  if (h.k.empty()) {
    h.k.assign(info_.model().num_layers(), {});
    h.v.assign(info_.model().num_layers(), {});
  }
  h.k[layer] = std::move(k);
  h.v[layer] = std::move(v);
}

}  // namespace attnd::testing
