// The engine: everything the service does, without gRPC. It validates requests (the message
// names the field and the limit), resolves tensors, and runs each device's work on that
// device's worker in arrival order. Replies come through a completion callback, from the
// worker thread, once outputs are written.
#ifndef ATTND_SERVER_ENGINE_H_
#define ATTND_SERVER_ENGINE_H_

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "attnd/v1/attention.pb.h"
#include "server/backend.h"
#include "server/config.h"
#include "server/device_worker.h"
#include "server/kv_pool.h"
#include "server/metrics.h"
#include "server/region.h"
#include "server/request_trace.h"
#include "server/tensor_ref.h"

namespace attnd {

class Engine {
 public:
  using Done = absl::AnyInvocable<void(absl::Status) &&>;
  // Called when a device stops (or starts) serving; the service mirrors it in health.
  using ServingListener = std::function<void(int device_index, bool serving)>;

  static absl::StatusOr<std::unique_ptr<Engine>> Create(const ServerConfig& config,
                                                        Metrics* metrics);
  // Finishes all queued work, then stops the workers.
  ~Engine();

  void SetServingListener(ServingListener listener) { serving_listener_ = std::move(listener); }
  const ServerConfig& config() const { return config_; }
  int num_devices() const { return static_cast<int>(devices_.size()); }
  bool device_serving(int index) const { return devices_[index]->serving.load(); }
  bool cuda() const { return cuda_; }

  void GetServerInfo(v1::ServerInfo* info) const;

  absl::Status RegisterHostRegion(const v1::RegisterHostRegionRequest& req);
  void RegisterCudaRegion(const v1::RegisterCudaRegionRequest& req,
                          v1::RegisterRegionResponse* resp, Done done);
  absl::Status UnregisterRegion(const v1::UnregisterRegionRequest& req);
  void ListRegions(v1::ListRegionsResponse* resp) const;
  void RegisterCudaEvent(const v1::RegisterCudaEventRequest& req,
                         v1::RegisterCudaEventResponse* resp, Done done);
  absl::Status UnregisterCudaEvent(const v1::UnregisterCudaEventRequest& req);

  void CreateSequence(const v1::CreateSequenceRequest& req, v1::SequenceInfo* resp, Done done);
  void ForkSequence(const v1::ForkSequenceRequest& req, v1::SequenceInfo* resp, Done done);
  void TruncateSequence(const v1::TruncateSequenceRequest& req, v1::SequenceInfo* resp,
                        Done done);
  void ReleaseSequence(const v1::ReleaseSequenceRequest& req, v1::ReleaseSequenceResponse* resp,
                       Done done);
  void GetSequence(const v1::GetSequenceRequest& req, v1::SequenceInfo* resp, Done done);
  void ListSequences(const v1::ListSequencesRequest& req, v1::ListSequencesResponse* resp,
                     Done done);

  // The data requests. `trace`, when given, must outlive the call to `done`; the engine stamps
  // posted, dequeued, enqueued and completed in it before calling `done`.
  void Append(const v1::AppendRequest& req, v1::AppendResponse* resp, Done done,
              RequestTrace* trace = nullptr);
  void Prefill(const v1::AttentionRequest& req, v1::AttentionResponse* resp, Done done,
               RequestTrace* trace = nullptr);
  void Decode(const v1::AttentionRequest& req, v1::AttentionResponse* resp, Done done,
              RequestTrace* trace = nullptr);
  void ExportKv(const v1::ExportKvRequest& req, v1::ExportKvResponse* resp, Done done);
  void ImportKv(const v1::ImportKvRequest& req, v1::ImportKvResponse* resp, Done done);

 private:
  struct Device {
    int id = 0;       // the index clients name
    int index = 0;    // position in devices_
    std::unique_ptr<DeviceBackend> backend;
    std::unique_ptr<KvPool> pool;
    std::atomic<bool> serving{true};
    std::atomic<int64_t> used_pages{0};
    std::atomic<int64_t> live_sequences{0};
    std::unique_ptr<DeviceWorker> worker;  // last: destroyed (drained) first
  };

  Engine(const ServerConfig& config, Metrics* metrics) : config_(config), metrics_(metrics) {}

  // Finds the device a request names; INVALID_ARGUMENT if it is not one of ours, UNAVAILABLE
  // after a fault.
  absl::StatusOr<Device*> FindDevice(uint32_t device) const;
  // Runs `task` on the device's worker, which answers through `done`; stamps `trace` (if any)
  // when the task is queued, starts and ends.
  void Post(Device* device, Done done, absl::AnyInvocable<absl::Status(Device&) &&> task,
            RequestTrace* trace = nullptr);
  void AttentionImpl(const v1::AttentionRequest& req, bool decode, v1::AttentionResponse* resp,
                     Done done, RequestTrace* trace);
  void PublishPoolState(Device& device);
  // Keeps `held` (regions, events) alive until the GPU work enqueued so far is done, then lets
  // go of it on the device's worker.
  template <typename T>
  absl::Status KeepUntilDone(Device& device, T held) {
    DeviceWorker* worker = device.worker.get();
    return device.backend->WhenDone([worker, held = std::move(held)]() mutable {
      worker->Post([h = std::move(held)]() {});
    });
  }
  // A backend error is sticky: the device takes no more work.
  void MarkFaulted(Device& device, const absl::Status& status, absl::string_view what);
  void FillSequenceInfo(const Device& device, const Sequence& seq, v1::SequenceInfo* info) const;
  Placement PlacementFor(const Device& device) const;
  // The IPC events a request names, opened in this process and kept alive by `owners`.
  struct ResolvedSync {
    EventSyncWork work;
    std::vector<std::shared_ptr<void>> owners;
  };
  absl::StatusOr<ResolvedSync> ResolveSync(const v1::EventSync& sync, const Device& device) const;
  // How long each device worker polls for work before sleeping (--worker_spin_us, resolved).
  std::chrono::microseconds WorkerSpin() const;
  // Runs fn on the device's worker and waits for it.
  absl::Status RunOnWorker(Device& device, absl::AnyInvocable<absl::Status() &&> fn);

  ServerConfig config_;
  Metrics* metrics_;
  RegionRegistry regions_;
  ServingListener serving_listener_;
  bool cuda_ = false;  // the CUDA backend serves every device
  struct IpcEvent {
    int device;
    void* event;                  // cudaEvent_t
    std::shared_ptr<void> owner;  // closes the event when the last user lets go
  };
  mutable absl::Mutex events_mu_;
  absl::flat_hash_map<std::string, IpcEvent> events_ ABSL_GUARDED_BY(events_mu_);
  std::vector<std::unique_ptr<Device>> devices_;
};

}  // namespace attnd

#endif  // ATTND_SERVER_ENGINE_H_
