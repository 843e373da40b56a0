#include "server/transport/ucx_transport.h"

#include <poll.h>
#include <ucp/api/ucp.h>

#include <algorithm>
#include <utility>

#include "absl/strings/str_format.h"
#include "absl/synchronization/notification.h"
#include "server/transport/ucx_blob.h"
#include "server/transport/ucx_handles.h"
#include "server/transport/ucx_read.h"
#include "spdlog/spdlog.h"

namespace attnd {
namespace ucx_internal {

// Everything UCX of one transport, made and destroyed on its progress thread. Members go in
// reverse order: the pool's registration, then the worker (and any endpoint left on it), then
// the context.
struct WorkerState {
  ContextPtr context;
  WorkerPtr worker;
  MemPtr memh;
  int efd = -1;  // the worker's event fd; the worker owns it
  absl::flat_hash_set<std::string> no_peer_errors;  // see LocalPool
  LocalPool local;
};

}  // namespace ucx_internal

namespace {

using ucx_internal::BlobKind;
using ucx_internal::LocalPool;
using ucx_internal::ReadCall;
using ucx_internal::ReadJob;
using ucx_internal::UcsError;
using ucx_internal::WorkerState;

// Progress rounds without a UCX event, while a read waits for an answer, before the thread
// sleeps on the event fd: a short spin keeps latency low between the gets of a read.
constexpr int kSpinRounds = 256;
// The longest sleep while a read is unanswered: its deadline is checked this often.
constexpr absl::Duration kBusySleep = absl::Milliseconds(1);
// The longest sleep when idle: a safety net in case a transport misses a wake-up event.
constexpr absl::Duration kIdleSleep = absl::Milliseconds(10);
// How long the destructor waits for cancelled reads to release their requests.
constexpr absl::Duration kDrainLimit = absl::Seconds(2);

// Makes the context and worker, registers `pool` and packs what peers need to read it.
absl::StatusOr<std::unique_ptr<WorkerState>> OpenWorker(const PoolMemory& pool,
                                                        std::string* worker_address,
                                                        std::string* pool_rkey) {
  auto state = std::make_unique<WorkerState>();
  ucp_config_t* config_raw = nullptr;
  if (ucs_status_t s = ucp_config_read(nullptr, nullptr, &config_raw); s != UCS_OK) {
    return UcsError(absl::StatusCode::kInvalidArgument, s,
                    "reading UCX's configuration (the UCX_* environment variables)");
  }
  ucx_internal::ConfigPtr config(config_raw);

  ucp_params_t params{};
  params.field_mask =
      UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED | UCP_PARAM_FIELD_NAME;
  // RMA for the gets; AM too, because UCX builds its zero-copy RMA lanes only when active
  // messages are requested with RMA; WAKEUP for the event fd the thread sleeps on.
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.mt_workers_shared = 0;
  params.name = "attnd";
  ucp_context_h context = nullptr;
  if (ucs_status_t s = ucp_init(&params, config.get(), &context); s != UCS_OK) {
    return UcsError(absl::StatusCode::kUnavailable, s, "initialising UCX");
  }
  state->context.reset(context);

  ucp_worker_params_t worker_params{};
  worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  worker_params.thread_mode = UCS_THREAD_MODE_SINGLE;  // the progress thread alone uses it
  ucp_worker_h worker = nullptr;
  if (ucs_status_t s = ucp_worker_create(context, &worker_params, &worker); s != UCS_OK) {
    return UcsError(absl::StatusCode::kUnavailable, s, "creating a UCX worker");
  }
  state->worker.reset(worker);
  if (ucs_status_t s = ucp_worker_get_efd(worker, &state->efd); s != UCS_OK) {
    return UcsError(absl::StatusCode::kUnavailable, s, "getting the UCX worker's event fd");
  }

  const ucs_memory_type_t memory_type =
      pool.device_memory ? UCS_MEMORY_TYPE_CUDA : UCS_MEMORY_TYPE_HOST;
  ucp_mem_map_params_t map{};
  map.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                   UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
  map.address = pool.base;
  map.length = pool.bytes;
  map.memory_type = memory_type;
  ucp_mem_h memh = nullptr;
  if (ucs_status_t s = ucp_mem_map(context, &map, &memh); s != UCS_OK) {
    return UcsError(
        absl::StatusCode::kFailedPrecondition, s,
        absl::StrFormat("registering the pool (%d bytes of %s memory) with UCX%s", pool.bytes,
                        pool.device_memory ? "CUDA device" : "host",
                        pool.device_memory ? "; device memory needs a UCX built with CUDA" : ""));
  }
  state->memh = ucx_internal::MemPtr(memh, ucx_internal::MemDeleter{context});

  void* rkey_buffer = nullptr;
  size_t rkey_bytes = 0;
  if (ucs_status_t s = ucp_rkey_pack(context, memh, &rkey_buffer, &rkey_bytes); s != UCS_OK) {
    return UcsError(absl::StatusCode::kInternal, s, "packing the pool's UCX remote key");
  }
  *pool_rkey = ucx_internal::FrameBlob(BlobKind::kRkey, rkey_buffer, rkey_bytes);
  ucp_rkey_buffer_release(rkey_buffer);

  ucp_address_t* address = nullptr;
  size_t address_bytes = 0;
  if (ucs_status_t s = ucp_worker_get_address(worker, &address, &address_bytes); s != UCS_OK) {
    return UcsError(absl::StatusCode::kInternal, s, "getting the UCX worker's address");
  }
  *worker_address = ucx_internal::FrameBlob(BlobKind::kWorkerAddress, address, address_bytes);
  ucp_worker_release_address(worker, address);

  state->local = LocalPool{worker, memh, static_cast<char*>(pool.base), memory_type,
                           &state->no_peer_errors};
  return state;
}

// INVALID_ARGUMENT naming run `i` when it is empty or ends past either pool.
absl::Status CheckRun(size_t i, const CopyRun& run, uint64_t remote_bytes, uint64_t local_bytes) {
  if (run.bytes == 0) return absl::InvalidArgumentError(absl::StrFormat("runs[%d].bytes is 0", i));
  if (run.remote_offset > remote_bytes || run.bytes > remote_bytes - run.remote_offset) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "runs[%d]: remote_offset %d + bytes %d ends past the remote pool's %d bytes (from.bytes)",
        i, run.remote_offset, run.bytes, remote_bytes));
  }
  if (run.local_offset > local_bytes || run.bytes > local_bytes - run.local_offset) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "runs[%d]: local_offset %d + bytes %d ends past this pool's %d bytes", i,
        run.local_offset, run.bytes, local_bytes));
  }
  return absl::OkStatus();
}

