#include "server/service.h"

#include <chrono>
#include <deque>
#include <memory>

#include "absl/synchronization/mutex.h"
#include "spdlog/spdlog.h"

namespace attnd {

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

namespace {

using Clock = std::chrono::steady_clock;

// Records a unary call's outcome and duration, then finishes its reactor.
void FinishUnary(grpc::ServerUnaryReactor* reactor, Metrics* metrics, const char* rpc,
                 Clock::time_point start, const absl::Status& status) {
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (spdlog::should_log(spdlog::level::trace))
    spdlog::trace("rpc={} handled_us={:.1f}", rpc, seconds * 1e6);
  metrics->RecordRpc(rpc, status.code(), seconds);
  if (!status.ok()) spdlog::debug("rpc={} code={} msg={}", rpc, absl::StatusCodeToString(status.code()), std::string(status.message()));
  reactor->Finish(ToGrpc(status));
}

Engine::Done Finisher(grpc::ServerUnaryReactor* reactor, Metrics* metrics, const char* rpc) {
  return [reactor, metrics, rpc, start = Clock::now()](absl::Status status) {
    FinishUnary(reactor, metrics, rpc, start, status);
  };
}

// Runs the handler's work and finishes the default reactor.
template <typename Fn>
grpc::ServerUnaryReactor* Handle(grpc::CallbackServerContext* ctx, Metrics* metrics,
                                 const char* rpc, Fn&& fn) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  fn(Finisher(reactor, metrics, rpc));
  return reactor;
}

// A unary data call (Append, Prefill, Decode): its stage trace lives here until the reply is
// handed to gRPC, and the engine stamps it on the way. One allocation, as the closure it
// replaces needed one too.
struct DataCall {
  grpc::ServerUnaryReactor* reactor;
  Metrics* metrics;
  const char* rpc;
  RequestTrace trace;
};

template <typename Fn>
grpc::ServerUnaryReactor* HandleData(grpc::CallbackServerContext* ctx, Metrics* metrics,
                                     const char* rpc, Fn&& fn) {
  auto call = std::make_unique<DataCall>(DataCall{ctx->DefaultReactor(), metrics, rpc, {}});
  call->trace.received = Clock::now();
  grpc::ServerUnaryReactor* reactor = call->reactor;
  RequestTrace* trace = &call->trace;
  fn(trace, Engine::Done([call = std::move(call)](absl::Status status) {
    FinishUnary(call->reactor, call->metrics, call->rpc, call->trace.received, status);
    // Recorded after Finish, off the reply's path.
    call->trace.handed = Clock::now();
    call->metrics->RecordStages(call->rpc, call->trace);
  }));
  return reactor;
}

// Serves one Stream: requests are dispatched as they arrive (several may be in flight on
// different devices); responses go back one write at a time, in request order.
class StreamReactor final : public grpc::ServerBidiReactor<v1::StreamRequest, v1::StreamResponse> {
 public:
  StreamReactor(Engine* engine, Metrics* metrics) : engine_(engine), metrics_(metrics) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      bool finish;
      {
        absl::MutexLock lock(&mu_);
        reads_done_ = true;
        finish = MaybeFinishLocked();
      }
      if (finish) Finish(grpc::Status::OK);
      return;
    }
    auto slot = std::make_unique<Slot>();
    Slot* raw = slot.get();
    raw->response.set_tag(request_.tag());
    {
      absl::MutexLock lock(&mu_);
      pending_.push_back(std::move(slot));
    }
    Dispatch(request_, raw);
    StartRead(&request_);
  }

  void OnWriteDone(bool ok) override {
    Metrics* metrics = metrics_;
    std::unique_ptr<Slot> written;
    bool finish;
    {
      absl::MutexLock lock(&mu_);
      // Stamped under the lock: a write can complete (on a gRPC thread) before StartWrite has
      // returned on the worker and stamped `handed`; the lock orders the two.
      const Clock::time_point now = Clock::now();
      writing_ = false;
      written = std::move(pending_.front());
      pending_.pop_front();
      if (ok) written->trace.written = now;
      if (!ok) broken_ = true;  // the client is gone; finish once in-flight work lands
      finish = WriteNextLocked();
    }
    // Off the lock and off the reply's path: the next response may already be on its way.
    metrics->RecordStages(written->rpc, written->trace);
    if (finish) Finish(grpc::Status::OK);
  }

  void OnDone() override { delete this; }

 private:
  struct Slot {
    v1::StreamResponse response;
    const char* rpc = "Stream";
    bool done = false;
    RequestTrace trace;  // stamped by the engine until done, then under mu_
  };

  void Dispatch(const v1::StreamRequest& req, Slot* slot) {
    slot->trace.received = Clock::now();
    auto done = [this, slot](absl::Status status) { Complete(slot, status); };
    switch (req.op_case()) {
      case v1::StreamRequest::kAppend:
        slot->rpc = "Stream.Append";
        engine_->Append(req.append(), slot->response.mutable_append(), std::move(done),
                        &slot->trace);
        break;
      case v1::StreamRequest::kPrefill:
        slot->rpc = "Stream.Prefill";
        engine_->Prefill(req.prefill(), slot->response.mutable_attention(), std::move(done),
                         &slot->trace);
        break;
      case v1::StreamRequest::kDecode:
        slot->rpc = "Stream.Decode";
        engine_->Decode(req.decode(), slot->response.mutable_attention(), std::move(done),
                        &slot->trace);
        break;
      default:
        slot->rpc = "Stream";
        done(absl::InvalidArgumentError("op: one of append, prefill or decode is required"));
    }
  }

  void Complete(Slot* slot, const absl::Status& status) {
    metrics_->RecordRpc(slot->rpc, status.code(),
                        std::chrono::duration<double>(Clock::now() - slot->trace.received).count());
    bool finish;
    {
      absl::MutexLock lock(&mu_);
      if (!status.ok()) {
        slot->response.clear_result();
        slot->response.set_code(static_cast<int32_t>(status.code()));
        slot->response.set_message(std::string(status.message()));
      }
      slot->done = true;
      finish = WriteNextLocked();
    }
    // This runs on a device worker, not in a gRPC reaction, so OnDone may delete the reactor as
    // soon as Finish is called: it is the last thing done here, with the lock released.
    if (finish) Finish(grpc::Status::OK);
  }

  // Starts the next response if its turn has come; true when the stream should now finish.
  bool WriteNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    while (!writing_ && !pending_.empty() && pending_.front()->done) {
      if (broken_) {
        pending_.pop_front();
        continue;
      }
      writing_ = true;
      StartWrite(&pending_.front()->response);
      // OnWriteDone, which reads it, takes mu_ first.
      pending_.front()->trace.handed = Clock::now();
    }
    return MaybeFinishLocked();
  }

  // True once (the caller then calls Finish, off the lock) when every read is done and every
  // response written.
  bool MaybeFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_ || !reads_done_ || writing_ || !pending_.empty()) return false;
    finished_ = true;
    return true;
  }

  Engine* engine_;
  Metrics* metrics_;
  v1::StreamRequest request_;
  absl::Mutex mu_;
  std::deque<std::unique_ptr<Slot>> pending_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace

