// What a backend does for one device: own the KV pool's memory and run append, attention and
// page copies on it. The engine has already validated every pointer and reserved every page,
// so a backend sees only plain, in-bounds work. Calls come from the device's worker thread.
#ifndef ATTND_SERVER_BACKEND_H_
#define ATTND_SERVER_BACKEND_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/paged_kv.h"
#include "server/config.h"
#include "server/kv_pool.h"

namespace attnd {

// One sequence of a data batch: its page table, the length before the call (where its new
// tokens start at this layer) and how many new tokens it brings.
struct BatchEntry {
  absl::Span<const int32_t> page_table;
  int64_t start = 0;
  int64_t num_new = 0;
};

// CUDA IPC events of a request (cudaEvent_t, opened in this process): the stream waits on
// `wait` before reading inputs and records `signal` after writing outputs; with `signal` the
// backend returns once the work is enqueued instead of once it is done.
struct EventSyncWork {
  void* wait = nullptr;
  void* signal = nullptr;
};

struct AppendWork {
  int64_t layer = 0;
  std::vector<BatchEntry> entries;
  const void* k_new = nullptr;  // [total_new, kv_heads, head_dim], rows packed in entry order
  const void* v_new = nullptr;
  EventSyncWork sync;
  // KvPool::table_epoch() when `entries` were made (0: unknown). With the epoch and the tables
  // (addresses, sizes) of the previous call unchanged, a backend may keep the page ids it
  // already uploaded.
  uint64_t table_epoch = 0;
  // Set by the backend, for the request's stage timings: when its host work was done (CUDA:
  // everything launched, before any wait for the GPU; CPU: everything computed).
  mutable std::chrono::steady_clock::time_point enqueued{};
};

struct AttentionWork {
  AppendWork append;            // written first; the queries then see their own keys
  const void* q = nullptr;      // [total_new, qo_heads, head_dim]
  void* out = nullptr;          // [total_new, qo_heads, head_dim]
  float* lse = nullptr;         // [total_new, qo_heads] or null
  bool deterministic = false;
  bool decode = false;          // every entry has num_new == 1 (the graph path on CUDA)
  // Set by the backend: the batch bucket whose captured graph ran it, or 0 (eager launches).
  mutable int graph_bucket = 0;
  // Set by the backend, as AppendWork::enqueued, for the whole call.
  mutable std::chrono::steady_clock::time_point enqueued{};
};

// A head range of positions [0, num_tokens) of layers [layer_begin, layer_end), to or from a
// dense buffer [layers][2][num_tokens][heads][head_dim] (KvTransferLayout in the proto).
struct KvTransferWork {
  absl::Span<const int32_t> page_table;
  int64_t layer_begin = 0, layer_end = 0;
  int64_t head_begin = 0, head_end = 0;
  int64_t num_tokens = 0;
  void* buffer = nullptr;
  bool to_pool = false;  // import: buffer -> pool; export: pool -> buffer
};

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;
  virtual std::string name() const = 0;
  virtual int64_t num_pages() const = 0;
  virtual int64_t pool_bytes() const = 0;
  // Copies whole pages (all layers, K and V) for copy-on-write, before the writes that follow.
  virtual absl::Status CopyPages(absl::Span<const PageCopy> copies) = 0;
  virtual absl::Status Append(const AppendWork& work) = 0;
  virtual absl::Status Attention(const AttentionWork& work) = 0;
  virtual absl::Status TransferKv(const KvTransferWork& work) = 0;
  // Runs fn once the work enqueued so far has finished (at once where work is synchronous).
  // fn must not call into the backend; it may post to the device's worker.
  virtual absl::Status WhenDone(absl::AnyInvocable<void() &&> fn) {
    std::move(fn)();
    return absl::OkStatus();
  }
  // Whether an attention batch with these lengths (before the call) and new-token counts fits
  // the backend's fixed workspaces. Asked before any page is reserved, so a batch that does not
  // fit is refused with nothing changed (RESOURCE_EXHAUSTED naming the limit).
  virtual absl::Status CheckAttentionFits(absl::Span<const int64_t> starts,
                                          absl::Span<const int64_t> num_new, bool deterministic) {
    (void)starts, (void)num_new, (void)deterministic;
    return absl::OkStatus();
  }
};

// The CPU backend: pools in host memory, attention in fp32 (kernels/cpu_attention.h).
absl::StatusOr<std::unique_ptr<DeviceBackend>> CreateCpuDeviceBackend(const ServerConfig& config,
                                                                       int device);

}  // namespace attnd

#endif  // ATTND_SERVER_BACKEND_H_
