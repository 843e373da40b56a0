// Serves one Stream: requests are dispatched to the engine as they arrive (several may be in
// flight on different devices); responses go back one write at a time, in request order.
#ifndef ATTND_SERVER_WIRE_STREAM_REACTOR_H_
#define ATTND_SERVER_WIRE_STREAM_REACTOR_H_

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

class StreamReactor final : public grpc::ServerBidiReactor<v1::StreamRequest, v1::StreamResponse>,
                            public StreamRegistry::Closable {
 public:
  StreamReactor(Engine* engine, Metrics* metrics);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnDone() override {
    StreamRegistry::Global().Remove(this);
    delete this;
  }
  // A drain: requests read from now on are not served; the stream ends with UNAVAILABLE once
  // those in flight are answered.
  bool BeginClose() override;
  void FinishClosed() override { Finish(final_status_); }

 private:
  struct Slot {
    v1::StreamResponse response;
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

  Engine* const engine_;
  Metrics* const metrics_;
  v1::StreamRequest request_;  // the read in progress; only gRPC's read callbacks touch it

  absl::Mutex mu_;
  std::deque<std::unique_ptr<Slot>> pending_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_status_;  // written with finished_ (under mu_), read after it is set
};

}  // namespace attnd::wire

#endif  // ATTND_SERVER_WIRE_STREAM_REACTOR_H_