#define ATTND_SYNC_HANDLER(Method, Req, Resp, body)                                      \
  grpc::ServerUnaryReactor* AttentionService::Method(grpc::CallbackServerContext* ctx,   \
                                                     const Req* req, Resp* resp) {       \
    return Handle(ctx, metrics_, #Method, [&](Engine::Done done) { std::move(done)(body); }); \
  }

#define ATTND_DATA_HANDLER(Method, Req, Resp)                                             \
  grpc::ServerUnaryReactor* AttentionService::Method(grpc::CallbackServerContext* ctx,   \
                                                     const Req* req, Resp* resp) {       \
    return HandleData(ctx, metrics_, #Method, [&](RequestTrace* trace, Engine::Done done) { \
      engine_->Method(*req, resp, std::move(done), trace);                               \
    });                                                                                  \
  }

#define ATTND_ASYNC_HANDLER(Method, Req, Resp)                                           \
  grpc::ServerUnaryReactor* AttentionService::Method(grpc::CallbackServerContext* ctx,   \
                                                     const Req* req, Resp* resp) {       \
    return Handle(ctx, metrics_, #Method,                                                \
                  [&](Engine::Done done) { engine_->Method(*req, resp, std::move(done)); }); \
  }

ATTND_SYNC_HANDLER(GetServerInfo, v1::GetServerInfoRequest, v1::ServerInfo,
                   ((void)req, engine_->GetServerInfo(resp), absl::OkStatus()))
