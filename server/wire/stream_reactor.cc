#include "server/wire/stream_reactor.h"

#include <chrono>
#include <string>
#include <utility>

#include "server/wire/calls.h"
#include "server/wire/convert.h"

namespace attnd::wire {

StreamReactor::StreamReactor(Engine* engine, Metrics* metrics, absl::StatusOr<ClientRef> client)
    : engine_(engine),
      metrics_(metrics),
      client_(client.ok() ? *client : ClientRef{}),
      identified_(client.ok()) {
  if (!identified_) {
    Finish(ToGrpc(client.status()));
    return;
  }
  engine_->clients().StreamOpened(client_.id);
  if (StreamRegistry::Global().Add(this)) {
    StartRead(&request_wire_);
  } else if (BeginClose()) {
    FinishClosed();  // opened while attnd drains
  }
}

void StreamReactor::OnDone() {
  if (identified_) {
    StreamRegistry::Global().Remove(this);
    engine_->clients().StreamClosed(client_.id, absl::Now());
  }
  delete this;
}

CallLife StreamReactor::Life() const {
  CallLife life;
  life.is_cancelled = [cancelled = cancelled_] { return cancelled->load(); };
  return life;
}

bool StreamReactor::BeginClose() {
  absl::MutexLock lock(&mu_);
  closing_ = true;
  return MaybeFinishLocked();
}

void StreamReactor::OnReadDone(bool ok) {
  const bool parsed =
      ok && grpc::SerializationTraits<v1::StreamRequest>::Deserialize(&request_wire_, &request_).ok();
  if (!parsed) {
    bool finish;
    {
      absl::MutexLock lock(&mu_);
      reads_done_ = true;
      if (ok)
        final_status_ = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                     "request: not a valid attnd.v1.StreamRequest; the stream "
                                     "ends here (the requests before it were answered)");
      finish = MaybeFinishLocked();
    }
    if (finish) Finish(final_status_);
    return;
  }
  auto slot = std::make_unique<Slot>();
  Slot* raw = slot.get();
  raw->response.set_tag(request_.tag());
  {
    absl::MutexLock lock(&mu_);
    if (closing_) return;  // drained: read after the close, not served
    pending_.push_back(std::move(slot));
  }
  Dispatch(request_, raw);
  StartRead(&request_wire_);
}

void StreamReactor::OnWriteDone(bool ok) {
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
  if (finish) Finish(final_status_);
}

void StreamReactor::Dispatch(const v1::StreamRequest& req, Slot* slot) {
  slot->trace.received = Clock::now();
  // The engine's reply fills the slot's response, then completes the slot.
  auto lengths_into = [this, slot](v1::AttentionResponse* resp) {
    return [this, slot, resp](absl::StatusOr<DataResult> result) {
      if (result.ok()) FillLengths(*result, resp->mutable_lengths());
      Complete(slot, result.status());
    };
  };
  switch (req.op_case()) {
    case v1::StreamRequest::kAppend: {
      slot->rpc = "Stream.Append";
      v1::AppendResponse* resp = slot->response.mutable_append();
      AppendCall call = ToAppendCall(req.append());
      call.client = client_;
      call.life = Life();
      engine_->Append(
          std::move(call),
          [this, slot, resp](absl::StatusOr<DataResult> result) {
            if (result.ok()) FillLengths(*result, resp->mutable_lengths());
            Complete(slot, result.status());
          },
          &slot->trace);
      break;
    }
    case v1::StreamRequest::kPrefill:
    case v1::StreamRequest::kDecode: {
      const bool decode = req.op_case() == v1::StreamRequest::kDecode;
      slot->rpc = decode ? "Stream.Decode" : "Stream.Prefill";
      AttentionCall call = ToAttentionCall(decode ? req.decode() : req.prefill());
      call.client = client_;
      call.life = Life();
      auto reply = lengths_into(slot->response.mutable_attention());
      if (decode)
        engine_->Decode(std::move(call), std::move(reply), &slot->trace);
      else
        engine_->Prefill(std::move(call), std::move(reply), &slot->trace);
      break;
    }
    default:
      slot->rpc = "Stream";
      Complete(slot, absl::InvalidArgumentError("op: one of append, prefill or decode is required"));
  }
}

void StreamReactor::Complete(Slot* slot, const absl::Status& status) {
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
  if (finish) Finish(final_status_);
}

bool StreamReactor::WriteNextLocked() {
  while (!writing_ && !pending_.empty() && pending_.front()->done) {
    if (broken_) {
      pending_.pop_front();
      continue;
    }
    writing_ = true;
    Slot& next = *pending_.front();
    bool own_buffer;
    (void)grpc::SerializationTraits<v1::StreamResponse>::Serialize(next.response, &next.wire,
                                                                   &own_buffer);
    StartWrite(&next.wire);
    // OnWriteDone, which reads it, takes mu_ first.
    pending_.front()->trace.handed = Clock::now();
  }
  return MaybeFinishLocked();
}

bool StreamReactor::MaybeFinishLocked() {
  if (finished_ || (!reads_done_ && !closing_) || writing_ || !pending_.empty()) return false;
  finished_ = true;
  if (!reads_done_)  // the client still had it open: tell it to go elsewhere
    final_status_ = grpc::Status(grpc::StatusCode::UNAVAILABLE, "attnd is shutting down");
  return true;
}

}  // namespace attnd::wire
