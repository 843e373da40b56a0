// The engine: everything attnd does, in plain C++ (it never sees protobuf; server/wire converts).
// It checks requests against the server's limits (messages name the field and the limit),
// resolves named tensors and events, and runs each device's work on that device's worker in
// arrival order. Replies come through a callback, from the worker thread, once outputs are
// written (or, with a signal event, once the work is enqueued).
#ifndef ATTND_SERVER_ENGINE_ENGINE_H_
#define ATTND_SERVER_ENGINE_ENGINE_H_

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/config/config.h"
#include "server/engine/calls.h"
#include "server/engine/clients.h"
#include "server/engine/device_worker.h"
#include "server/engine/kv_grants.h"
#include "server/engine/kv_pool.h"
#include "server/metrics/metrics.h"
#include "server/metrics/request_trace.h"
#include "server/platform/backend.h"
#include "server/platform/platform.h"
#include "server/regions/event_registry.h"
#include "server/regions/region.h"
#include "server/regions/tensor_ref.h"

namespace attnd {

class Engine {
 public:
  using Done = absl::AnyInvocable<void(absl::Status) &&>;
  template <typename T>
  using Reply = absl::AnyInvocable<void(absl::StatusOr<T>) &&>;
  // Called when a device stops (or starts) serving; main mirrors it in health.
  using ServingListener = std::function<void(int device_index, bool serving)>;

  // Starts one worker per configured device and makes its backend there.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const ServerConfig& config,
                                                        std::unique_ptr<DevicePlatform> platform,
                                                        Metrics* metrics);
  // Finishes all queued work, then stops the workers.
  ~Engine();

  void SetServingListener(ServingListener listener) { serving_listener_ = std::move(listener); }
  const ServerConfig& config() const { return config_; }
  int num_devices() const { return static_cast<int>(devices_.size()); }
  bool device_serving(int index) const { return devices_[index]->serving.load(); }
  bool cuda() const { return platform_->kind() == DevicePlatform::Kind::kCuda; }

  EngineInfo Info() const;

  // ---- Clients and leases (engine_clients.cc). Every call below acts for one client and
  // sees only that client's sequences, regions and events.
  ClientRegistry& clients() { return clients_; }
  // Renews the caller's lease and says who it is (the wire layer calls this for every call).
  ClientRef Attach(const Caller& caller) { return clients_.Attach(caller, absl::Now()); }
  LeaseState GetLease(const ClientRef& client);
  // Releases everything the client holds, on every device.
  ReleasedHoldings ReleaseAll(const ClientRef& client);
  // Releases the holdings of clients whose lease ran out by `now`; the lease thread calls it.
  void ReapExpiredLeases(absl::Time now);

  // ---- Regions and events (engine_regions.cc) ----
  absl::Status RegisterHostRegion(const ClientRef& client, const HostRegionSpec& spec);
  void RegisterIpcRegion(const ClientRef& client, const IpcRegionSpec& spec, Done done);
  absl::Status UnregisterRegion(const ClientRef& client, const std::string& name);
  std::vector<RegionSummary> ListRegions(const ClientRef& client) const;
  void RegisterIpcEvent(const ClientRef& client, const IpcEventSpec& spec, Done done);
  absl::Status UnregisterIpcEvent(const ClientRef& client, const std::string& name);

  // ---- Sequences (engine_sequences.cc) ----
  void CreateSequence(const ClientRef& client, uint32_t device, uint64_t seq_id,
                      Reply<SequenceState> reply);
  void ForkSequence(const ClientRef& client, uint32_t device, uint64_t parent_id,
                    uint64_t child_id, Reply<SequenceState> reply);
  void TruncateSequence(const ClientRef& client, uint32_t device, uint64_t seq_id,
                        uint64_t length, Reply<SequenceState> reply);
  // Replies with the pages that went back to the pool.
  void ReleaseSequence(const ClientRef& client, uint32_t device, uint64_t seq_id,
                       Reply<int64_t> reply);
  void GetSequence(const ClientRef& client, uint32_t device, uint64_t seq_id,
                   Reply<SequenceState> reply);
  void ListSequences(const ClientRef& client, uint32_t device,
                     Reply<std::vector<SequenceState>> reply);

