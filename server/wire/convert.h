// protobuf <-> the engine's plain C++ calls and results. Conversion only: the engine checks
// every limit and names the field in its messages, using the wire's field names.
#ifndef ATTND_SERVER_WIRE_CONVERT_H_
#define ATTND_SERVER_WIRE_CONVERT_H_

#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "attnd/v1/attention.pb.h"
#include "grpcpp/support/status.h"
#include "kernels/paged_kv.h"
#include "server/engine/calls.h"
#include "server/metrics/metrics.h"
#include "server/regions/region.h"

namespace attnd::wire {

grpc::Status ToGrpc(const absl::Status& status);

v1::DType ToWire(kernels::DType dtype);
// nullopt for DTYPE_UNSPECIFIED and values this server does not know.
std::optional<kernels::DType> FromWire(v1::DType dtype);

TensorName ToTensorName(const v1::TensorRef& ref);
AppendCall ToAppendCall(const v1::AppendRequest& req);
AttentionCall ToAttentionCall(const v1::AttentionRequest& req);
KvTransferCall ToTransferCall(const v1::ExportKvRequest& req);
KvTransferCall ToTransferCall(const v1::ImportKvRequest& req);
HostRegionSpec ToHostRegionSpec(const v1::RegisterHostRegionRequest& req);
IpcRegionSpec ToIpcRegionSpec(const v1::RegisterCudaRegionRequest& req);
IpcEventSpec ToIpcEventSpec(const v1::RegisterCudaEventRequest& req);

// SetKvScales's layers and scales. Unlike the other conversions it checks the request's form
// here (counts equal and >= 1, layers inside the model, scales finite and > 0: INVALID_ARGUMENT
// naming the field and index), so the engine sees only well-formed scales; the engine checks
// them against the device's state (fp8 pool, no KV at those layers).
struct KvScalesCall {
  uint32_t device = 0;
  int64_t layer_begin = 0;
  std::vector<kernels::KvScales> scales;
};
absl::StatusOr<KvScalesCall> ToKvScalesCall(const v1::SetKvScalesRequest& req,
                                            const ModelShape& model);

v1::KvCacheDType ToWire(kernels::KvStorage storage);
// nullopt for values this server does not know (a newer peer's storage).
std::optional<kernels::KvStorage> FromWire(v1::KvCacheDType storage);
// The scales of `layers` layers from parallel k/v lists (an OpenKvPullResponse's): nullopt
// unless both lists have exactly `layers` entries.
std::optional<std::vector<kernels::KvScales>> ScalesFromWire(
    const google::protobuf::RepeatedField<float>& k, const google::protobuf::RepeatedField<float>& v,
    int64_t layers);
void ScalesToWire(absl::Span<const kernels::KvScales> scales,
                  google::protobuf::RepeatedField<float>* k,
                  google::protobuf::RepeatedField<float>* v);

void FillServerInfo(const EngineInfo& info, v1::ServerInfo* out);
void FillSequenceInfo(const SequenceState& state, v1::SequenceInfo* out);
void FillRegions(const std::vector<RegionSummary>& regions, v1::ListRegionsResponse* out);
void FillStats(const StatsSnapshot& stats, v1::Stats* out);
void FillLease(const LeaseState& lease, const ServerConfig& config, v1::LeaseInfo* out);
void FillLengths(const DataResult& result, google::protobuf::RepeatedField<uint64_t>* out);

}  // namespace attnd::wire

#endif  // ATTND_SERVER_WIRE_CONVERT_H_
