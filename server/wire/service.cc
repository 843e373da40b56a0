#include "server/wire/service.h"

#include <algorithm>
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

// A data call's reactor: it remembers a cancellation (the callback API tells only the reactor,
// through OnCancel), so the engine drops a call whose client went away before it reached the
// device.
class DataReactor final : public grpc::ServerUnaryReactor {
 public:
  void OnCancel() override { cancelled_->store(true); }
  void OnDone() override { delete this; }
  // Outlives the reactor: the engine may ask after the reply.
  std::function<bool()> IsCancelled() const {
    return [cancelled = cancelled_] { return cancelled->load(); };
  }

 private:
  std::shared_ptr<std::atomic<bool>> cancelled_ = std::make_shared<std::atomic<bool>>(false);
};

// The call's deadline and cancellation, for the engine to drop a call that expired or was
// cancelled while queued.
CallLife LifeOf(const grpc::CallbackServerContext* ctx, const DataReactor* reactor) {
  CallLife life;
  const std::chrono::system_clock::time_point deadline = ctx->deadline();
  if (deadline != std::chrono::system_clock::time_point::max())
    life.deadline = absl::FromChrono(deadline);
  life.is_cancelled = reactor->IsCancelled();
  return life;
}

// Starts a data call on a reactor of its own; `life` gets its deadline and cancellation.
std::unique_ptr<DataCall> StartData(grpc::CallbackServerContext* ctx, Metrics* metrics,
                                    const char* rpc, CallLife* life) {
  auto* reactor = new DataReactor();
  *life = LifeOf(ctx, reactor);
  auto data = std::make_unique<DataCall>(DataCall{UnaryCall{reactor, metrics, rpc, Clock::now()}, {}});
  data->trace.received = data->call.start;
  return data;
}

}  // namespace

absl::StatusOr<ClientRef> AttentionService::ClientOf(const grpc::CallbackServerContext* ctx) const {
  auto caller = auth_->Identify(*ctx);
  if (!caller.ok()) return caller.status();
  return engine_->Attach(*caller);
}

grpc::ServerUnaryReactor* AttentionService::GetServerInfo(grpc::CallbackServerContext* ctx,
                                                          const v1::GetServerInfoRequest*,
                                                          v1::ServerInfo* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "GetServerInfo");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  wire::FillServerInfo(engine_->Info(), resp);
  return Answer(call, absl::OkStatus());
}

grpc::ServerUnaryReactor* AttentionService::GetStats(grpc::CallbackServerContext* ctx,
                                                     const v1::GetStatsRequest*, v1::Stats* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "GetStats");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  wire::FillStats(metrics_->Snapshot(), resp);
  return Answer(call, absl::OkStatus());
}

grpc::ServerUnaryReactor* AttentionService::RegisterHostRegion(
    grpc::CallbackServerContext* ctx, const v1::RegisterHostRegionRequest* req,
    v1::RegisterRegionResponse*) {
  UnaryCall call = StartUnary(ctx, metrics_, "RegisterHostRegion");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  return Answer(call, engine_->RegisterHostRegion(*client, wire::ToHostRegionSpec(*req)));
}

grpc::ServerUnaryReactor* AttentionService::RegisterCudaRegion(
    grpc::CallbackServerContext* ctx, const v1::RegisterCudaRegionRequest* req,
    v1::RegisterRegionResponse*) {
  UnaryCall call = StartUnary(ctx, metrics_, "RegisterCudaRegion");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  engine_->RegisterIpcRegion(*client, wire::ToIpcRegionSpec(*req), FinishWith(call));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::UnregisterRegion(
    grpc::CallbackServerContext* ctx, const v1::UnregisterRegionRequest* req,
    v1::UnregisterRegionResponse*) {
  UnaryCall call = StartUnary(ctx, metrics_, "UnregisterRegion");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  return Answer(call, engine_->UnregisterRegion(*client, req->name()));
}

grpc::ServerUnaryReactor* AttentionService::ListRegions(grpc::CallbackServerContext* ctx,
                                                        const v1::ListRegionsRequest*,
                                                        v1::ListRegionsResponse* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "ListRegions");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  wire::FillRegions(engine_->ListRegions(*client), resp);
  return Answer(call, absl::OkStatus());
}

