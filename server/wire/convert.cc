#include "server/wire/convert.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace attnd::wire {
namespace {

constexpr char kVersion[] = "0.1.0";

v1::KvLayout ToWire(kernels::KvLayout layout) {
  return layout == kernels::KvLayout::kNHD ? v1::KV_LAYOUT_NHD : v1::KV_LAYOUT_HND;
}

std::vector<AppendItem> ToItems(const google::protobuf::RepeatedPtrField<v1::BatchItem>& items) {
  std::vector<AppendItem> out;
  out.reserve(items.size());
  for (const v1::BatchItem& item : items) {
    out.push_back({item.seq_id(), item.num_new_tokens()});
    if (item.has_expected_length()) {
      // Lengths past int64 cannot match any sequence; clamp so the check refuses them.
      out.back().expected_length = static_cast<int64_t>(
          std::min<uint64_t>(item.expected_length(), uint64_t{INT64_MAX}));
    }
  }
  return out;
}

EventNames ToEventNames(const v1::EventSync& sync) {
  return EventNames{sync.wait_event(), sync.signal_event()};
}

template <typename Req>
KvTransferCall ToTransfer(const Req& req, const v1::TensorRef& buffer) {
  KvTransferCall call;
  call.device = req.device();
  call.seq_id = req.seq_id();
  call.layer_begin = req.layer_begin();
  call.layer_end = req.layer_end();
  call.head_begin = req.head_begin();
  call.head_end = req.head_end();
  call.num_tokens = req.num_tokens();
  call.buffer = ToTensorName(buffer);
  call.sync = ToEventNames(req.sync());
  return call;
}

}  // namespace

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

v1::DType ToWire(kernels::DType dtype) {
  switch (dtype) {
    case kernels::DType::kFloat16:
      return v1::DTYPE_FLOAT16;
    case kernels::DType::kBFloat16:
      return v1::DTYPE_BFLOAT16;
    case kernels::DType::kFloat32:
      return v1::DTYPE_FLOAT32;
    case kernels::DType::kFloat8E4M3:  // pool storage only, never a tensor's dtype on the wire
      return v1::DTYPE_UNSPECIFIED;
  }
  return v1::DTYPE_UNSPECIFIED;
}

v1::KvCacheDType ToWire(kernels::KvStorage storage) {
  switch (storage) {
    case kernels::KvStorage::kModelDType:
      return v1::KV_CACHE_DTYPE_MODEL;
    case kernels::KvStorage::kFp8E4M3:
      return v1::KV_CACHE_DTYPE_FP8_E4M3;
    case kernels::KvStorage::kFp8E4M3PerToken:
      return v1::KV_CACHE_DTYPE_FP8_E4M3_PER_TOKEN;
  }
  return v1::KV_CACHE_DTYPE_MODEL;
}

std::optional<kernels::KvStorage> FromWire(v1::KvCacheDType storage) {
  switch (storage) {
    case v1::KV_CACHE_DTYPE_MODEL:
      return kernels::KvStorage::kModelDType;
    case v1::KV_CACHE_DTYPE_FP8_E4M3:
      return kernels::KvStorage::kFp8E4M3;
    case v1::KV_CACHE_DTYPE_FP8_E4M3_PER_TOKEN:
      return kernels::KvStorage::kFp8E4M3PerToken;
    default:
      return std::nullopt;
  }
}

std::optional<std::vector<kernels::KvScales>> ScalesFromWire(
    const google::protobuf::RepeatedField<float>& k, const google::protobuf::RepeatedField<float>& v,
    int64_t layers) {
  if (k.size() != layers || v.size() != layers) return std::nullopt;
  std::vector<kernels::KvScales> scales(static_cast<size_t>(layers));
  for (int i = 0; i < k.size(); ++i) scales[i] = kernels::KvScales{k[i], v[i]};
  return scales;
}

void ScalesToWire(absl::Span<const kernels::KvScales> scales,
                  google::protobuf::RepeatedField<float>* k,
                  google::protobuf::RepeatedField<float>* v) {
  for (const kernels::KvScales& s : scales) {
    k->Add(s.k);
    v->Add(s.v);
  }
}

