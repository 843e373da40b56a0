#include "server/wire/service.h"

#include <memory>
#include <string>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/time/time.h"
#include "server/wire/calls.h"
#include "server/wire/convert.h"
#include "server/wire/stream_reactor.h"
#include "spdlog/spdlog.h"

namespace attnd {

namespace wire {

void FinishUnary(grpc::ServerUnaryReactor* reactor, Metrics* metrics, const char* rpc,
                 Clock::time_point start, const absl::Status& status) {
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (spdlog::should_log(spdlog::level::trace))
    spdlog::trace("rpc={} handled_us={:.1f}", rpc, seconds * 1e6);
  metrics->RecordRpc(rpc, status.code(), seconds);
  if (!status.ok())
    // Messages quote the client's names and keys: escaped, they cannot forge a log line.
    spdlog::debug("rpc={} code={} msg=\"{}\"", rpc, absl::StatusCodeToString(status.code()),
                  absl::CHexEscape(status.message()));
  reactor->Finish(ToGrpc(status));
}

}  // namespace wire

namespace {

using wire::Clock;

// A unary call in flight: its reactor, and what finishing it needs.
struct UnaryCall {
  grpc::ServerUnaryReactor* reactor;
  Metrics* metrics;
  const char* rpc;
  Clock::time_point start;

  void Finish(const absl::Status& status) const {
    wire::FinishUnary(reactor, metrics, rpc, start, status);
  }
};

UnaryCall StartUnary(grpc::CallbackServerContext* ctx, Metrics* metrics, const char* rpc) {
  return UnaryCall{ctx->DefaultReactor(), metrics, rpc, Clock::now()};
}

// Answers a call whose work ran on the gRPC thread.
grpc::ServerUnaryReactor* Answer(const UnaryCall& call, const absl::Status& status) {
  call.Finish(status);
  return call.reactor;
}

// The engine's reply of a call without a result.
Engine::Done FinishWith(UnaryCall call) {
  return [call](absl::Status status) { call.Finish(status); };
}

// The engine's reply of a call with a result: `fill` writes it into the response.
template <typename T, typename Fill>
Engine::Reply<T> FillThenFinish(UnaryCall call, Fill fill) {
  return [call, fill = std::move(fill)](absl::StatusOr<T> result) {
    if (result.ok()) fill(*result);
    call.Finish(result.status());
  };
}

// A data call (Append, Prefill, Decode): its stage trace lives here until the reply is handed
// to gRPC, and the engine stamps it on the way.
struct DataCall {
  UnaryCall call;
  RequestTrace trace;
};

template <typename Resp>
Engine::Reply<DataResult> FinishData(std::unique_ptr<DataCall> data, Resp* resp) {
  return [data = std::move(data), resp](absl::StatusOr<DataResult> result) {
    if (result.ok()) wire::FillLengths(*result, resp->mutable_lengths());
    data->call.Finish(result.status());
    // Recorded after Finish, off the reply's path.
    data->trace.handed = Clock::now();
    data->call.metrics->RecordStages(data->call.rpc, data->trace);
  };
}

// The call's deadline, for the engine to drop a call that expired while queued. (Cancellation
// needs a reactor of our own: the callback API lets IsCancelled be read only in OnCancel/OnDone.)
CallLife LifeOf(const grpc::CallbackServerContext* ctx) {
  CallLife life;
  const std::chrono::system_clock::time_point deadline = ctx->deadline();
  if (deadline != std::chrono::system_clock::time_point::max())
    life.deadline = absl::FromChrono(deadline);
  return life;
}

std::unique_ptr<DataCall> StartData(grpc::CallbackServerContext* ctx, Metrics* metrics,
                                    const char* rpc) {
  auto data = std::make_unique<DataCall>(DataCall{StartUnary(ctx, metrics, rpc), {}});
  data->trace.received = data->call.start;
  return data;
}

}  // namespace

grpc::ServerUnaryReactor* AttentionService::GetServerInfo(grpc::CallbackServerContext* ctx,
                                                          const v1::GetServerInfoRequest*,
                                                          v1::ServerInfo* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "GetServerInfo");
  wire::FillServerInfo(engine_->Info(), resp);
  return Answer(call, absl::OkStatus());
}

