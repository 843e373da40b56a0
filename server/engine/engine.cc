#include "server/engine/engine.h"

#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "spdlog/spdlog.h"

namespace attnd {

Engine::Engine(const ServerConfig& config, std::unique_ptr<DevicePlatform> platform,
               Metrics* metrics)
    : config_(config),
      platform_(std::move(platform)),
      metrics_(metrics),
      clients_(ClientQuotas{config.max_regions_per_client, config.max_region_bytes_per_client,
                            config.max_events_per_client}) {}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const ServerConfig& config,
                                                       std::unique_ptr<DevicePlatform> platform,
                                                       Metrics* metrics) {
  std::unique_ptr<Engine> engine(new Engine(config, std::move(platform), metrics));
  DevicePlatform* p = engine->platform_.get();
  for (size_t i = 0; i < config.devices.size(); ++i) {
    auto device = std::make_unique<Device>();
    device->id = config.devices[i];
    device->index = static_cast<int>(i);
    const int id = device->id;
    // Every call that touches this device runs on its worker, bound to it for the thread's life.
    device->worker = std::make_unique<DeviceWorker>(
        [p, id] {
          if (absl::Status s = p->BindWorkerThread(id); !s.ok()) spdlog::error("{}", s.ToString());
        },
        engine->WorkerSpin());
    absl::StatusOr<std::unique_ptr<DeviceBackend>> backend;
    absl::Status made = engine->RunOnWorker(*device, [&]() -> absl::Status {
      backend = p->CreateBackend(config, id);
      return backend.status();
    });
    if (!made.ok()) return made;
    device->backend = *std::move(backend);
    device->pool = std::make_unique<KvPool>(device->id, device->backend->num_pages(),
                                            config.model.num_layers, config.model.page_size,
                                            config.max_seq_len);
    device->pool->SetQuotas(config.max_sequences_per_client, config.max_pages_per_client);
    engine->PublishPoolState(*device);
    spdlog::info("device={} backend={} pages={} page_bytes={} pool_bytes={}", device->id,
                 device->backend->name(), device->backend->num_pages(),
                 config.model.PageBytes(), device->backend->pool_bytes());
    engine->devices_.push_back(std::move(device));
    // Once in devices_: a failure here tears the backend down on its worker, with the engine.
    if (absl::Status s = engine->InitKvScales(*engine->devices_.back()); !s.ok()) return s;
  }
  if (config.lease_timeout_s > 0)
    engine->lease_thread_ = std::thread([e = engine.get()] { e->RunLeaseThread(); });
  return engine;
}

Engine::~Engine() {
  if (lease_thread_.joinable()) {
    {
      absl::MutexLock lock(&lease_mu_);
      stop_leases_ = true;
    }
    lease_thread_.join();
  }
  // Regions and IPC events first (each is closed on its device's worker: releasing one posts
  // there, so it must happen while the worker lives), then each backend on its own worker,
  // then drain and join the workers.
  regions_.Clear();
  events_.Clear();
  for (auto& device : devices_) {
    if (device->backend == nullptr) continue;
    (void)RunOnWorker(*device, [&device]() -> absl::Status {
      device->backend.reset();
      return absl::OkStatus();
    });
  }
  for (auto& device : devices_) device->worker.reset();
}

std::chrono::microseconds Engine::WorkerSpin() const {
  if (config_.worker_spin_us >= 0) return std::chrono::microseconds(config_.worker_spin_us);
  return platform_->DefaultWorkerSpin();
}

absl::Status Engine::RunOnWorker(Device& device, absl::AnyInvocable<absl::Status() &&> fn) {
  absl::Notification done;
  absl::Status status;
  device.worker->Post([&] {
    status = std::move(fn)();
    done.Notify();
  });
  done.WaitForNotification();
  return status;
}

RunOnDevice Engine::PosterFor(Device& device) {
  DeviceWorker* worker = device.worker.get();
  return [worker](std::function<void()> fn) { worker->Post(std::move(fn)); };
}

absl::StatusOr<Engine::Device*> Engine::FindDevice(uint32_t id) const {
  for (const auto& device : devices_) {
    if (static_cast<uint32_t>(device->id) != id) continue;
    if (!device->serving.load())
      return absl::UnavailableError(
          absl::StrCat("device: ", id, " is not serving after a fault; see the server log"));
    return device.get();
  }
  std::string ids;
  for (const auto& device : devices_) absl::StrAppend(&ids, ids.empty() ? "" : ", ", device->id);
  return absl::InvalidArgumentError(
      absl::StrCat("device: ", id, " is not a device of this server (devices: ", ids, ")"));
}

