#include "server/transport/ucx_read.h"

#include "absl/strings/str_format.h"
#include "spdlog/spdlog.h"

namespace attnd {
namespace ucx_internal {
namespace {

// After a forced close UCX completes every outstanding request with an error; a job still
// waiting this long afterwards is reported (once), and keeps waiting.
constexpr absl::Duration kStuckAfterAbort = absl::Seconds(5);

}  // namespace

void ReadJob::Start() {
  if (call_->runs.empty()) {
    Answer(absl::OkStatus());
    phase_ = Phase::kDone;
    return;
  }
  const std::string address(static_cast<const char*>(call_->address.data()),
                            call_->address.size());
  peer_errors_ = !local_.no_peer_errors->contains(address);
  ucp_ep_h ep = nullptr;
  ucs_status_t s = CreateEndpoint(peer_errors_, &ep);
  if (s == UCS_ERR_UNREACHABLE && peer_errors_) {
    // UCX found no transport to the peer that detects peer failures (in 1.13, shared memory
    // alone reaches it). Without error handling a dead peer fails no request, so the deadline
    // is what ends such a read.
    peer_errors_ = false;
    s = CreateEndpoint(peer_errors_, &ep);
    if (s == UCS_OK) {
      // Bounded: addresses of peers that came and went must not pile up.
      if (local_.no_peer_errors->size() >= 1024) local_.no_peer_errors->clear();
      local_.no_peer_errors->insert(address);
    }
  }
  if (s != UCS_OK) {
    Answer(UcsError(absl::StatusCode::kUnavailable, s,
                    "UCX cannot open an endpoint to from.worker_address"));
    phase_ = Phase::kDone;
    return;
  }
  ep_ = Endpoint(ep);
  ucp_rkey_h rkey = nullptr;
  if (ucs_status_t s = ucp_ep_rkey_unpack(ep, call_->rkey.data(), &rkey); s != UCS_OK) {
    Answer(UcsError(absl::StatusCode::kInvalidArgument, s,
                    "from.rkey: UCX cannot unpack it for this peer"));
    StartClose(/*force=*/false, Phase::kClosing);
    return;
  }
  rkey_.reset(rkey);
}

ucs_status_t ReadJob::CreateEndpoint(bool peer_errors, ucp_ep_h* ep) {
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  params.address = static_cast<const ucp_address_t*>(call_->address.data());
  // With peer error handling a peer that dies fails the endpoint (and its requests) instead of
  // leaving them pending.
  params.err_mode = peer_errors ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
  if (peer_errors) {
    params.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
    params.err_handler.cb = &ReadJob::OnPeerError;
    params.err_handler.arg = this;
  }
  return ucp_ep_create(local_.worker, &params, ep);
}

ucp_request_param_t ReadJob::Param(ucp_send_nbx_callback_t cb) {
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.cb.send = cb;
  param.user_data = this;
  return param;
}

void ReadJob::Post() {
  const absl::Span<const CopyRun> runs = call_->runs;
  while (next_run_ < runs.size() && in_flight_ < kMaxInFlight && request_error_ == UCS_OK &&
         peer_error_ == UCS_OK) {
    const CopyRun& run = runs[next_run_++];
    ucp_request_param_t param = Param(&ReadJob::OnGetDone);
    // The pool's handle spares UCX a registration-cache lookup per get, and its memory type a
    // detection.
    param.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMORY_TYPE | UCP_OP_ATTR_FIELD_MEMH;
    param.memory_type = local_.memory_type;
    param.memh = local_.memh;
    // Counted before the call: a callback may run before ucp_get_nbx returns.
    ++in_flight_;
    ucs_status_ptr_t request =
        ucp_get_nbx(ep_.get(), local_.base + run.local_offset, run.bytes,
                    call_->remote_base + run.remote_offset, rkey_.get(), &param);
    if (UCS_PTR_IS_ERR(request)) {
      --in_flight_;
      request_error_ = UCS_PTR_STATUS(request);
      return;
    }
    if (request == nullptr) --in_flight_;  // completed at once; no callback
    ++stats_.requests;
    stats_.bytes += run.bytes;
  }
}

void ReadJob::StartFlush() {
  phase_ = Phase::kFlushing;
  ++in_flight_;
  ucp_request_param_t param = Param(&ReadJob::OnFlushDone);
  ucs_status_ptr_t request = ucp_ep_flush_nbx(ep_.get(), &param);
  if (request == nullptr || UCS_PTR_IS_ERR(request)) {
    --in_flight_;
    if (UCS_PTR_IS_ERR(request)) request_error_ = UCS_PTR_STATUS(request);
    else flushed_ = true;
  }
}

void ReadJob::StartClose(bool force, Phase next) {
  phase_ = next;
  close_pending_ = true;  // before the call: its callback may run inside it
  ucs_status_ptr_t request =
      ep_.Close(force ? UCP_EP_CLOSE_FLAG_FORCE : 0, Param(&ReadJob::OnCloseDone));
  if (request == nullptr || UCS_PTR_IS_ERR(request)) close_pending_ = false;
}

void ReadJob::Fail(absl::Status status) {
  failure_ = std::move(status);
  abort_started_ = absl::Now();
  // Before answering, no request of this job may still be able to write into the local pool:
  // the caller may hand the pages to someone else the moment Read returns. A forced close
  // tears down the endpoint's transport lanes (no more data lands through them) and completes
  // every outstanding request with an error; kAborting waits for all of those callbacks, and
  // for the close itself, before answering.
  //
  // Without peer error handling (UCX 1.13's shared-memory transports alone reach the peer) UCX
  // calls a forced close undefined, and it would not complete the requests anyway: they are
  // tracked for purging only with error handling. Such an endpoint is closed with a flush, and
  // the job waits for its requests as above. A peer that is late answers them; one that died
  // never does, and then the read never ends: answering earlier would let a late reply write
  // into pages the caller has freed. Production configurations include tcp or an RDMA
  // transport (UCX_TLS), which detect a dead peer.
  StartClose(/*force=*/peer_errors_, Phase::kAborting);
}

void ReadJob::Answer(absl::Status status) {
  ReadCall* call = call_;
  call_ = nullptr;
  call->status = std::move(status);
  call->stats = stats_;
  call->done.Notify();  // the caller may free `call` from here on
}

void ReadJob::Advance(absl::Time now) {
  for (;;) {
    const Phase before = phase_;
    switch (phase_) {
      case Phase::kPosting:
      case Phase::kFlushing:
        if (peer_error_ != UCS_OK || request_error_ != UCS_OK) {
          const bool peer = peer_error_ != UCS_OK;
          if (peer) {
            spdlog::warn("ucx: a read's peer failed ({}) after {} of {} runs were posted",
                         ucs_status_string(peer_error_), next_run_, call_->runs.size());
          }
          Fail(UcsError(absl::StatusCode::kUnavailable, peer ? peer_error_ : request_error_,
                        absl::StrFormat("%s after %d of %d runs were posted",
                                        peer ? "UCX reports the peer at from.worker_address failed"
                                             : "a UCX get from the peer failed",
                                        next_run_, call_->runs.size())));
        } else if (now >= call_->deadline) {
          Fail(absl::DeadlineExceededError(absl::StrFormat(
              "the read's deadline passed with %d of %d runs posted and %d requests in flight",
              next_run_, call_->runs.size(), in_flight_)));
        } else if (phase_ == Phase::kPosting) {
          Post();
          if (next_run_ == call_->runs.size() && in_flight_ == 0 && request_error_ == UCS_OK) {
            StartFlush();
          }
        } else if (flushed_ && in_flight_ == 0) {
          rkey_.reset();  // flushed, and before its endpoint is destroyed
          Answer(absl::OkStatus());
          // The data is in place; closing (gracefully, so that the peer drops its side too)
          // goes on in the background.
          StartClose(/*force=*/false, Phase::kClosing);
        }
        break;
      case Phase::kClosing:
        if (!close_pending_) phase_ = Phase::kDone;
        break;
      case Phase::kAborting:
        // The key goes once no request uses it. UCX wants it gone before the endpoint, but a
        // forced close may finish first; the key holds no reference to the endpoint (only to
        // the worker and the remote memory's mappings), so releasing it afterwards is safe.
        if (in_flight_ == 0) rkey_.reset();
        if (in_flight_ == 0 && !close_pending_) {
          Answer(failure_);
          phase_ = Phase::kDone;
        } else if (!stuck_logged_ && now - abort_started_ > kStuckAfterAbort) {
          stuck_logged_ = true;
          spdlog::error("ucx: a failed read still has {} requests in flight {} after its "
                        "endpoint was closed; its caller keeps waiting (UCX_TLS without a "
                        "transport that detects dead peers?)",
                        in_flight_, absl::FormatDuration(now - abort_started_));
        }
        break;
      case Phase::kDone:
        break;
    }
    if (phase_ == before) return;
  }
}

void ReadJob::Cancel(absl::Status status) {
  if (phase_ == Phase::kPosting || phase_ == Phase::kFlushing) Fail(std::move(status));
}

ReadCall* ReadJob::Abandon() {
  // The worker's destruction ends these; destroying them on a dead worker would not be safe.
  rkey_.release();
  phase_ = Phase::kDone;
  ReadCall* call = call_;
  call_ = nullptr;
  return call;
}

void ReadJob::OnGetDone(void* request, ucs_status_t status, void* job) {
  auto* self = static_cast<ReadJob*>(job);
  --self->in_flight_;
  if (status != UCS_OK && self->request_error_ == UCS_OK) self->request_error_ = status;
  ucp_request_free(request);
}

void ReadJob::OnFlushDone(void* request, ucs_status_t status, void* job) {
  auto* self = static_cast<ReadJob*>(job);
  --self->in_flight_;
  if (status != UCS_OK && self->request_error_ == UCS_OK) self->request_error_ = status;
  self->flushed_ = status == UCS_OK;
  ucp_request_free(request);
}

void ReadJob::OnCloseDone(void* request, ucs_status_t, void* job) {
  static_cast<ReadJob*>(job)->close_pending_ = false;
  ucp_request_free(request);
}

void ReadJob::OnPeerError(void* job, ucp_ep_h, ucs_status_t status) {
  auto* self = static_cast<ReadJob*>(job);
  if (self->peer_error_ == UCS_OK) self->peer_error_ = status;
}

}  // namespace ucx_internal
}  // namespace attnd
