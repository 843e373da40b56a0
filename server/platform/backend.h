// What a backend does for one device: own the KV pool's memory, plan attention batches against
// its fixed workspaces, and run append, attention and page copies. The engine has already
// validated every pointer and reserved every page, so a backend sees only plain, in-bounds
// work. Every call comes from the device's worker thread (bound to the device on CUDA).
#ifndef ATTND_SERVER_PLATFORM_BACKEND_H_
#define ATTND_SERVER_PLATFORM_BACKEND_H_

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
#include "server/config/config.h"
#include "server/platform/page_copy.h"

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
};

// The shape of an attention batch before the call: what a plan is made from. Known before any
// page is reserved, so a batch the workspaces cannot hold is refused with nothing changed.
struct AttentionBatch {
  absl::Span<const int64_t> starts;   // each sequence's length before the call
  absl::Span<const int64_t> num_new;  // new tokens (queries) per sequence
  bool deterministic = false;
  bool decode = false;  // the Decode RPC: every entry has num_new == 1
};

// Which kernels run a planned batch; chosen once, by PlanAttention.
enum class AttentionKernel {
  kHost,         // the CPU backend's attention
  kDecodeGraph,  // the captured append + decode graph of a batch-size bucket
  kDecode,       // eager append + split-KV decode
  kPrefill,      // eager append + paged prefill (any mix of chunks and single tokens)
};

// A batch's plan: which kernels run it, and what the backend stored for them (the plan's ints
// stay in the backend's own staging buffer until the launch that follows).
struct AttentionPlan {
  AttentionKernel kernel = AttentionKernel::kHost;
  int graph_bucket = 0;      // kDecodeGraph: the bucket whose graph replays
  int64_t plan_ints = 0;     // ints of the staged plan to upload
  int64_t num_items = 0;     // kPrefill: work items (grid columns)
  int64_t num_merges = 0;    // kPrefill: merges of split items
};

struct AttentionWork {
  AppendWork append;            // written first; the queries then see their own keys
  const void* q = nullptr;      // [total_new, qo_heads, head_dim]
  void* out = nullptr;          // [total_new, qo_heads, head_dim]
  float* lse = nullptr;         // [total_new, qo_heads] or null
  bool deterministic = false;
};

// What a launch did, for the request's stage timings and metrics.
struct LaunchResult {
  // When the backend's host work was done (CUDA: everything launched, before any wait for the
  // GPU; CPU: everything computed).
  std::chrono::steady_clock::time_point enqueued{};
  AttentionKernel kernel = AttentionKernel::kHost;
  int graph_bucket = 0;  // the bucket whose graph ran, or 0 (eager launches)
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

// Positions [0, num_tokens) of kv heads [head_begin, head_end) of layers [layer_begin,
// layer_end) of a peer's pool (mapped on this device), into this pool's `dst_pages` at heads
// [0, head_end - head_begin) and layers from dst_layer_begin. The engine has checked that the
// pools match (page size, head dim, dtype, layout) and reserved dst_pages.
struct PeerPoolPull {
  const uint8_t* src = nullptr;
  kernels::KvCacheShape src_shape;
  absl::Span<const int32_t> src_pages, dst_pages;
  int64_t layer_begin = 0, layer_end = 0, dst_layer_begin = 0;
  int64_t head_begin = 0, head_end = 0;
  int64_t num_tokens = 0;
};

// The pool's memory as the KV transport registers it (it reads and writes pages there while
// the engine keeps those pages out of every kernel's way).
struct KvPoolMemory {
  void* base = nullptr;
  int64_t bytes = 0;
  bool device_memory = false;  // CUDA device memory, else host memory
};

class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;
  virtual std::string name() const = 0;
  virtual int64_t num_pages() const = 0;
  virtual int64_t pool_bytes() const = 0;
  virtual KvPoolMemory pool_memory() const = 0;
  // Copies whole pages (all layers, K and V) for copy-on-write, before the writes that follow.
  virtual absl::Status CopyPages(absl::Span<const PageCopy> copies) = 0;
  virtual absl::StatusOr<LaunchResult> Append(const AppendWork& work) = 0;
  // Chooses the kernels for a batch and plans it into the backend's staging buffers. A batch
  // that does not fit the workspaces is RESOURCE_EXHAUSTED naming the limit. The plan is valid
  // for the next Attention call on this backend only.
  virtual absl::StatusOr<AttentionPlan> PlanAttention(const AttentionBatch& batch) = 0;
  // Runs a batch planned by the PlanAttention call just before, whose entries' lengths are the
  // batch's starts.
  virtual absl::StatusOr<LaunchResult> Attention(const AttentionWork& work,
                                                 const AttentionPlan& plan) = 0;
  virtual absl::Status TransferKv(const KvTransferWork& work) = 0;
  // KV transfer within one node. The IPC handle of the pool's memory, for a peer process to
  // map it; and a pull from such a mapped peer pool into this pool, on the device's stream.
  // UNIMPLEMENTED where the platform maps no peer pools.
  virtual absl::StatusOr<std::string> PoolIpcHandle() {
    return absl::UnimplementedError("this backend has no IPC handle for its pool");
  }
  virtual absl::Status PullFromPeerPool(const PeerPoolPull& pull) {
    (void)pull;
    return absl::UnimplementedError("this backend pulls from no mapped peer pools");
  }
  // fp8 pools: the dequantization scales of layers [layer_begin, layer_begin + scales.size()),
  // used by every kernel that runs after the call (decode graphs read them from device memory).
  // The engine calls it only while no sequence holds KV at those layers. Model-dtype pools:
  // FAILED_PRECONDITION.
  virtual absl::Status SetKvScales(int64_t layer_begin,
                                   absl::Span<const kernels::KvScales> scales) = 0;
  // Runs fn once the work enqueued so far has finished (at once where work is synchronous).
  // fn must not call into the backend; it may post to the device's worker.
  virtual absl::Status WhenDone(absl::AnyInvocable<void() &&> fn) {
    std::move(fn)();
    return absl::OkStatus();
  }
};

}  // namespace attnd

#endif  // ATTND_SERVER_PLATFORM_BACKEND_H_