template <typename T>
void Engine::Post(Device* device, Reply<T> reply,
                  absl::AnyInvocable<absl::StatusOr<T>(Device&) &&> task, RequestTrace* trace) {
  using Clock = std::chrono::steady_clock;
  const auto posted = Clock::now();
  if (trace != nullptr) trace->posted = posted;
  device->worker->Post([device, reply = std::move(reply), task = std::move(task), posted,
                        trace]() mutable {
    const auto started = Clock::now();
    if (trace != nullptr) trace->dequeued = started;
    absl::StatusOr<T> result =
        device->serving.load()
            ? std::move(task)(*device)
            : absl::StatusOr<T>(absl::UnavailableError(
                  absl::StrCat("device: ", device->id, " is not serving after a fault")));
    const auto ran = Clock::now();
    if (trace != nullptr) trace->completed = ran;
    std::move(reply)(std::move(result));
    // Where a call's time goes on the server (trace level: per call).
    if (spdlog::should_log(spdlog::level::trace)) {
      auto us = [](auto a, auto b) {
        return std::chrono::duration<double, std::micro>(b - a).count();
      };
      spdlog::trace("device={} queue_us={:.1f} run_us={:.1f} reply_us={:.1f}", device->id,
                    us(posted, started), us(started, ran), us(ran, Clock::now()));
    }
  });
}

// The result types of the engine's calls; Post is defined here, so instantiate them here.
template void Engine::Post<DataResult>(Device*, Reply<DataResult>,
                                       absl::AnyInvocable<absl::StatusOr<DataResult>(Device&) &&>,
                                       RequestTrace*);
template void Engine::Post<SequenceState>(
    Device*, Reply<SequenceState>, absl::AnyInvocable<absl::StatusOr<SequenceState>(Device&) &&>,
    RequestTrace*);
template void Engine::Post<std::vector<SequenceState>>(
    Device*, Reply<std::vector<SequenceState>>,
    absl::AnyInvocable<absl::StatusOr<std::vector<SequenceState>>(Device&) &&>, RequestTrace*);
template void Engine::Post<int64_t>(Device*, Reply<int64_t>,
                                    absl::AnyInvocable<absl::StatusOr<int64_t>(Device&) &&>,
                                    RequestTrace*);
template void Engine::Post<std::vector<int64_t>>(
    Device*, Reply<std::vector<int64_t>>,
    absl::AnyInvocable<absl::StatusOr<std::vector<int64_t>>(Device&) &&>, RequestTrace*);

void Engine::PostDone(Device* device, Done done, absl::AnyInvocable<absl::Status(Device&) &&> task) {
  Post<bool>(
      device, [done = std::move(done)](absl::StatusOr<bool> r) mutable { std::move(done)(r.status()); },
      [task = std::move(task)](Device& d) mutable -> absl::StatusOr<bool> {
        absl::Status s = std::move(task)(d);
        if (!s.ok()) return s;
        return true;
      });
}

void Engine::PublishPoolState(Device& device) {
  device.used_pages.store(device.pool->used_pages());
  device.live_sequences.store(device.pool->num_sequences());
  metrics_->SetPages(device.index, device.pool->used_pages(), device.pool->total_pages());
  metrics_->SetLiveSequences(device.index, device.pool->num_sequences());
}

absl::Status Engine::MarkFaulted(Device& device, const absl::Status& status,
                                 absl::string_view what) {
  if (device.serving.exchange(false)) {
    spdlog::error("device={} fault, no more work is taken: {} during {}", device.id,
                  status.ToString(), std::string(what));
    metrics_->SetServing(device.index, false);
    if (serving_listener_) serving_listener_(device.index, false);
  }
  return absl::InternalError(absl::StrCat("device ", device.id, ": ", status.message()));
}

EngineInfo Engine::Info() const {
  EngineInfo info;
  info.cuda = cuda();
  info.model = config_.model;
  for (const auto& device : devices_) {
    DeviceState d;
    d.device = device->id;
    d.name = device->backend->name();
    d.total_pages = device->backend->num_pages();
    d.free_pages = device->backend->num_pages() - device->used_pages.load();
    d.live_sequences = device->live_sequences.load();
    d.serving = device->serving.load();
    d.pool_bytes = device->backend->pool_bytes();
    d.kv_scales = ScalesOf(*device);
    info.devices.push_back(std::move(d));
  }
  if (cuda() && config_.cuda_graphs) info.graph_buckets = config_.graph_buckets;
  info.max_batch_size = config_.max_batch_size;
  info.max_seq_len = config_.max_seq_len;
  info.max_tokens_per_request = config_.max_tokens_per_request;
  info.features = {"host_regions", "stream", "fork", "truncate", "kv_export", "kv_import",
                   "lse", "deterministic", "kv_scales"};
  if (config_.model.CacheShape(0).Fp8()) info.features.push_back("fp8_kv");
  if (config_.model.CacheShape(0).TokenScales()) info.features.push_back("fp8_kv_per_token");
  if (platform_->SupportsIpc()) {
    info.features.push_back("cuda_regions");
    info.features.push_back("ipc_events");
  }
  return info;
}

}  // namespace attnd
