// One Read on the progress thread: an endpoint to the peer, its unpacked pool key, the gets of
// every run, then a flush and the endpoint's close. Internal to server/transport.
#ifndef ATTND_SERVER_TRANSPORT_UCX_READ_H_
#define ATTND_SERVER_TRANSPORT_UCX_READ_H_

#include <ucp/api/ucp.h>

#include <cstddef>
#include <cstdint>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "server/transport/ucx_blob.h"
#include "server/transport/ucx_handles.h"
#include "server/transport/ucx_transport.h"

namespace attnd {
namespace ucx_internal {

// A Read handed from the caller's thread to the progress thread. The caller owns it and waits
// on `done`; the progress thread writes `status` and `stats` and then notifies, after which it
// never touches the call again.
struct ReadCall {
  Blob address;
  Blob rkey;
  uint64_t remote_base = 0;
  absl::Span<const CopyRun> runs;
  absl::Time deadline;

  absl::Status status;
  ReadStats stats;
  absl::Notification done;
};

// What a job needs of its transport's side.
struct LocalPool {
  ucp_worker_h worker = nullptr;
  ucp_mem_h memh = nullptr;
  char* base = nullptr;
  ucs_memory_type_t memory_type = UCS_MEMORY_TYPE_HOST;
  // Worker addresses UCX could not reach with peer error handling (UCX 1.13's shared-memory
  // transports have none), so endpoints to them go without it at once. The thread's own.
  absl::flat_hash_set<std::string>* no_peer_errors = nullptr;
};

// The state machine of one call; the progress thread calls Start once, then Advance after every
// round of worker progress until finished(). UCX callbacks (request completions, the endpoint's
// error handler) only record what happened; Advance acts on it.
class ReadJob {
 public:
  // Most gets in flight at once per job; more are posted as these complete.
  static constexpr size_t kMaxInFlight = 1024;

  ReadJob(LocalPool local, ReadCall* call) : local_(local), call_(call) {}
  ReadJob(const ReadJob&) = delete;
  ReadJob& operator=(const ReadJob&) = delete;

  // Creates the endpoint and unpacks the key; a failure answers the call at once.
  void Start();
  // Posts gets, notices completions, errors and the deadline, and moves to the next phase.
  void Advance(absl::Time now);
  // Ends the job with `status` (the transport is stopping): closes the endpoint by force and
  // answers once every request has completed.
  void Cancel(absl::Status status);

  // The call has been answered and every UCX resource released: the job may be deleted.
  bool finished() const { return phase_ == Phase::kDone; }
  // The call has not been answered yet.
  bool answering() const { return call_ != nullptr; }
  // For a job stuck after Cancel: hands back its call unanswered and forgets its requests and
  // key without touching UCX; the worker is destroyed next, which ends them.
  ReadCall* Abandon();

 private:
  enum class Phase { kPosting, kFlushing, kClosing, kAborting, kDone };

  // ucp_ep_create with or without peer error handling.
  ucs_status_t CreateEndpoint(bool peer_errors, ucp_ep_h* ep);
  void Post();
  void StartFlush();
  // Closes the endpoint (force after an error or a deadline) and moves to `next`.
  void StartClose(bool force, Phase next);
  void Fail(absl::Status status);
  void Answer(absl::Status status);
  ucp_request_param_t Param(ucp_send_nbx_callback_t cb);

  static void OnGetDone(void* request, ucs_status_t status, void* job);
  static void OnFlushDone(void* request, ucs_status_t status, void* job);
  static void OnCloseDone(void* request, ucs_status_t status, void* job);
  static void OnPeerError(void* job, ucp_ep_h ep, ucs_status_t status);

  const LocalPool local_;
  ReadCall* call_;  // null once answered
  Phase phase_ = Phase::kPosting;
  Endpoint ep_;
  bool peer_errors_ = true;  // the endpoint has UCP_ERR_HANDLING_MODE_PEER
  RkeyPtr rkey_;
  size_t next_run_ = 0;
  size_t in_flight_ = 0;  // gets and the flush whose callback has not run
  bool flushed_ = false;
  bool close_pending_ = false;
  ucs_status_t request_error_ = UCS_OK;  // first failed request
  ucs_status_t peer_error_ = UCS_OK;     // from the endpoint's error handler
  absl::Status failure_;                 // why an aborting job fails
  absl::Time abort_started_;
  bool stuck_logged_ = false;
  ReadStats stats_;
};

}  // namespace ucx_internal
}  // namespace attnd

#endif  // ATTND_SERVER_TRANSPORT_UCX_READ_H_
