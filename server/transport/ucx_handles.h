// Owners of UCX handles (each releases its one resource) and the translation of ucs_status_t
// into absl::Status. Internal to server/transport: every call here runs on a UcxTransport's
// progress thread, the one thread that touches its worker.
#ifndef ATTND_SERVER_TRANSPORT_UCX_HANDLES_H_
#define ATTND_SERVER_TRANSPORT_UCX_HANDLES_H_

#include <ucp/api/ucp.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace attnd {
namespace ucx_internal {

struct ConfigDeleter {
  void operator()(ucp_config_t* config) const { ucp_config_release(config); }
};
using ConfigPtr = std::unique_ptr<ucp_config_t, ConfigDeleter>;

struct ContextDeleter {
  void operator()(ucp_context_h context) const { ucp_cleanup(context); }
};
using ContextPtr = std::unique_ptr<ucp_context, ContextDeleter>;

// Destroying a worker also destroys the endpoints still open on it.
struct WorkerDeleter {
  void operator()(ucp_worker_h worker) const { ucp_worker_destroy(worker); }
};
using WorkerPtr = std::unique_ptr<ucp_worker, WorkerDeleter>;

struct MemDeleter {
  ucp_context_h context = nullptr;
  void operator()(ucp_mem_h memh) const { ucp_mem_unmap(context, memh); }
};
using MemPtr = std::unique_ptr<ucp_mem, MemDeleter>;

// UCX requires a remote key to be destroyed once the operations using it are flushed, and
// before its endpoint is destroyed.
struct RkeyDeleter {
  void operator()(ucp_rkey_h rkey) const { ucp_rkey_destroy(rkey); }
};
using RkeyPtr = std::unique_ptr<ucp_rkey, RkeyDeleter>;

// An open endpoint. Closing is asynchronous (a request completes it during progress), so the
// owner normally calls Close and tracks the request; the destructor is the fallback for an
// endpoint nobody closed: it force-closes it and lets UCX free the request when it completes.
class Endpoint {
 public:
  Endpoint() = default;
  explicit Endpoint(ucp_ep_h ep) : ep_(ep) {}
  Endpoint(Endpoint&& other) noexcept : ep_(other.ep_) { other.ep_ = nullptr; }
  Endpoint& operator=(Endpoint&& other) noexcept {
    if (this != &other) {
      Reset();
      ep_ = other.ep_;
      other.ep_ = nullptr;
    }
    return *this;
  }
  Endpoint(const Endpoint&) = delete;
  Endpoint& operator=(const Endpoint&) = delete;
  ~Endpoint() { Reset(); }

  ucp_ep_h get() const { return ep_; }
  explicit operator bool() const { return ep_ != nullptr; }

  // Starts closing (flags: 0 flushes first, UCP_EP_CLOSE_FLAG_FORCE does not) and gives up the
  // handle. The result is ucp_ep_close_nbx's: nullptr (closed), an error pointer (closed,
  // failed), or a request whose callback in `param` reports completion.
  ucs_status_ptr_t Close(uint32_t flags, ucp_request_param_t param) {
    param.op_attr_mask |= UCP_OP_ATTR_FIELD_FLAGS;
    param.flags = flags;
    ucs_status_ptr_t request = ucp_ep_close_nbx(ep_, &param);
    ep_ = nullptr;
    return request;
  }

 private:
  void Reset() {
    if (ep_ == nullptr) return;
    ucp_request_param_t param{};
    ucs_status_ptr_t request = Close(UCP_EP_CLOSE_FLAG_FORCE, param);
    if (request != nullptr && !UCS_PTR_IS_ERR(request)) ucp_request_free(request);
  }

  ucp_ep_h ep_ = nullptr;
};

// `what` failed with `status`: an absl::Status of `code` naming both.
inline absl::Status UcsError(absl::StatusCode code, ucs_status_t status, absl::string_view what) {
  return absl::Status(code, absl::StrCat(what, ": ", ucs_status_string(status), " (UCX ",
                                         ucp_get_version_string(), ")"));
}

}  // namespace ucx_internal
}  // namespace attnd

#endif  // ATTND_SERVER_TRANSPORT_UCX_HANDLES_H_