grpc::ServerUnaryReactor* AttentionService::RegisterCudaEvent(
    grpc::CallbackServerContext* ctx, const v1::RegisterCudaEventRequest* req,
    v1::RegisterCudaEventResponse*) {
  UnaryCall call = StartUnary(ctx, metrics_, "RegisterCudaEvent");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  engine_->RegisterIpcEvent(*client, wire::ToIpcEventSpec(*req), FinishWith(call));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::UnregisterCudaEvent(
    grpc::CallbackServerContext* ctx, const v1::UnregisterCudaEventRequest* req,
    v1::UnregisterCudaEventResponse*) {
  UnaryCall call = StartUnary(ctx, metrics_, "UnregisterCudaEvent");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  return Answer(call, engine_->UnregisterIpcEvent(*client, req->name()));
}

grpc::ServerUnaryReactor* AttentionService::CreateSequence(grpc::CallbackServerContext* ctx,
                                                           const v1::CreateSequenceRequest* req,
                                                           v1::SequenceInfo* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "CreateSequence");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  engine_->CreateSequence(*client, req->device(), req->seq_id(),
                          FillThenFinish<SequenceState>(call, [resp](const SequenceState& s) {
                            wire::FillSequenceInfo(s, resp);
                          }));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::ForkSequence(grpc::CallbackServerContext* ctx,
                                                         const v1::ForkSequenceRequest* req,
                                                         v1::SequenceInfo* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "ForkSequence");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  engine_->ForkSequence(*client, req->device(), req->parent_id(), req->child_id(),
                        FillThenFinish<SequenceState>(call, [resp](const SequenceState& s) {
                          wire::FillSequenceInfo(s, resp);
                        }));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::TruncateSequence(
    grpc::CallbackServerContext* ctx, const v1::TruncateSequenceRequest* req,
    v1::SequenceInfo* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "TruncateSequence");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  engine_->TruncateSequence(*client, req->device(), req->seq_id(), req->length(),
                            FillThenFinish<SequenceState>(call, [resp](const SequenceState& s) {
                              wire::FillSequenceInfo(s, resp);
                            }));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::ReleaseSequence(grpc::CallbackServerContext* ctx,
                                                            const v1::ReleaseSequenceRequest* req,
                                                            v1::ReleaseSequenceResponse* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "ReleaseSequence");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  engine_->ReleaseSequence(*client, req->device(), req->seq_id(),
                           FillThenFinish<int64_t>(call, [resp](int64_t freed) {
                             resp->set_freed_pages(static_cast<uint64_t>(freed));
                           }));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::GetSequence(grpc::CallbackServerContext* ctx,
                                                        const v1::GetSequenceRequest* req,
                                                        v1::SequenceInfo* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "GetSequence");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  engine_->GetSequence(*client, req->device(), req->seq_id(),
                       FillThenFinish<SequenceState>(call, [resp](const SequenceState& s) {
                         wire::FillSequenceInfo(s, resp);
                       }));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::ListSequences(grpc::CallbackServerContext* ctx,
                                                          const v1::ListSequencesRequest* req,
                                                          v1::ListSequencesResponse* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "ListSequences");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  engine_->ListSequences(
      *client, req->device(),
      FillThenFinish<std::vector<SequenceState>>(call, [resp](const std::vector<SequenceState>& all) {
        for (const SequenceState& s : all) wire::FillSequenceInfo(s, resp->add_sequences());
      }));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::Append(grpc::CallbackServerContext* ctx,
                                                   const v1::AppendRequest* req,
                                                   v1::AppendResponse* resp) {
  CallLife life;
  auto data = StartData(ctx, metrics_, "Append", &life);
  grpc::ServerUnaryReactor* reactor = data->call.reactor;
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(data->call, client.status());
  RequestTrace* trace = &data->trace;
  auto call = wire::ToAppendCall(*req);
  call.client = *client;
  call.life = std::move(life);
  engine_->Append(std::move(call), FinishData(std::move(data), resp), trace);
  return reactor;
}

grpc::ServerUnaryReactor* AttentionService::Prefill(grpc::CallbackServerContext* ctx,
                                                    const v1::AttentionRequest* req,
                                                    v1::AttentionResponse* resp) {
  return Attention(ctx, req, resp, /*decode=*/false);
}

grpc::ServerUnaryReactor* AttentionService::Decode(grpc::CallbackServerContext* ctx,
                                                   const v1::AttentionRequest* req,
                                                   v1::AttentionResponse* resp) {
  return Attention(ctx, req, resp, /*decode=*/true);
}

grpc::ServerUnaryReactor* AttentionService::Attention(grpc::CallbackServerContext* ctx,
                                                      const v1::AttentionRequest* req,
                                                      v1::AttentionResponse* resp, bool decode) {
  CallLife life;
  auto data = StartData(ctx, metrics_, decode ? "Decode" : "Prefill", &life);
  grpc::ServerUnaryReactor* reactor = data->call.reactor;
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(data->call, client.status());
  RequestTrace* trace = &data->trace;
  auto call = wire::ToAttentionCall(*req);
  call.client = *client;
  call.life = std::move(life);
  if (decode)
    engine_->Decode(std::move(call), FinishData(std::move(data), resp), trace);
  else
    engine_->Prefill(std::move(call), FinishData(std::move(data), resp), trace);
  return reactor;
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* AttentionService::Stream(
    grpc::CallbackServerContext* ctx) {
  return new wire::StreamReactor(engine_, metrics_, ClientOf(ctx));
}

grpc::ServerUnaryReactor* AttentionService::ExportKv(grpc::CallbackServerContext* ctx,
                                                     const v1::ExportKvRequest* req,
                                                     v1::ExportKvResponse*) {
  UnaryCall call = StartUnary(ctx, metrics_, "ExportKv");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  KvTransferCall transfer = wire::ToTransferCall(*req);
  transfer.client = *client;
  engine_->ExportKv(std::move(transfer), FinishWith(call));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::ImportKv(grpc::CallbackServerContext* ctx,
                                                     const v1::ImportKvRequest* req,
                                                     v1::ImportKvResponse* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "ImportKv");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  KvTransferCall transfer = wire::ToTransferCall(*req);
  transfer.client = *client;
  engine_->ImportKv(std::move(transfer),
                    FillThenFinish<std::vector<int64_t>>(call, [resp](const std::vector<int64_t>& l) {
                      for (int64_t len : l) resp->add_layer_lengths(static_cast<uint64_t>(len));
                    }));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::GetLease(grpc::CallbackServerContext* ctx,
                                                     const v1::GetLeaseRequest*,
                                                     v1::LeaseInfo* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "GetLease");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  wire::FillLease(engine_->GetLease(*client), engine_->config(), resp);
  return Answer(call, absl::OkStatus());
}

grpc::ServerUnaryReactor* AttentionService::ReleaseAll(grpc::CallbackServerContext* ctx,
                                                       const v1::ReleaseAllRequest*,
                                                       v1::ReleaseAllResponse* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "ReleaseAll");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  const ReleasedHoldings released = engine_->ReleaseAll(*client);
  resp->set_sequences(static_cast<uint64_t>(released.sequences));
  resp->set_freed_pages(static_cast<uint64_t>(released.freed_pages));
  resp->set_regions(static_cast<uint64_t>(released.regions));
  resp->set_events(static_cast<uint64_t>(released.events));
  return Answer(call, absl::OkStatus());
}

// ---- KV transfer between attnd processes ----

grpc::ServerUnaryReactor* AttentionService::GrantKv(grpc::CallbackServerContext* ctx,
                                                    const v1::GrantKvRequest* req,
                                                    v1::KvGrant* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "GrantKv");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  KvGrantCall grant{*client, req->device(), req->seq_id(), req->num_tokens(),
                    absl::Milliseconds(req->ttl_ms() == 0 ? 60000 : req->ttl_ms()),
                    req->max_pulls()};
  engine_->GrantKv(std::move(grant), FillThenFinish<KvGrantInfo>(call, [resp](const KvGrantInfo& g) {
    resp->set_grant(g.grant);
    resp->set_num_tokens(g.num_tokens);
    resp->set_expires_unix_ms(static_cast<uint64_t>(absl::ToUnixMillis(g.expires)));
  }));
  return call.reactor;
}