ATTND_SYNC_HANDLER(GetStats, v1::GetStatsRequest, v1::Stats,
                   ((void)req, metrics_->FillStats(resp), absl::OkStatus()))
ATTND_SYNC_HANDLER(RegisterHostRegion, v1::RegisterHostRegionRequest, v1::RegisterRegionResponse,
                   ((void)resp, engine_->RegisterHostRegion(*req)))
ATTND_SYNC_HANDLER(UnregisterRegion, v1::UnregisterRegionRequest, v1::UnregisterRegionResponse,
                   ((void)resp, engine_->UnregisterRegion(*req)))
ATTND_SYNC_HANDLER(ListRegions, v1::ListRegionsRequest, v1::ListRegionsResponse,
                   ((void)req, engine_->ListRegions(resp), absl::OkStatus()))
ATTND_SYNC_HANDLER(UnregisterCudaEvent, v1::UnregisterCudaEventRequest,
                   v1::UnregisterCudaEventResponse, ((void)resp, engine_->UnregisterCudaEvent(*req)))
ATTND_ASYNC_HANDLER(RegisterCudaRegion, v1::RegisterCudaRegionRequest, v1::RegisterRegionResponse)
ATTND_ASYNC_HANDLER(RegisterCudaEvent, v1::RegisterCudaEventRequest, v1::RegisterCudaEventResponse)
ATTND_ASYNC_HANDLER(CreateSequence, v1::CreateSequenceRequest, v1::SequenceInfo)
ATTND_ASYNC_HANDLER(ForkSequence, v1::ForkSequenceRequest, v1::SequenceInfo)
ATTND_ASYNC_HANDLER(TruncateSequence, v1::TruncateSequenceRequest, v1::SequenceInfo)
ATTND_ASYNC_HANDLER(ReleaseSequence, v1::ReleaseSequenceRequest, v1::ReleaseSequenceResponse)
ATTND_ASYNC_HANDLER(GetSequence, v1::GetSequenceRequest, v1::SequenceInfo)
ATTND_ASYNC_HANDLER(ListSequences, v1::ListSequencesRequest, v1::ListSequencesResponse)
ATTND_DATA_HANDLER(Append, v1::AppendRequest, v1::AppendResponse)
ATTND_DATA_HANDLER(Prefill, v1::AttentionRequest, v1::AttentionResponse)
ATTND_DATA_HANDLER(Decode, v1::AttentionRequest, v1::AttentionResponse)
ATTND_ASYNC_HANDLER(ExportKv, v1::ExportKvRequest, v1::ExportKvResponse)
ATTND_ASYNC_HANDLER(ImportKv, v1::ImportKvRequest, v1::ImportKvResponse)

grpc::ServerBidiReactor<v1::StreamRequest, v1::StreamResponse>* AttentionService::Stream(
    grpc::CallbackServerContext*) {
  return new StreamReactor(engine_, metrics_);
}

}  // namespace attnd