grpc::ServerUnaryReactor* AttentionService::GetStats(grpc::CallbackServerContext* ctx,
                                                     const v1::GetStatsRequest*, v1::Stats* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "GetStats");
  wire::FillStats(metrics_->Snapshot(), resp);
  return Answer(call, absl::OkStatus());
}

grpc::ServerUnaryReactor* AttentionService::RegisterHostRegion(
    grpc::CallbackServerContext* ctx, const v1::RegisterHostRegionRequest* req,
    v1::RegisterRegionResponse*) {
  UnaryCall call = StartUnary(ctx, metrics_, "RegisterHostRegion");
  return Answer(call, engine_->RegisterHostRegion(wire::ToHostRegionSpec(*req)));
}

grpc::ServerUnaryReactor* AttentionService::RegisterCudaRegion(
    grpc::CallbackServerContext* ctx, const v1::RegisterCudaRegionRequest* req,
    v1::RegisterRegionResponse*) {
  UnaryCall call = StartUnary(ctx, metrics_, "RegisterCudaRegion");
  engine_->RegisterIpcRegion(wire::ToIpcRegionSpec(*req), FinishWith(call));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::UnregisterRegion(
    grpc::CallbackServerContext* ctx, const v1::UnregisterRegionRequest* req,
    v1::UnregisterRegionResponse*) {
  UnaryCall call = StartUnary(ctx, metrics_, "UnregisterRegion");
  return Answer(call, engine_->UnregisterRegion(req->name()));
}

grpc::ServerUnaryReactor* AttentionService::ListRegions(grpc::CallbackServerContext* ctx,
                                                        const v1::ListRegionsRequest*,
                                                        v1::ListRegionsResponse* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "ListRegions");
  wire::FillRegions(engine_->ListRegions(), resp);
  return Answer(call, absl::OkStatus());
}