void AnswerUnstarted(ReadCall* call, absl::Status status) {
  call->status = std::move(status);
  call->done.Notify();
}

}  // namespace

absl::StatusOr<std::unique_ptr<UcxTransport>> UcxTransport::Create(
    PoolMemory pool, std::function<void()> bind_thread) {
  if (pool.base == nullptr) return absl::InvalidArgumentError("pool.base is null");
  if (pool.bytes == 0) return absl::InvalidArgumentError("pool.bytes is 0");
  std::unique_ptr<UcxTransport> transport(new UcxTransport(pool));
  absl::Notification ready;
  absl::Status opened;
  transport->thread_ = std::thread(
      [self = transport.get(), bind = std::move(bind_thread), &ready, &opened]() mutable {
        self->Run(std::move(bind), [&](absl::Status s) {
          opened = std::move(s);
          ready.Notify();
        });
      });
  ready.WaitForNotification();
  if (!opened.ok()) {
    transport->thread_.join();  // it has returned already
    return opened;
  }
  return transport;
}

UcxTransport::~UcxTransport() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    if (signal_worker_ != nullptr) ucp_worker_signal(signal_worker_);
  }
  if (thread_.joinable()) thread_.join();
}

std::string UcxTransport::Version() { return ucp_get_version_string(); }

void UcxTransport::Run(std::function<void()> bind_thread,
                       std::function<void(absl::Status)> ready) {
  if (bind_thread) bind_thread();
  absl::StatusOr<std::unique_ptr<WorkerState>> state =
      OpenWorker(pool_, &worker_address_, &pool_rkey_);
  if (!state.ok()) {
    ready(state.status());
    return;  // `state` releases whatever was made, here on this thread
  }
  {
    absl::MutexLock lock(&mu_);
    signal_worker_ = (*state)->worker.get();
  }
  ready(absl::OkStatus());
  Serve(**state);
}

void UcxTransport::Serve(WorkerState& state) {
  std::vector<std::unique_ptr<ReadJob>> jobs;
  int quiet_rounds = 0;
  for (;;) {
    std::vector<ReadCall*> fresh;
    bool stopping;
    {
      absl::MutexLock lock(&mu_);
      fresh.swap(queue_);
      stopping = stopping_;
    }
    if (stopping) {
      for (ReadCall* call : fresh) {
        AnswerUnstarted(call, absl::CancelledError("the UcxTransport is being destroyed"));
      }
      break;
    }
    for (ReadCall* call : fresh) {
      jobs.push_back(std::make_unique<ReadJob>(state.local, call));
      jobs.back()->Start();
    }
    unsigned events = 0;
    while (unsigned n = ucp_worker_progress(state.worker.get())) events += n;
    const absl::Time now = absl::Now();
    for (auto& job : jobs) job->Advance(now);
    std::erase_if(jobs, [](const std::unique_ptr<ReadJob>& job) { return job->finished(); });

    if (events > 0 || !fresh.empty()) {
      quiet_rounds = 0;
      continue;
    }
    const bool answering = std::any_of(jobs.begin(), jobs.end(),
                                       [](const auto& job) { return job->answering(); });
    if (answering && ++quiet_rounds < kSpinRounds) continue;
    quiet_rounds = 0;
    Sleep(state, answering ? kBusySleep : kIdleSleep);
  }
  Drain(state, jobs);
}