  // ---- Data (engine_data.cc); the call names its client. `trace`, when given, must outlive the reply; the engine stamps
  // posted, dequeued, enqueued and completed in it before replying.
  void Append(AppendCall call, Reply<DataResult> reply, RequestTrace* trace = nullptr);
  void Prefill(AttentionCall call, Reply<DataResult> reply, RequestTrace* trace = nullptr);
  void Decode(AttentionCall call, Reply<DataResult> reply, RequestTrace* trace = nullptr);

  // ---- KV export / import (engine_kv.cc); the call names its client. Import replies with every layer's length.
  void ExportKv(KvTransferCall call, Done done);
  void ImportKv(KvTransferCall call, Reply<std::vector<int64_t>> reply);

  // ---- fp8 KV scales (engine_kv_scales.cc) ----
  // Sets layers [layer_begin, layer_begin + scales.size()) of a device's fp8 pool, on its
  // worker, so the check that no sequence (of any client) and no grant holds KV there is atomic
  // with the appends around it: KV already stored was quantized with the old scales.
  // FAILED_PRECONDITION for a model-dtype or per-token pool; the wire has checked the request's
  // form.
  void SetKvScales(uint32_t device, int64_t layer_begin, std::vector<kernels::KvScales> scales,
                   Done done);

  // ---- KV transfer between attnd processes (engine_transfer.cc) ----
  // The source. A grant holds the sequence's pages as they are once the device has finished
  // the work enqueued so far; the reply comes then.
  void GrantKv(KvGrantCall call, Reply<KvGrantInfo> reply);
  absl::Status RevokeKv(const ClientRef& client, const std::string& grant);
  // A peer opens a pull of num_tokens of a grant (0: all), to be closed within max_time.
  absl::StatusOr<KvPullSource> OpenKvPull(const std::string& grant, uint64_t num_tokens,
                                          absl::Duration max_time);
  absl::Status CloseKvPull(uint64_t pull_id, bool completed);
  // The destination; these block the calling thread (a puller's, never a gRPC or device
  // worker thread). Reserve returns detached pages once no earlier device work can touch them.
  absl::StatusOr<std::vector<int32_t>> ReserveKvPull(const KvPullTarget& target);
  // Gives the filled pages to the sequence; returns its layer lengths.
  absl::StatusOr<std::vector<int64_t>> CommitKvPull(const KvPullTarget& target,
                                                    std::vector<int32_t> pages);
  void AbortKvPull(uint32_t device, std::vector<int32_t> pages);
  // The shape and memory of a device's pool, and binding a thread to the device: what the KV
  // transport registers and where its thread runs.
  absl::StatusOr<kernels::KvCacheShape> PoolShape(uint32_t device) const;
  absl::StatusOr<KvPoolMemory> PoolMemoryOf(uint32_t device) const;
  absl::Status BindThreadToDevice(uint32_t device);
  // Within one node (CUDA): the IPC handle of a device's pool; a peer's pool mapped into one
  // of ours (closed on that device's worker when the last holder lets go); and a pull from
  // such a mapping into our pool, waiting (the caller's thread) until it is done.
  absl::StatusOr<std::string> PoolIpcHandle(uint32_t device);
  absl::StatusOr<std::shared_ptr<Region>> MapPeerPool(uint32_t device, const std::string& handle,
                                                      uint64_t bytes);
  absl::Status PullFromPeerPool(uint32_t device, const PeerPoolPull& pull);
  const KvGrants& grants() const { return grants_; }

 private:
  struct Device {
    int id = 0;     // the index clients name
    int index = 0;  // position in devices_
    std::unique_ptr<DeviceBackend> backend;
    std::unique_ptr<KvPool> pool;
    std::atomic<bool> serving{true};
    std::atomic<int64_t> used_pages{0};
    std::atomic<int64_t> live_sequences{0};
    // fp8 pools: every layer's scales, as the backend has them; set on the worker, read
    // anywhere (Info, OpenKvPull).
    mutable absl::Mutex scales_mu;
    std::vector<kernels::KvScales> kv_scales ABSL_GUARDED_BY(scales_mu);
    // Grants whose pages are held but that are not in grants_ yet (GrantKv waits for the
    // device first); SetKvScales counts them as holding KV.
    std::atomic<int64_t> grants_in_making{0};
    std::unique_ptr<DeviceWorker> worker;  // last: destroyed (drained) first
  };