grpc::ServerUnaryReactor* AttentionService::RevokeKv(grpc::CallbackServerContext* ctx,
                                                     const v1::RevokeKvRequest* req,
                                                     v1::RevokeKvResponse*) {
  UnaryCall call = StartUnary(ctx, metrics_, "RevokeKv");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  return Answer(call, engine_->RevokeKv(*client, req->grant()));
}

grpc::ServerUnaryReactor* AttentionService::PullKv(grpc::CallbackServerContext* ctx,
                                                   const v1::PullKvRequest* req,
                                                   v1::PullKvResponse* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "PullKv");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  if (kv_transfer_ == nullptr)
    return Answer(call, absl::FailedPreconditionError("KV transfer is off on this server"));
  kv_transfer_->Pull(*client, *req, [call, resp](absl::StatusOr<v1::PullKvResponse> r) {
    if (r.ok()) *resp = *std::move(r);
    call.Finish(r.status());
  });
  return call.reactor;
}

absl::Status AttentionService::CheckPeer(const grpc::CallbackServerContext* ctx) const {
  auto caller = auth_->Identify(*ctx);
  if (!caller.ok()) return caller.status();
  if (kv_transfer_ == nullptr) return absl::FailedPreconditionError("KV transfer is off on this server");
  if (!kv_transfer_->IsPeer(caller->principal))
    return absl::PermissionDeniedError(absl::StrCat(
        "caller ", absl::CHexEscape(caller->principal),
        " is not a KV transfer peer of this server (--kv_peers)"));
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* AttentionService::OpenKvPull(grpc::CallbackServerContext* ctx,
                                                       const v1::OpenKvPullRequest* req,
                                                       v1::OpenKvPullResponse* resp) {
  UnaryCall call = StartUnary(ctx, metrics_, "OpenKvPull");
  if (absl::Status s = CheckPeer(ctx); !s.ok()) return Answer(call, s);
  return Answer(call, kv_transfer_->OpenPull(*req, resp));
}

grpc::ServerUnaryReactor* AttentionService::CloseKvPull(grpc::CallbackServerContext* ctx,
                                                        const v1::CloseKvPullRequest* req,
                                                        v1::CloseKvPullResponse*) {
  UnaryCall call = StartUnary(ctx, metrics_, "CloseKvPull");
  if (absl::Status s = CheckPeer(ctx); !s.ok()) return Answer(call, s);
  return Answer(call, kv_transfer_->ClosePull(*req));
}

// ---- fp8 KV scales ----

absl::Status AttentionService::CheckScaleSetter(const grpc::CallbackServerContext* ctx) const {
  auto caller = auth_->Identify(*ctx);
  if (!caller.ok()) return caller.status();
  const std::vector<std::string>& setters = engine_->config().kv_scale_setters;
  const bool listed = std::find(setters.begin(), setters.end(), "*") != setters.end() ||
                      std::find(setters.begin(), setters.end(), caller->principal) != setters.end();
  if (listed) return absl::OkStatus();
  return absl::PermissionDeniedError(absl::StrCat(
      "caller ", absl::CHexEscape(caller->principal),
      " may not change KV scales (--kv_scale_setters); they are every client's"));
}

grpc::ServerUnaryReactor* AttentionService::SetKvScales(grpc::CallbackServerContext* ctx,
                                                        const v1::SetKvScalesRequest* req,
                                                        v1::SetKvScalesResponse*) {
  UnaryCall call = StartUnary(ctx, metrics_, "SetKvScales");
  auto client = ClientOf(ctx);
  if (!client.ok()) return Answer(call, client.status());
  if (absl::Status s = CheckScaleSetter(ctx); !s.ok()) return Answer(call, s);
  auto scales = wire::ToKvScalesCall(*req, engine_->config().model);
  if (!scales.ok()) return Answer(call, scales.status());
  engine_->SetKvScales(scales->device, scales->layer_begin, std::move(scales->scales),
                       FinishWith(call));
  return call.reactor;
}

}  // namespace attnd