void UcxTransport::Sleep(WorkerState& state, absl::Duration timeout) {
  // Arming fails with BUSY when events arrived since the last progress: progress them first.
  ucs_status_t s = ucp_worker_arm(state.worker.get());
  if (s == UCS_ERR_BUSY) return;
  if (s != UCS_OK) {
    // The poll below still times out, so the thread keeps progressing, only more slowly.
    spdlog::error("ucx: arming the worker's event fd failed: {}", ucs_status_string(s));
  }
  {
    // A call queued before the arm may have signalled before it; one queued after it wakes
    // the poll.
    absl::MutexLock lock(&mu_);
    if (!queue_.empty() || stopping_) return;
  }
  pollfd fd{state.efd, POLLIN, 0};
  poll(&fd, 1, static_cast<int>(absl::ToInt64Milliseconds(timeout)));
}

void UcxTransport::Drain(WorkerState& state, std::vector<std::unique_ptr<ReadJob>>& jobs) {
  for (auto& job : jobs) job->Cancel(absl::CancelledError("the UcxTransport is being destroyed"));
  const absl::Time limit = absl::Now() + kDrainLimit;
  while (!jobs.empty() && absl::Now() < limit) {
    ucp_worker_progress(state.worker.get());
    const absl::Time now = absl::Now();
    for (auto& job : jobs) job->Advance(now);
    std::erase_if(jobs, [](const std::unique_ptr<ReadJob>& job) { return job->finished(); });
  }
  // What is left is either closing an answered read's endpoint (harmless) or waiting for
  // requests UCX has not completed. Destroying the worker ends both; only then may an
  // unanswered caller learn that its read is over.
  std::vector<ReadCall*> unanswered;
  for (auto& job : jobs) {
    if (ReadCall* call = job->Abandon()) unanswered.push_back(call);
  }
  if (!unanswered.empty()) {
    spdlog::error("ucx: {} cancelled reads still had requests in flight after {}; destroying "
                  "the worker ends them", unanswered.size(), absl::FormatDuration(kDrainLimit));
  }
  {
    absl::MutexLock lock(&mu_);
    signal_worker_ = nullptr;
  }
  state.memh.reset();
  state.worker.reset();
  for (ReadCall* call : unanswered) {
    AnswerUnstarted(call, absl::CancelledError("the UcxTransport is being destroyed"));
  }
}

absl::Status UcxTransport::Read(const RemotePool& from, absl::Span<const CopyRun> runs,
                                absl::Time deadline, ReadStats* stats) {
  if (stats != nullptr) *stats = ReadStats{};
  if (from.base + from.bytes < from.base) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "from.base %#x + from.bytes %d wraps around the address space", from.base, from.bytes));
  }
  for (size_t i = 0; i < runs.size(); ++i) {
    if (absl::Status s = CheckRun(i, runs[i], from.bytes, pool_.bytes); !s.ok()) return s;
  }
  ReadCall call;
  absl::StatusOr<ucx_internal::Blob> address = ucx_internal::UnframeBlob(
      BlobKind::kWorkerAddress, from.worker_address, "from.worker_address");
  if (!address.ok()) return address.status();
  absl::StatusOr<ucx_internal::Blob> rkey =
      ucx_internal::UnframeBlob(BlobKind::kRkey, from.rkey, "from.rkey");
  if (!rkey.ok()) return rkey.status();
  if (runs.empty()) return absl::OkStatus();
  if (absl::Now() >= deadline) {
    return absl::DeadlineExceededError("the read's deadline had passed before it started");
  }
  call.address = *std::move(address);
  call.rkey = *std::move(rkey);
  call.remote_base = from.base;
  call.runs = runs;
  call.deadline = deadline;
  {
    absl::MutexLock lock(&mu_);
    if (stopping_ || signal_worker_ == nullptr) {
      return absl::CancelledError("the UcxTransport is being destroyed");
    }
    queue_.push_back(&call);
    ucp_worker_signal(signal_worker_);
  }
  call.done.WaitForNotification();
  if (stats != nullptr) *stats = call.stats;
  return call.status;
}

}  // namespace attnd
