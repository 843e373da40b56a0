// Serves one Stream: requests are dispatched to the engine as they arrive (several may be in
// flight on different devices); responses go back one write at a time, in request order.
#ifndef ATTND_SERVER_WIRE_STREAM_REACTOR_H_
#define ATTND_SERVER_WIRE_STREAM_REACTOR_H_

#include <atomic>
#include <deque>
#include <memory>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "attnd/v1/attention.grpc.pb.h"
#include "server/engine/engine.h"
#include "server/metrics/metrics.h"
#include "server/metrics/request_trace.h"
#include "server/wire/stream_registry.h"

namespace attnd::wire {

// Reads and writes raw messages (see AttentionServiceBase): an unparsable request ends the
// stream with INVALID_ARGUMENT once the requests before it are answered.
class StreamReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>,
                            public StreamRegistry::Closable {
 public:
  // Serves `client`'s requests (its lease is kept while the stream is open); a caller that
  // could not be identified gets the error at once.
  StreamReactor(Engine* engine, Metrics* metrics, absl::StatusOr<ClientRef> client);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  // The client went away: requests not yet on the device are dropped, unapplied.
  void OnCancel() override { cancelled_->store(true); }
  void OnDone() override;
  // A drain: requests read from now on are not served; the stream ends with UNAVAILABLE once
  // those in flight are answered.
  bool BeginClose() override;
  void FinishClosed() override { Finish(final_status_); }

 private:
  struct Slot {
    v1::StreamResponse response;
    grpc::ByteBuffer wire;  // the response, serialized when its turn to be written comes
    const char* rpc = "Stream";
    bool done = false;
    RequestTrace trace;  // stamped by the engine until done, then under mu_
  };

  void Dispatch(const v1::StreamRequest& req, Slot* slot);
  // The engine's reply for one request: fills its response (a refusal is written into the
  // response, the stream goes on) and writes whatever is next in order.
  void Complete(Slot* slot, const absl::Status& status);
  // Starts the next response if its turn has come; true when the stream should now finish.
  bool WriteNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // True once (the caller then calls Finish, off the lock) when every read is done and every
  // response written.
  bool MaybeFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Each request's deadline (none: a Stream's deadline is the stream's) and cancellation.
  CallLife Life() const;

  Engine* const engine_;
  Metrics* const metrics_;
  const ClientRef client_;
  const bool identified_;
  const std::shared_ptr<std::atomic<bool>> cancelled_ = std::make_shared<std::atomic<bool>>(false);
  // The read in progress and its parse; only gRPC's read callbacks touch them.
  grpc::ByteBuffer request_wire_;
  v1::StreamRequest request_;

  absl::Mutex mu_;
  std::deque<std::unique_ptr<Slot>> pending_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  // OK, or why the stream was cut short; written under mu_ before finished_ is set, read after.
  grpc::Status final_status_;
};

}  // namespace attnd::wire

#endif  // ATTND_SERVER_WIRE_STREAM_REACTOR_H_