grpc::ServerUnaryReactor* AttentionService::RegisterCudaEvent(
    grpc::CallbackServerContext* ctx, const v1::RegisterCudaEventRequest* req,
    v1::RegisterCudaEventResponse*) {
  UnaryCall call = StartUnary(ctx, metrics_, "RegisterCudaEvent");
  engine_->RegisterIpcEvent(wire::ToIpcEventSpec(*req), FinishWith(call));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::UnregisterCudaEvent(
    grpc::CallbackServerContext* ctx, const v1::UnregisterCudaEventRequest* req,
    v1::UnregisterCudaEventResponse*) {
  UnaryCall call = StartUnary(ctx, metrics_, "UnregisterCudaEvent");
  return Answer(call, engine_->UnregisterIpcEvent(req->name()));
}

grpc::ServerUnaryReactor* AttentionService::CreateSequence(grpc::CallbackServerContext* ctx,
                                                           const v1::CreateSequenceRequest* req,
                                                           v1::SequenceInfo* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "CreateSequence");
  engine_->CreateSequence(req->device(), req->seq_id(),
                          FillThenFinish<SequenceState>(call, [resp](const SequenceState& s) {
                            wire::FillSequenceInfo(s, resp);
                          }));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::ForkSequence(grpc::CallbackServerContext* ctx,
                                                         const v1::ForkSequenceRequest* req,
                                                         v1::SequenceInfo* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "ForkSequence");
  engine_->ForkSequence(req->device(), req->parent_id(), req->child_id(),
                        FillThenFinish<SequenceState>(call, [resp](const SequenceState& s) {
                          wire::FillSequenceInfo(s, resp);
                        }));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::TruncateSequence(
    grpc::CallbackServerContext* ctx, const v1::TruncateSequenceRequest* req,
    v1::SequenceInfo* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "TruncateSequence");
  engine_->TruncateSequence(req->device(), req->seq_id(), req->length(),
                            FillThenFinish<SequenceState>(call, [resp](const SequenceState& s) {
                              wire::FillSequenceInfo(s, resp);
                            }));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::ReleaseSequence(grpc::CallbackServerContext* ctx,
                                                            const v1::ReleaseSequenceRequest* req,
                                                            v1::ReleaseSequenceResponse* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "ReleaseSequence");
  engine_->ReleaseSequence(req->device(), req->seq_id(),
                           FillThenFinish<int64_t>(call, [resp](int64_t freed) {
                             resp->set_freed_pages(static_cast<uint64_t>(freed));
                           }));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::GetSequence(grpc::CallbackServerContext* ctx,
                                                        const v1::GetSequenceRequest* req,
                                                        v1::SequenceInfo* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "GetSequence");
  engine_->GetSequence(req->device(), req->seq_id(),
                       FillThenFinish<SequenceState>(call, [resp](const SequenceState& s) {
                         wire::FillSequenceInfo(s, resp);
                       }));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::ListSequences(grpc::CallbackServerContext* ctx,
                                                          const v1::ListSequencesRequest* req,
                                                          v1::ListSequencesResponse* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "ListSequences");
  engine_->ListSequences(
      req->device(),
      FillThenFinish<std::vector<SequenceState>>(call, [resp](const std::vector<SequenceState>& all) {
        for (const SequenceState& s : all) wire::FillSequenceInfo(s, resp->add_sequences());
      }));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::Append(grpc::CallbackServerContext* ctx,
                                                   const v1::AppendRequest* req,
                                                   v1::AppendResponse* resp) {
  auto data = StartData(ctx, metrics_, "Append");
  grpc::ServerUnaryReactor* reactor = data->call.reactor;
  RequestTrace* trace = &data->trace;
  auto call = wire::ToAppendCall(*req);
  call.life = LifeOf(ctx);
  engine_->Append(std::move(call), FinishData(std::move(data), resp), trace);
  return reactor;
}

grpc::ServerUnaryReactor* AttentionService::Prefill(grpc::CallbackServerContext* ctx,
                                                    const v1::AttentionRequest* req,
                                                    v1::AttentionResponse* resp) {
  auto data = StartData(ctx, metrics_, "Prefill");
  grpc::ServerUnaryReactor* reactor = data->call.reactor;
  RequestTrace* trace = &data->trace;
  auto call = wire::ToAttentionCall(*req);
  call.life = LifeOf(ctx);
  engine_->Prefill(std::move(call), FinishData(std::move(data), resp), trace);
  return reactor;
}

grpc::ServerUnaryReactor* AttentionService::Decode(grpc::CallbackServerContext* ctx,
                                                   const v1::AttentionRequest* req,
                                                   v1::AttentionResponse* resp) {
  auto data = StartData(ctx, metrics_, "Decode");
  grpc::ServerUnaryReactor* reactor = data->call.reactor;
  RequestTrace* trace = &data->trace;
  auto call = wire::ToAttentionCall(*req);
  call.life = LifeOf(ctx);
  engine_->Decode(std::move(call), FinishData(std::move(data), resp), trace);
  return reactor;
}

grpc::ServerBidiReactor<v1::StreamRequest, v1::StreamResponse>* AttentionService::Stream(
    grpc::CallbackServerContext*) {
  return new wire::StreamReactor(engine_, metrics_);
}

grpc::ServerUnaryReactor* AttentionService::ExportKv(grpc::CallbackServerContext* ctx,
                                                     const v1::ExportKvRequest* req,
                                                     v1::ExportKvResponse*) {
  UnaryCall call = StartUnary(ctx, metrics_, "ExportKv");
  engine_->ExportKv(wire::ToTransferCall(*req), FinishWith(call));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::ImportKv(grpc::CallbackServerContext* ctx,
                                                     const v1::ImportKvRequest* req,
                                                     v1::ImportKvResponse* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "ImportKv");
  engine_->ImportKv(wire::ToTransferCall(*req),
                    FillThenFinish<std::vector<int64_t>>(call, [resp](const std::vector<int64_t>& l) {
                      for (int64_t len : l) resp->add_layer_lengths(static_cast<uint64_t>(len));
                    }));
  return call.reactor;
}

}  // namespace attnd