absl::StatusOr<KvScalesCall> ToKvScalesCall(const v1::SetKvScalesRequest& req,
                                            const ModelShape& model) {
  const int n = req.k_scales_size();
  if (n < 1 || req.v_scales_size() != n)
    return absl::InvalidArgumentError(absl::StrCat(
        "k_scales, v_scales: ", n, " and ", req.v_scales_size(),
        " entries; give one k and one v scale per layer, at least one layer"));
  if (static_cast<int64_t>(req.layer_begin()) + n > model.num_layers)
    return absl::InvalidArgumentError(absl::StrCat(
        "layer_begin: layers [", req.layer_begin(), ", ", req.layer_begin() + int64_t{n},
        ") exceed the model's ", model.num_layers));
  KvScalesCall call;
  call.device = req.device();
  call.layer_begin = req.layer_begin();
  for (int i = 0; i < n; ++i) {
    const float k = req.k_scales(i), v = req.v_scales(i);
    for (const auto& [name, value] : {std::pair<const char*, float>{"k_scales", k}, {"v_scales", v}}) {
      if (!std::isfinite(value) || value <= 0.0f)
        return absl::InvalidArgumentError(absl::StrCat(name, "[", i, "] (layer ",
                                                       req.layer_begin() + int64_t{i}, "): ",
                                                       value, " must be finite and > 0"));
    }
    call.scales.push_back(kernels::KvScales{k, v});
  }
  return call;
}

std::optional<kernels::DType> FromWire(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT16:
      return kernels::DType::kFloat16;
    case v1::DTYPE_BFLOAT16:
      return kernels::DType::kBFloat16;
    case v1::DTYPE_FLOAT32:
      return kernels::DType::kFloat32;
    default:
      return std::nullopt;
  }
}

TensorName ToTensorName(const v1::TensorRef& ref) {
  TensorName name;
  name.region = ref.region();
  name.offset = ref.offset();
  name.dtype = FromWire(ref.dtype());
  name.shape.assign(ref.shape().begin(), ref.shape().end());
  return name;
}

AppendCall ToAppendCall(const v1::AppendRequest& req) {
  AppendCall call;
  call.device = req.device();
  call.layer = req.layer();
  call.items = ToItems(req.items());
  call.k_new = ToTensorName(req.k_new());
  call.v_new = ToTensorName(req.v_new());
  call.sync = ToEventNames(req.sync());
  return call;
}

AttentionCall ToAttentionCall(const v1::AttentionRequest& req) {
  AttentionCall call;
  call.device = req.device();
  call.layer = req.layer();
  call.items = ToItems(req.items());
  call.q = ToTensorName(req.q());
  call.k_new = ToTensorName(req.k_new());
  call.v_new = ToTensorName(req.v_new());
  call.out = ToTensorName(req.out());
  if (req.has_lse()) call.lse = ToTensorName(req.lse());
  call.deterministic = req.deterministic();
  call.sync = ToEventNames(req.sync());
  return call;
}

KvTransferCall ToTransferCall(const v1::ExportKvRequest& req) { return ToTransfer(req, req.dst()); }
KvTransferCall ToTransferCall(const v1::ImportKvRequest& req) { return ToTransfer(req, req.src()); }

HostRegionSpec ToHostRegionSpec(const v1::RegisterHostRegionRequest& req) {
  return HostRegionSpec{req.name(), req.shm_key(), req.offset(), req.byte_size()};
}

IpcRegionSpec ToIpcRegionSpec(const v1::RegisterCudaRegionRequest& req) {
  return IpcRegionSpec{req.name(), req.ipc_handle(), req.device(), req.byte_size()};
}

IpcEventSpec ToIpcEventSpec(const v1::RegisterCudaEventRequest& req) {
  return IpcEventSpec{req.name(), req.ipc_handle(), req.device()};
}