  Engine(const ServerConfig& config, std::unique_ptr<DevicePlatform> platform, Metrics* metrics);
  // Wakes every so often to release the holdings of clients whose lease ran out, and to end
  // grants and pulls past their deadlines.
  void RunLeaseThread();
  // Drops the pages of ended grants on their devices' workers.
  void DropHolds(std::vector<EndedHold> ended);

  // Finds the device a request names; INVALID_ARGUMENT if it is not one of ours, UNAVAILABLE
  // after a fault.
  absl::StatusOr<Device*> FindDevice(uint32_t device) const;
  // Runs `task` on the device's worker, which replies through `reply`; stamps `trace` (if any)
  // when the task is queued, starts and ends. A device that faulted meanwhile answers
  // UNAVAILABLE without running the task.
  template <typename T>
  void Post(Device* device, Reply<T> reply,
            absl::AnyInvocable<absl::StatusOr<T>(Device&) &&> task, RequestTrace* trace = nullptr);
  void PostDone(Device* device, Done done, absl::AnyInvocable<absl::Status(Device&) &&> task);
  // Runs fn on the device's worker and waits for it.
  absl::Status RunOnWorker(Device& device, absl::AnyInvocable<absl::Status() &&> fn);
  RunOnDevice PosterFor(Device& device);

  void Attention(AttentionCall call, bool decode, Reply<DataResult> reply, RequestTrace* trace);
  absl::StatusOr<std::unique_ptr<HostRegion>> OpenHostRegion(const ClientRef& client,
                                                              const HostRegionSpec& spec);
  // Pins (where the platform does) and names a host region the client registered.
  absl::Status AddHostRegion(const ClientRef& client, std::unique_ptr<HostRegion> region);
  // Keeps `held` (regions, events) alive until the GPU work enqueued so far is done, then lets
  // go of it on the device's worker.
  template <typename T>
  absl::Status KeepUntilDone(Device& device, T held) {
    DeviceWorker* worker = device.worker.get();
    return device.backend->WhenDone([worker, held = std::move(held)]() mutable {
      worker->Post([h = std::move(held)]() {});
    });
  }
  // A backend error is sticky: the device takes no more work. Returns the error the caller
  // answers with.
  absl::Status MarkFaulted(Device& device, const absl::Status& status, absl::string_view what);
  // Whether the pool has per-layer scales (kFp8E4M3): the only pools SetKvScales, the devices'
  // kv_scales and a pull's scale check are about. A per-token pool's scales are in its memory,
  // written by append, and move with its pages.
  bool layer_scaled_pool() const {
    return config_.model.kv_storage == kernels::KvStorage::kFp8E4M3;
  }
  std::vector<kernels::KvScales> ScalesOf(const Device& device) const;
  // Gives a new device's backend the configured scales (fp8 pools), on its worker.
  absl::Status InitKvScales(Device& device);
  // Refuses (FAILED_PRECONDITION, naming the layer and the holder) while a sequence holds KV
  // at a layer of [layer_begin, layer_end) or a grant holds pages of the device. Worker only.
  absl::Status CheckNoKvAt(const Device& device, int64_t layer_begin, int64_t layer_end) const;
  // fp8 pools: the target's source scales equal this device's at the layers it fills. Worker.
  absl::Status CheckPullScalesOn(const Device& device, const KvPullTarget& target) const;
  void PublishPoolState(Device& device);
  SequenceState StateOf(const Device& device, const Sequence& seq) const;
  absl::StatusOr<ResolvedEvents> ResolveEvents(const EventNames& sync, const Device& device,
                                               const ClientRef& client) const;
  // How long each device worker polls for work before sleeping (--worker_spin_us, resolved).
  std::chrono::microseconds WorkerSpin() const;

  // Constant after Create.
  const ServerConfig config_;
  const std::unique_ptr<DevicePlatform> platform_;
  Metrics* const metrics_;
  std::vector<std::unique_ptr<Device>> devices_;
  ServingListener serving_listener_;

  // Thread-safe registries of clients and their memory and events.
  ClientRegistry clients_;
  RegionRegistry regions_;
  EventRegistry events_;
  KvGrants grants_;

  // The lease thread; stop_leases_ ends it.
  absl::Mutex lease_mu_;
  bool stop_leases_ ABSL_GUARDED_BY(lease_mu_) = false;
  std::thread lease_thread_;
};

}  // namespace attnd

#endif  // ATTND_SERVER_ENGINE_ENGINE_H_
