// The engine's requests and results, in plain C++: what the wire layer converts the protobuf
// messages into and out of. Field names follow the wire's, so an error message that names a
// field ("items[3].num_new_tokens", "q.shape") names the field the client sent.
#ifndef ATTND_SERVER_ENGINE_CALLS_H_
#define ATTND_SERVER_ENGINE_CALLS_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "kernels/paged_kv.h"
#include "server/config/config.h"
#include "server/engine/clients.h"
#include "server/engine/kv_pool.h"
#include "server/regions/tensor_ref.h"

namespace attnd {

// When a data call stops being worth doing: past its deadline, or once the client has gone
// (is_cancelled, called from the device's worker; may be empty). A call found expired or
// cancelled when its turn comes on the device changes nothing (DESIGN.md invariant 8).
struct CallLife {
  absl::Time deadline = absl::InfiniteFuture();
  std::function<bool()> is_cancelled;
};

// Names of registered IPC events: wait on one before reading inputs, record the other after
// writing outputs. Either may be empty.
struct EventNames {
  std::string wait_event;
  std::string signal_event;
  bool empty() const { return wait_event.empty() && signal_event.empty(); }
};

struct AppendCall {
  ClientRef client;  // whose sequences, regions and events the call names
  uint32_t device = 0;
  uint32_t layer = 0;
  std::vector<AppendItem> items;
  TensorName k_new, v_new;
  EventNames sync;
  CallLife life;
};

// Prefill and Decode.
struct AttentionCall {
  ClientRef client;  // whose sequences, regions and events the call names
  uint32_t device = 0;
  uint32_t layer = 0;
  std::vector<AppendItem> items;
  TensorName q, k_new, v_new, out;
  TensorName lse;  // region empty: no lse output
  bool deterministic = false;
  EventNames sync;
  CallLife life;
};

// Each item's length at the call's layer once its tokens are in.
struct DataResult {
  std::vector<uint64_t> lengths;
};

// ExportKv (pool -> buffer) and ImportKv (buffer -> pool) of a head range.
struct KvTransferCall {
  ClientRef client;  // whose sequences, regions and events the call names
  uint32_t device = 0;
  uint64_t seq_id = 0;
  uint32_t layer_begin = 0, layer_end = 0;
  uint32_t head_begin = 0, head_end = 0;
  uint64_t num_tokens = 0;
  TensorName buffer;  // dst of an export, src of an import
  EventNames sync;
};

// ---- KV transfer between attnd processes ----
// The owner of a sequence lets peers pull positions [0, num_tokens) of it (0: its length).
struct KvGrantCall {
  ClientRef client;
  uint32_t device = 0;
  uint64_t seq_id = 0;
  uint64_t num_tokens = 0;
  absl::Duration ttl = absl::Seconds(60);
  uint32_t max_pulls = 0;  // 0: any number until the grant ends
};

struct KvGrantInfo {
  std::string grant;  // 16 bytes: the capability
  uint64_t num_tokens = 0;
  absl::Time expires;
};

// What a pull of a grant may read on the source: its pages and the pool they are in.
struct KvPullSource {
  uint64_t pull_id = 0;
  uint32_t device = 0;    // the device id
  int device_index = 0;
  int64_t num_tokens = 0;
  std::vector<int32_t> pages;  // of positions [0, num_tokens)
  kernels::KvCacheShape shape;  // the source pool's
  // fp8 pools: the source device's scales of every layer (empty for a model-dtype pool).
  std::vector<kernels::KvScales> scales;
};

// A destination's pull into sequence seq_id: pages reserved, then filled, then adopted.
struct KvPullTarget {
  ClientRef client;
  uint32_t device = 0;
  uint64_t seq_id = 0;
  int64_t num_tokens = 0;
  int64_t layer_begin = 0, layer_end = 0;  // this server's layers the pull fills
  // fp8 pools: the source's scales of the layers it sends (source layers src_layer_begin on),
  // which this server's scales at [layer_begin, layer_end) must equal (the bytes move raw).
  int64_t src_layer_begin = 0;
  std::vector<kernels::KvScales> src_scales;
};

struct HostRegionSpec {
  std::string name;
  std::string shm_key;
  uint64_t offset = 0;
  uint64_t byte_size = 0;
};

struct IpcRegionSpec {
  std::string name;
  std::string ipc_handle;  // raw bytes
  uint32_t device = 0;
  uint64_t byte_size = 0;
};

struct IpcEventSpec {
  std::string name;
  std::string ipc_handle;  // raw bytes
  uint32_t device = 0;
};

struct SequenceState {
  int device = 0;
  uint64_t seq_id = 0;
  std::vector<int64_t> layer_lengths;
  uint64_t num_pages = 0;
  uint64_t shared_pages = 0;
};

struct DeviceState {
  int device = 0;
  std::string name;
  int64_t total_pages = 0;
  int64_t free_pages = 0;
  int64_t live_sequences = 0;
  bool serving = true;
  int64_t pool_bytes = 0;
  std::vector<kernels::KvScales> kv_scales;  // fp8 pools: every layer's; else empty
};

// GetLease: what a client holds and may hold.
struct LeaseState {
  std::string client;
  int64_t sequences = 0;  // on all devices
  int64_t pages = 0;
  int64_t regions = 0;
  int64_t region_bytes = 0;
  int64_t events = 0;
};

// ReleaseAll: what went back.
struct ReleasedHoldings {
  int64_t sequences = 0;
  int64_t freed_pages = 0;
  int64_t regions = 0;
  int64_t events = 0;
};

// What GetServerInfo reports.
struct EngineInfo {
  bool cuda = false;
  ModelShape model;
  std::vector<DeviceState> devices;
  std::vector<int64_t> graph_buckets;
  int64_t max_batch_size = 0;
  int64_t max_seq_len = 0;
  int64_t max_tokens_per_request = 0;
  std::vector<std::string> features;
};

}  // namespace attnd

#endif  // ATTND_SERVER_ENGINE_CALLS_H_