void FillServerInfo(const EngineInfo& info, v1::ServerInfo* out) {
  const ModelShape& m = info.model;
  out->set_version(kVersion);
  out->set_backend(info.cuda ? v1::BACKEND_CUDA : v1::BACKEND_CPU);
  v1::ModelConfig* model = out->mutable_model();
  model->set_num_layers(static_cast<uint32_t>(m.num_layers));
  model->set_num_qo_heads(static_cast<uint32_t>(m.num_qo_heads));
  model->set_num_kv_heads(static_cast<uint32_t>(m.num_kv_heads));
  model->set_head_dim(static_cast<uint32_t>(m.head_dim));
  model->set_dtype(ToWire(m.dtype));
  model->set_page_size(static_cast<uint32_t>(m.page_size));
  model->set_kv_layout(ToWire(m.layout));
  model->set_sm_scale(m.sm_scale);
  model->set_logits_soft_cap(m.logits_soft_cap);
  model->set_window_left(static_cast<int32_t>(m.window_left));
  model->set_kv_cache_dtype(ToWire(m.kv_storage));
  for (const DeviceState& device : info.devices) {
    v1::DeviceInfo* d = out->add_devices();
    d->set_device(static_cast<uint32_t>(device.device));
    d->set_name(device.name);
    d->set_total_pages(static_cast<uint64_t>(device.total_pages));
    d->set_free_pages(static_cast<uint64_t>(device.free_pages));
    d->set_live_sequences(static_cast<uint64_t>(device.live_sequences));
    d->set_serving(device.serving);
    d->set_pool_bytes(static_cast<uint64_t>(device.pool_bytes));
    ScalesToWire(device.kv_scales, d->mutable_k_scales(), d->mutable_v_scales());
  }
  for (int64_t b : info.graph_buckets) out->add_graph_buckets(static_cast<uint32_t>(b));
  out->set_max_batch_size(static_cast<uint32_t>(info.max_batch_size));
  out->set_max_seq_len(static_cast<uint64_t>(info.max_seq_len));
  out->set_max_tokens_per_request(static_cast<uint64_t>(info.max_tokens_per_request));
  for (const std::string& f : info.features) out->add_features(f);
}

void FillSequenceInfo(const SequenceState& state, v1::SequenceInfo* out) {
  out->set_device(static_cast<uint32_t>(state.device));
  out->set_seq_id(state.seq_id);
  out->clear_layer_lengths();
  for (int64_t len : state.layer_lengths) out->add_layer_lengths(static_cast<uint64_t>(len));
  out->set_num_pages(state.num_pages);
  out->set_shared_pages(state.shared_pages);
}

void FillRegions(const std::vector<RegionSummary>& regions, v1::ListRegionsResponse* out) {
  for (const RegionSummary& s : regions) {
    v1::RegionInfo* r = out->add_regions();
    r->set_name(s.name);
    r->set_kind(s.kind == Region::Kind::kHost ? v1::RegionInfo::KIND_HOST
                                              : v1::RegionInfo::KIND_CUDA);
    r->set_device(s.device);
    r->set_byte_size(s.byte_size);
    r->set_shm_key(s.shm_key);
    r->set_shm_offset(s.shm_offset);
    r->set_in_flight(static_cast<uint32_t>(s.in_flight));
  }
}

void FillStats(const StatsSnapshot& stats, v1::Stats* out) {
  out->set_uptime_seconds(stats.uptime_seconds);
  for (const StatsSnapshot::Rpc& rpc : stats.rpcs) {
    v1::RpcStats* r = out->add_rpcs();
    r->set_rpc(rpc.rpc);
    r->set_code(rpc.code);
    r->set_count(rpc.count);
    r->set_total_seconds(rpc.total_seconds);
  }
  for (const StatsSnapshot::Device& device : stats.devices) {
    v1::DeviceStats* d = out->add_devices();
    d->set_device(static_cast<uint32_t>(device.device));
    d->set_total_pages(device.total_pages);
    d->set_used_pages(device.used_pages);
    d->set_live_sequences(device.live_sequences);
    d->set_tokens_appended(device.tokens_appended);
    d->set_attention_queries(device.attention_queries);
  }
}

void FillLengths(const DataResult& result, google::protobuf::RepeatedField<uint64_t>* out) {
  out->Add(result.lengths.begin(), result.lengths.end());
}

void FillLease(const LeaseState& lease, const ServerConfig& config, v1::LeaseInfo* out) {
  out->set_client(lease.client);
  out->set_sequences(static_cast<uint64_t>(lease.sequences));
  out->set_pages(static_cast<uint64_t>(lease.pages));
  out->set_regions(static_cast<uint64_t>(lease.regions));
  out->set_region_bytes(static_cast<uint64_t>(lease.region_bytes));
  out->set_events(static_cast<uint64_t>(lease.events));
  out->set_max_sequences(static_cast<uint64_t>(config.max_sequences_per_client));
  out->set_max_pages(static_cast<uint64_t>(config.max_pages_per_client));
  out->set_max_regions(static_cast<uint64_t>(config.max_regions_per_client));
  out->set_max_region_bytes(static_cast<uint64_t>(config.max_region_bytes_per_client));
  out->set_lease_timeout_s(config.lease_timeout_s);
}

}  // namespace attnd::wire
