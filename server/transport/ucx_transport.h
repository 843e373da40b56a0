// The UCX layer of attnd's KV transfer between attnd processes: a destination attnd pulls runs
// of bytes out of a source attnd's KV pool with one-sided UCX reads (RMA get). Each side
// registers its pool once; the source sends its worker address and pool key to the destination
// over gRPC (RemotePool), and the destination's UcxTransport::Read copies the runs.
//
// One UcxTransport per device pool per process: one UCX context and one worker, driven by one
// progress thread that owns the worker (UCS_THREAD_MODE_SINGLE). Public calls hand jobs to that
// thread and wait. The thread keeps progressing while idle, because UCX's tcp and shared-memory
// transports emulate RMA in software and need the *target's* worker to answer: a source attnd
// that is only ever read from must still progress. It sleeps on the worker's event fd when there
// is nothing to do.
//
// No protobuf and no engine types: offsets and sizes in bytes, blobs as opaque strings.
#ifndef ATTND_SERVER_TRANSPORT_UCX_TRANSPORT_H_
#define ATTND_SERVER_TRANSPORT_UCX_TRANSPORT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

struct ucp_worker;  // <ucp/api/ucp.h>; only server/transport includes UCX

namespace attnd {

// One device's KV pool, registered once with UCX.
struct PoolMemory {
  void* base = nullptr;
  uint64_t bytes = 0;
  bool device_memory = false;  // true: CUDA device memory, else host memory
};

// What a peer's attnd sends over gRPC about its pool: the four accessors of its UcxTransport.
struct RemotePool {
  std::string worker_address;  // UcxTransport::worker_address(), opaque
  std::string rkey;            // UcxTransport::pool_rkey(), opaque
  uint64_t base = 0;           // the pool's first byte in the peer's address space
  uint64_t bytes = 0;
};

// `bytes` bytes at `remote_offset` in the remote pool go to `local_offset` in the local pool.
struct CopyRun {
  uint64_t remote_offset = 0;
  uint64_t local_offset = 0;
  uint64_t bytes = 0;
};

struct ReadStats {
  uint64_t requests = 0;  // UCX get requests posted: one per run
  uint64_t bytes = 0;
};

namespace ucx_internal {
struct ReadCall;
class ReadJob;
struct WorkerState;
}  // namespace ucx_internal

class UcxTransport {
 public:
  // Registers `pool` and starts the progress thread. `bind_thread` runs first on that thread,
  // before any UCX call (the CUDA platform passes one that calls cudaSetDevice, so that device
  // memory is registered in the device's context).
  static absl::StatusOr<std::unique_ptr<UcxTransport>> Create(
      PoolMemory pool, std::function<void()> bind_thread = {});
  // Fails queued and running reads with CANCELLED (returning only once none of their requests
  // can still write), stops the progress thread, closes endpoints, unregisters the pool and
  // destroys the worker and the context. No Read may start once destruction has begun.
  ~UcxTransport();
  UcxTransport(const UcxTransport&) = delete;
  UcxTransport& operator=(const UcxTransport&) = delete;

  // What a peer needs in its RemotePool to read this pool.
  const std::string& worker_address() const { return worker_address_; }
  const std::string& pool_rkey() const { return pool_rkey_; }
  uint64_t pool_base() const { return reinterpret_cast<uintptr_t>(pool_.base); }
  uint64_t pool_bytes() const { return pool_.bytes; }

  // Copies every run from the remote pool `from` into this pool: one UCX get per run (the
  // caller merges adjacent runs first), at most a bounded number in flight. Blocks the calling
  // thread (never a device worker) until every run has arrived, or one fails (UNAVAILABLE:
  // the peer is gone or unreachable), or `deadline` passes (DEADLINE_EXCEEDED). On failure some
  // runs may have been written, but none is still being written: Read returns only once every
  // request it posted has completed or been cancelled. Checks every run against both pools
  // first (INVALID_ARGUMENT naming the run; nothing is read) and the blobs in `from`
  // (INVALID_ARGUMENT naming the field). Any number of threads may read at once.
  // `stats`, when given, counts what was posted. Over transports that cannot detect a dead
  // peer (UCX_TLS=sm,self: UCX 1.13's shared memory has no peer error handling) a read from a
  // peer that dies mid-read never returns, rather than return while its requests may still
  // write; tcp and RDMA transports detect the death and the read fails UNAVAILABLE.
  absl::Status Read(const RemotePool& from, absl::Span<const CopyRun> runs, absl::Time deadline,
                    ReadStats* stats = nullptr);

  // The UCX library's version, e.g. "1.13.1".
  static std::string Version();

 private:
  explicit UcxTransport(PoolMemory pool) : pool_(pool) {}

  // The progress thread: sets itself up (reporting to `ready`), then serves jobs until stopped.
  void Run(std::function<void()> bind_thread, std::function<void(absl::Status)> ready);
  void Serve(ucx_internal::WorkerState& state);
  // Sleeps on the worker's event fd until UCX or a caller signals, or `timeout` passes.
  void Sleep(ucx_internal::WorkerState& state, absl::Duration timeout);
  // After a stop: cancels every job and progresses until each has released its requests.
  void Drain(ucx_internal::WorkerState& state,
             std::vector<std::unique_ptr<ucx_internal::ReadJob>>& jobs);

  const PoolMemory pool_;
  std::string worker_address_;  // framed; set before Create returns, then constant
  std::string pool_rkey_;       // framed; likewise

  absl::Mutex mu_;
  std::vector<ucx_internal::ReadCall*> queue_ ABSL_GUARDED_BY(mu_);
  // For ucp_worker_signal from callers' threads; null while the thread has no worker.
  ucp_worker* signal_worker_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace attnd

#endif  // ATTND_SERVER_TRANSPORT_UCX_TRANSPORT_H_
