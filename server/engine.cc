#include "server/engine.h"

#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "spdlog/spdlog.h"
#ifdef ATTND_HAVE_CUDA
#include "server/cuda_backend.h"
#endif

namespace attnd {
namespace {

constexpr char kVersion[] = "0.1.0";

v1::KvLayout ToWire(kernels::KvLayout layout) {
  return layout == kernels::KvLayout::kNHD ? v1::KV_LAYOUT_NHD : v1::KV_LAYOUT_HND;
}

// Checks what a batch says about itself, before anything touches a device.
absl::Status ValidateItems(const google::protobuf::RepeatedPtrField<v1::BatchItem>& items,
                           const ServerConfig& config, bool decode, uint64_t* total_tokens) {
  if (items.empty()) return absl::InvalidArgumentError("items: empty batch");
  if (items.size() > config.max_batch_size)
    return absl::InvalidArgumentError(absl::StrCat("items: ", items.size(),
                                                   " items exceed max_batch_size ",
                                                   config.max_batch_size));
  uint64_t total = 0;
  for (int i = 0; i < items.size(); ++i) {
    const uint32_t n = items[i].num_new_tokens();
    if (n == 0)
      return absl::InvalidArgumentError(absl::StrCat("items[", i, "].num_new_tokens: must be >= 1"));
    if (decode && n != 1)
      return absl::InvalidArgumentError(
          absl::StrCat("items[", i, "].num_new_tokens: ", n, "; Decode takes exactly 1"));
    total += n;
  }
  if (total > static_cast<uint64_t>(config.max_tokens_per_request))
    return absl::InvalidArgumentError(absl::StrCat("items: ", total,
                                                   " new tokens exceed max_tokens_per_request ",
                                                   config.max_tokens_per_request));
  *total_tokens = total;
  return absl::OkStatus();
}

absl::Status ValidateLayer(uint32_t layer, const ServerConfig& config) {
  if (layer >= config.model.num_layers)
    return absl::InvalidArgumentError(absl::StrCat("layer: ", layer, " is out of range [0, ",
                                                   config.model.num_layers, ")"));
  return absl::OkStatus();
}

std::vector<AppendItem> ToAppendItems(const google::protobuf::RepeatedPtrField<v1::BatchItem>& items) {
  std::vector<AppendItem> out;
  out.reserve(items.size());
  for (const v1::BatchItem& item : items) out.push_back({item.seq_id(), item.num_new_tokens()});
  return out;
}

}  // namespace

namespace {

// Whether to serve on CUDA: --backend=cuda insists, auto takes it when it can.
absl::StatusOr<bool> ChooseCuda(const ServerConfig& config) {
  if (config.backend == BackendChoice::kCpu) return false;
#ifdef ATTND_HAVE_CUDA
  absl::Status why = CudaDeviceCount() > 0
                         ? absl::OkStatus()
                         : absl::FailedPreconditionError("no CUDA device is visible");
  for (int d : config.devices) {
    if (why.ok()) why = CheckCudaSupport(config, d);
  }
  if (why.ok()) return true;
  if (config.backend == BackendChoice::kCuda) return why;
  spdlog::info("backend=auto: serving on the CPU ({})", std::string(why.message()));
  return false;
#else
  if (config.backend == BackendChoice::kCuda)
    return absl::FailedPreconditionError("--backend=cuda: this build has no CUDA (ATTND_CUDA=OFF)");
  spdlog::info("backend=auto: this build has no CUDA backend, serving on the CPU");
  return false;
#endif
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const ServerConfig& config,
                                                       Metrics* metrics) {
  std::unique_ptr<Engine> engine(new Engine(config, metrics));
  auto cuda = ChooseCuda(config);
  if (!cuda.ok()) return cuda.status();
  engine->cuda_ = *cuda;
  for (size_t i = 0; i < config.devices.size(); ++i) {
    auto device = std::make_unique<Device>();
    device->id = config.devices[i];
    device->index = static_cast<int>(i);
    const int id = device->id;
    std::function<void()> bind;
#ifdef ATTND_HAVE_CUDA
    // Every CUDA call of this device runs on its worker, bound to it for the thread's life.
    if (engine->cuda_) {
      bind = [id] {
        if (absl::Status s = BindThreadToDevice(id); !s.ok()) spdlog::error("{}", s.ToString());
      };
    }
#endif
    device->worker = std::make_unique<DeviceWorker>(std::move(bind), engine->WorkerSpin());
    absl::StatusOr<std::unique_ptr<DeviceBackend>> backend;
    if (engine->cuda_) {
#ifdef ATTND_HAVE_CUDA
      absl::Status made = engine->RunOnWorker(*device, [&]() -> absl::Status {
        backend = CreateCudaDeviceBackend(config, id);
        return backend.status();
      });
      if (!made.ok()) return made;
#endif
    } else {
      backend = CreateCpuDeviceBackend(config, id);
    }
    if (!backend.ok()) return backend.status();
    device->backend = *std::move(backend);
    device->pool = std::make_unique<KvPool>(device->id, device->backend->num_pages(),
                                            config.model.num_layers, config.model.page_size,
                                            config.max_seq_len);
    engine->PublishPoolState(*device);
    spdlog::info("device={} backend={} pages={} page_bytes={} pool_bytes={}", device->id,
                 device->backend->name(), device->backend->num_pages(),
                 config.model.PageBytes(), device->backend->pool_bytes());
    engine->devices_.push_back(std::move(device));
  }
  return engine;
}

Engine::~Engine() {
  // Regions and IPC events first (each is closed on its device's worker: releasing one posts
  // there, so it must happen while the worker lives), then each backend on its own worker,
  // then drain and join the workers.
  regions_.Clear();
  {
    absl::MutexLock lock(&events_mu_);
    events_.clear();
  }
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
  // The CUDA worker already spins through every GPU wait (cudaStreamSynchronize under the
  // default schedule), so polling a little longer for the next call costs little and saves a
  // wake-up per call; the CPU backend needs its cores for attention.
  if (config_.worker_spin_us >= 0) return std::chrono::microseconds(config_.worker_spin_us);
  return std::chrono::microseconds(cuda_ ? 200 : 0);
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

void Engine::Post(Device* device, Done done, absl::AnyInvocable<absl::Status(Device&) &&> task,
                  RequestTrace* trace) {
  using Clock = std::chrono::steady_clock;
  const auto posted = Clock::now();
  if (trace != nullptr) trace->posted = posted;
  device->worker->Post([this, device, done = std::move(done), task = std::move(task), posted,
                        trace]() mutable {
    const auto started = Clock::now();
    if (trace != nullptr) trace->dequeued = started;
    absl::Status status = device->serving.load()
                              ? std::move(task)(*device)
                              : absl::UnavailableError(absl::StrCat(
                                    "device: ", device->id, " is not serving after a fault"));
    const auto ran = Clock::now();
    if (trace != nullptr) trace->completed = ran;
    std::move(done)(std::move(status));
    // Where a call's time goes on the server (debug level: per call).
    if (spdlog::should_log(spdlog::level::trace)) {
      auto us = [](auto a, auto b) { return std::chrono::duration<double, std::micro>(b - a).count(); };
      spdlog::trace("device={} queue_us={:.1f} run_us={:.1f} reply_us={:.1f}", device->id,
                    us(posted, started), us(started, ran), us(ran, Clock::now()));
    }
  });
}

void Engine::PublishPoolState(Device& device) {
  device.used_pages.store(device.pool->used_pages());
  device.live_sequences.store(device.pool->num_sequences());
  metrics_->SetPages(device.index, device.pool->used_pages(), device.pool->total_pages());
  metrics_->SetLiveSequences(device.index, device.pool->num_sequences());
}

void Engine::MarkFaulted(Device& device, const absl::Status& status, absl::string_view what) {
  if (!device.serving.exchange(false)) return;
  spdlog::error("device={} fault, no more work is taken: {} during {}", device.id,
                status.ToString(), std::string(what));
  metrics_->SetServing(device.index, false);
  if (serving_listener_) serving_listener_(device.index, false);
}

Placement Engine::PlacementFor(const Device& device) const {
  // The CPU backend reads host memory only; the CUDA backend its device's memory and host
  // regions it page-locked.
  return Placement{true, cuda_ ? device.id : -1};
}

void Engine::GetServerInfo(v1::ServerInfo* info) const {
  const ModelShape& m = config_.model;
  info->set_version(kVersion);
  info->set_backend(cuda_ ? v1::BACKEND_CUDA : v1::BACKEND_CPU);
  v1::ModelConfig* model = info->mutable_model();
  model->set_num_layers(static_cast<uint32_t>(m.num_layers));
  model->set_num_qo_heads(static_cast<uint32_t>(m.num_qo_heads));
  model->set_num_kv_heads(static_cast<uint32_t>(m.num_kv_heads));
  model->set_head_dim(static_cast<uint32_t>(m.head_dim));
  model->set_dtype(ToWire(m.dtype));
  model->set_page_size(static_cast<uint32_t>(m.page_size));
  model->set_kv_layout(ToWire(m.layout));
  model->set_sm_scale(m.sm_scale);
  model->set_logits_soft_cap(m.logits_soft_cap);
  model->set_window_left(static_cast<int32_t>(m.window_left));
  for (const auto& device : devices_) {
    v1::DeviceInfo* d = info->add_devices();
    d->set_device(static_cast<uint32_t>(device->id));
    d->set_name(device->backend->name());
    d->set_total_pages(static_cast<uint64_t>(device->backend->num_pages()));
    d->set_free_pages(static_cast<uint64_t>(device->backend->num_pages() - device->used_pages.load()));
    d->set_live_sequences(static_cast<uint64_t>(device->live_sequences.load()));
    d->set_serving(device->serving.load());
    d->set_pool_bytes(static_cast<uint64_t>(device->backend->pool_bytes()));
  }
  if (cuda_ && config_.cuda_graphs)
    for (int64_t b : config_.graph_buckets) info->add_graph_buckets(static_cast<uint32_t>(b));
  info->set_max_batch_size(static_cast<uint32_t>(config_.max_batch_size));
  info->set_max_seq_len(static_cast<uint64_t>(config_.max_seq_len));
  info->set_max_tokens_per_request(static_cast<uint64_t>(config_.max_tokens_per_request));
  for (const char* f : {"host_regions", "stream", "fork", "truncate", "kv_export", "kv_import",
                        "lse", "deterministic"})
    info->add_features(f);
  if (cuda_) {
    info->add_features("cuda_regions");
    info->add_features("ipc_events");
  }
}

// ---- Regions ----

absl::Status Engine::RegisterHostRegion(const v1::RegisterHostRegionRequest& req) {
  if (absl::Status s = ValidateRegionName(req.name()); !s.ok()) return s;
  if (regions_.Find(req.name()) != nullptr)
    return absl::AlreadyExistsError(
        absl::StrCat("name: a region named '", req.name(), "' is already registered"));
  auto region = HostRegion::Open(req.name(), req.shm_key(), req.offset(), req.byte_size());
  if (!region.ok()) return region.status();
#ifdef ATTND_HAVE_CUDA
  if (cuda_) {
    // Page-locked, portable: every device's kernels reach it. Pinning is done from the first
    // device's worker; unpinning needs no device (the pointer names the registration).
    HostRegion* host = region->get();
    absl::Status pinned = RunOnWorker(*devices_.front(), [host]() {
      return RegisterHostMemory(host->mapping(), host->mapping_bytes());
    });
    if (!pinned.ok()) return pinned;
    host->SetBeforeUnmap([mapping = host->mapping()] { UnregisterHostMemory(mapping); });
  }
#endif
  if (absl::Status s = regions_.Add(std::shared_ptr<Region>(*std::move(region))); !s.ok()) return s;
  spdlog::info("region={} kind=host shm_key={} offset={} bytes={}", req.name(), req.shm_key(),
               req.offset(), req.byte_size());
  return absl::OkStatus();
}

void Engine::RegisterCudaRegion(const v1::RegisterCudaRegionRequest& req,
                                v1::RegisterRegionResponse*, Done done) {
  if (!cuda_)
    return std::move(done)(absl::FailedPreconditionError(
        "this server runs the CPU backend, which cannot open CUDA IPC handles; register host "
        "(POSIX shared-memory) regions with RegisterHostRegion"));
#ifdef ATTND_HAVE_CUDA
  if (absl::Status s = ValidateRegionName(req.name()); !s.ok()) return std::move(done)(s);
  if (regions_.Find(req.name()) != nullptr)
    return std::move(done)(absl::AlreadyExistsError(
        absl::StrCat("name: a region named '", req.name(), "' is already registered")));
  auto device = FindDevice(req.device());
  if (!device.ok()) return std::move(done)(device.status());
  DeviceWorker* worker = (*device)->worker.get();
  Post(*device, std::move(done), [this, req, worker](Device& d) -> absl::Status {
    auto region = OpenCudaIpcRegion(req.name(), req.ipc_handle(), d.id, req.byte_size(),
                                    [worker](std::function<void()> fn) { worker->Post(std::move(fn)); });
    if (!region.ok()) return region.status();
    if (absl::Status s = regions_.Add(std::shared_ptr<Region>(*std::move(region))); !s.ok())
      return s;
    spdlog::info("region={} kind=cuda device={} bytes={}", req.name(), d.id, req.byte_size());
    return absl::OkStatus();
  });
#endif
}

absl::Status Engine::UnregisterRegion(const v1::UnregisterRegionRequest& req) {
  if (absl::Status s = regions_.Remove(req.name()); !s.ok()) return s;
  spdlog::info("region={} unregistered", req.name());
  return absl::OkStatus();
}

void Engine::ListRegions(v1::ListRegionsResponse* resp) const {
  for (const RegionSummary& s : regions_.List()) {
    v1::RegionInfo* r = resp->add_regions();
    r->set_name(s.name);
    r->set_kind(s.kind == Region::Kind::kHost ? v1::RegionInfo::KIND_HOST : v1::RegionInfo::KIND_CUDA);
    r->set_device(s.device);
    r->set_byte_size(s.byte_size);
    r->set_shm_key(s.shm_key);
    r->set_shm_offset(s.shm_offset);
    r->set_in_flight(static_cast<uint32_t>(s.in_flight));
  }
}

void Engine::RegisterCudaEvent(const v1::RegisterCudaEventRequest& req,
                               v1::RegisterCudaEventResponse*, Done done) {
  if (!cuda_)
    return std::move(done)(absl::FailedPreconditionError(
        "this server runs the CPU backend, which has no CUDA events; calls reply once outputs "
        "are written"));
#ifdef ATTND_HAVE_CUDA
  if (absl::Status s = ValidateRegionName(req.name()); !s.ok()) return std::move(done)(s);
  {
    absl::MutexLock lock(&events_mu_);
    if (events_.contains(req.name()))
      return std::move(done)(absl::AlreadyExistsError(
          absl::StrCat("name: a CUDA event named '", req.name(), "' is already registered")));
  }
  auto device = FindDevice(req.device());
  if (!device.ok()) return std::move(done)(device.status());
  DeviceWorker* worker = (*device)->worker.get();
  Post(*device, std::move(done), [this, req, worker](Device& d) -> absl::Status {
    auto event = OpenCudaIpcEvent(req.ipc_handle(), d.id, [worker](std::function<void()> fn) {
      worker->Post(std::move(fn));
    });
    if (!event.ok()) return event.status();
    std::shared_ptr<CudaIpcEvent> owner = *std::move(event);
    absl::MutexLock lock(&events_mu_);
    if (!events_.try_emplace(req.name(), IpcEvent{d.id, owner->event(), owner}).second)
      return absl::AlreadyExistsError(
          absl::StrCat("name: a CUDA event named '", req.name(), "' is already registered"));
    spdlog::info("event={} device={} registered", req.name(), d.id);
    return absl::OkStatus();
  });
#endif
}

absl::Status Engine::UnregisterCudaEvent(const v1::UnregisterCudaEventRequest& req) {
  absl::MutexLock lock(&events_mu_);
  if (events_.erase(req.name()) == 0)
    return absl::NotFoundError(absl::StrCat("name: no CUDA event named '", req.name(), "'"));
  return absl::OkStatus();
}

absl::StatusOr<Engine::ResolvedSync> Engine::ResolveSync(const v1::EventSync& sync,
                                                         const Device& device) const {
  ResolvedSync out;
  if (sync.wait_event().empty() && sync.signal_event().empty()) return out;
  if (!cuda_)
    return absl::FailedPreconditionError(
        "sync: the CPU backend has no CUDA events; leave sync empty");
  absl::MutexLock lock(&events_mu_);
  for (auto [name, field, slot] :
       {std::tuple{&sync.wait_event(), "sync.wait_event", &out.work.wait},
        std::tuple{&sync.signal_event(), "sync.signal_event", &out.work.signal}}) {
    if (name->empty()) continue;
    auto it = events_.find(*name);
    if (it == events_.end())
      return absl::NotFoundError(absl::StrCat(field, ": no CUDA event named '", *name, "'"));
    if (it->second.device != device.id)
      return absl::InvalidArgumentError(absl::StrCat(field, ": event '", *name,
                                                     "' lives on device ", it->second.device,
                                                     "; the request runs on ", device.id));
    *slot = it->second.event;
    out.owners.push_back(it->second.owner);
  }
  return out;
}

// ---- Sequences ----

void Engine::FillSequenceInfo(const Device& device, const Sequence& seq,
                              v1::SequenceInfo* info) const {
  info->set_device(static_cast<uint32_t>(device.id));
  info->set_seq_id(seq.id);
  info->clear_layer_lengths();
  for (int64_t len : seq.lengths) info->add_layer_lengths(static_cast<uint64_t>(len));
  info->set_num_pages(seq.pages.size());
  info->set_shared_pages(static_cast<uint64_t>(device.pool->SharedPages(seq)));
}

void Engine::CreateSequence(const v1::CreateSequenceRequest& req, v1::SequenceInfo* resp,
                            Done done) {
  auto device = FindDevice(req.device());
  if (!device.ok()) return std::move(done)(device.status());
  Post(*device, std::move(done), [this, id = req.seq_id(), resp](Device& d) -> absl::Status {
    if (absl::Status s = d.pool->Create(id); !s.ok()) return s;
    FillSequenceInfo(d, *d.pool->Find(id), resp);
    PublishPoolState(d);
    return absl::OkStatus();
  });
}

void Engine::ForkSequence(const v1::ForkSequenceRequest& req, v1::SequenceInfo* resp, Done done) {
  auto device = FindDevice(req.device());
  if (!device.ok()) return std::move(done)(device.status());
  Post(*device, std::move(done),
       [this, parent = req.parent_id(), child = req.child_id(), resp](Device& d) -> absl::Status {
         if (absl::Status s = d.pool->Fork(parent, child); !s.ok()) return s;
         FillSequenceInfo(d, *d.pool->Find(child), resp);
         PublishPoolState(d);
         return absl::OkStatus();
       });
}

void Engine::TruncateSequence(const v1::TruncateSequenceRequest& req, v1::SequenceInfo* resp,
                              Done done) {
  auto device = FindDevice(req.device());
  if (!device.ok()) return std::move(done)(device.status());
  // Lengths above max_seq_len truncate nothing; clamp so the pool sees a sane int64.
  const int64_t length =
      static_cast<int64_t>(std::min<uint64_t>(req.length(), static_cast<uint64_t>(config_.max_seq_len)));
  Post(*device, std::move(done), [this, id = req.seq_id(), length, resp](Device& d) -> absl::Status {
    if (absl::Status s = d.pool->Truncate(id, length); !s.ok()) return s;
    FillSequenceInfo(d, *d.pool->Find(id), resp);
    PublishPoolState(d);
    return absl::OkStatus();
  });
}

void Engine::ReleaseSequence(const v1::ReleaseSequenceRequest& req,
                             v1::ReleaseSequenceResponse* resp, Done done) {
  auto device = FindDevice(req.device());
  if (!device.ok()) return std::move(done)(device.status());
  Post(*device, std::move(done), [this, id = req.seq_id(), resp](Device& d) -> absl::Status {
    auto freed = d.pool->Release(id);
    if (!freed.ok()) return freed.status();
    resp->set_freed_pages(static_cast<uint64_t>(*freed));
    PublishPoolState(d);
    return absl::OkStatus();
  });
}

void Engine::GetSequence(const v1::GetSequenceRequest& req, v1::SequenceInfo* resp, Done done) {
  auto device = FindDevice(req.device());
  if (!device.ok()) return std::move(done)(device.status());
  Post(*device, std::move(done), [this, id = req.seq_id(), resp](Device& d) -> absl::Status {
    const Sequence* seq = d.pool->Find(id);
    if (seq == nullptr)
      return absl::NotFoundError(absl::StrCat("seq_id: no sequence ", id, " on device ", d.id));
    FillSequenceInfo(d, *seq, resp);
    return absl::OkStatus();
  });
}

void Engine::ListSequences(const v1::ListSequencesRequest& req, v1::ListSequencesResponse* resp,
                           Done done) {
  auto device = FindDevice(req.device());
  if (!device.ok()) return std::move(done)(device.status());
  Post(*device, std::move(done), [this, resp](Device& d) -> absl::Status {
    for (const Sequence* seq : d.pool->List()) FillSequenceInfo(d, *seq, resp->add_sequences());
    return absl::OkStatus();
  });
}

// ---- Data ----

namespace {

// The tensors of one data request, resolved and bounds-checked.
struct DataTensors {
  ResolvedTensor q, k, v, out, lse;
  bool has_lse = false;
};

absl::Status CheckNoOverlap(const DataTensors& t, bool attention) {
  const std::pair<const ResolvedTensor*, const char*> inputs[] = {
      {&t.q, "q"}, {&t.k, "k_new"}, {&t.v, "v_new"}};
  if (!attention) return absl::OkStatus();
  for (auto [output, out_name] : {std::pair{&t.out, "out"}, std::pair{&t.lse, "lse"}}) {
    if (output == &t.lse && !t.has_lse) continue;
    for (auto [input, in_name] : inputs) {
      if (output->Overlaps(*input))
        return absl::InvalidArgumentError(
            absl::StrCat(out_name, ": overlaps ", in_name, "; outputs must not alias inputs"));
    }
  }
  if (t.has_lse && t.out.Overlaps(t.lse))
    return absl::InvalidArgumentError("lse: overlaps out");
  return absl::OkStatus();
}

std::vector<BatchEntry> MakeEntries(const KvPool& pool, const std::vector<AppendItem>& items,
                                    const std::vector<int64_t>& starts) {
  std::vector<BatchEntry> entries;
  entries.reserve(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    const Sequence* seq = pool.Find(items[i].seq_id);
    entries.push_back({absl::MakeConstSpan(seq->pages), starts[i], items[i].num_new_tokens});
  }
  return entries;
}

}  // namespace

void Engine::Append(const v1::AppendRequest& req, v1::AppendResponse* resp, Done done,
                    RequestTrace* trace) {
  auto device_or = FindDevice(req.device());
  if (!device_or.ok()) return std::move(done)(device_or.status());
  Device* device = *device_or;
  uint64_t total = 0;
  absl::Status s = ValidateLayer(req.layer(), config_);
  if (s.ok()) s = ValidateItems(req.items(), config_, /*decode=*/false, &total);
  if (!s.ok()) return std::move(done)(s);
  const ModelShape& m = config_.model;
  const v1::DType dtype = attnd::ToWire(m.dtype);
  const std::vector<uint64_t> kv_shape{total, static_cast<uint64_t>(m.num_kv_heads),
                                       static_cast<uint64_t>(m.head_dim)};
  const Placement placement = PlacementFor(*device);
  auto k = ResolveTensor(regions_, req.k_new(), "k_new", dtype, kv_shape, placement);
  if (!k.ok()) return std::move(done)(k.status());
  auto v = ResolveTensor(regions_, req.v_new(), "v_new", dtype, kv_shape, placement);
  if (!v.ok()) return std::move(done)(v.status());
  auto sync = ResolveSync(req.sync(), *device);
  if (!sync.ok()) return std::move(done)(sync.status());
  metrics_->RecordBatch("Append", req.items_size());
  Post(device, std::move(done),
       [this, layer = int64_t{req.layer()}, items = ToAppendItems(req.items()), k = *std::move(k),
        v = *std::move(v), total, resp, sync = *std::move(sync),
        trace](Device& d) -> absl::Status {
         std::vector<int64_t> starts;
         auto copies = d.pool->ReserveAppend(layer, items, &starts);
         if (!copies.ok()) return copies.status();
         PublishPoolState(d);
         AppendWork work{layer, MakeEntries(*d.pool, items, starts), k.data, v.data, sync.work};
         absl::Status s = d.backend->CopyPages(*copies);
         if (s.ok()) s = d.backend->Append(work);
         if (trace != nullptr) trace->enqueued = work.enqueued;
         // Replying at once (a signal event): the client memory stays mapped until the GPU is done.
         if (s.ok() && sync.work.signal != nullptr) s = KeepUntilDone(d, std::tuple{k, v, sync.owners});
         if (!s.ok()) {
           MarkFaulted(d, s, absl::StrCat("Append layer=", layer, " items=", items.size()));
           return absl::InternalError(absl::StrCat("device ", d.id, ": ", s.message()));
         }
         for (size_t i = 0; i < items.size(); ++i)
           resp->add_lengths(static_cast<uint64_t>(starts[i] + items[i].num_new_tokens));
         metrics_->AddTokens(d.index, static_cast<int64_t>(total), 0);
         return absl::OkStatus();
       },
       trace);
}

void Engine::Prefill(const v1::AttentionRequest& req, v1::AttentionResponse* resp, Done done,
                     RequestTrace* trace) {
  AttentionImpl(req, /*decode=*/false, resp, std::move(done), trace);
}

void Engine::Decode(const v1::AttentionRequest& req, v1::AttentionResponse* resp, Done done,
                    RequestTrace* trace) {
  AttentionImpl(req, /*decode=*/true, resp, std::move(done), trace);
}

void Engine::AttentionImpl(const v1::AttentionRequest& req, bool decode,
                           v1::AttentionResponse* resp, Done done, RequestTrace* trace) {
  auto device_or = FindDevice(req.device());
  if (!device_or.ok()) return std::move(done)(device_or.status());
  Device* device = *device_or;
  uint64_t total = 0;
  absl::Status s = ValidateLayer(req.layer(), config_);
  if (s.ok()) s = ValidateItems(req.items(), config_, decode, &total);
  if (!s.ok()) return std::move(done)(s);
  auto sync = ResolveSync(req.sync(), *device);
  if (!sync.ok()) return std::move(done)(sync.status());

  const ModelShape& m = config_.model;
  const v1::DType dtype = attnd::ToWire(m.dtype);
  const uint64_t qo = static_cast<uint64_t>(m.num_qo_heads);
  const uint64_t kv = static_cast<uint64_t>(m.num_kv_heads);
  const uint64_t dim = static_cast<uint64_t>(m.head_dim);
  const Placement placement = PlacementFor(*device);
  DataTensors t;
  struct Spec {
    const v1::TensorRef& ref;
    const char* field;
    v1::DType dtype;
    std::vector<uint64_t> shape;
    ResolvedTensor* dst;
  };
  std::vector<Spec> specs = {{req.q(), "q", dtype, {total, qo, dim}, &t.q},
                             {req.k_new(), "k_new", dtype, {total, kv, dim}, &t.k},
                             {req.v_new(), "v_new", dtype, {total, kv, dim}, &t.v},
                             {req.out(), "out", dtype, {total, qo, dim}, &t.out}};
  t.has_lse = !req.lse().region().empty();
  if (t.has_lse) specs.push_back({req.lse(), "lse", v1::DTYPE_FLOAT32, {total, qo}, &t.lse});
  for (Spec& spec : specs) {
    auto r = ResolveTensor(regions_, spec.ref, spec.field, spec.dtype, spec.shape, placement);
    if (!r.ok()) return std::move(done)(r.status());
    *spec.dst = *std::move(r);
  }
  if (absl::Status s = CheckNoOverlap(t, true); !s.ok()) return std::move(done)(s);

  const char* rpc = decode ? "Decode" : "Prefill";
  metrics_->RecordBatch(rpc, req.items_size());
  Post(device, std::move(done),
       [this, rpc, layer = int64_t{req.layer()}, items = ToAppendItems(req.items()),
        t = std::move(t), total, decode, deterministic = req.deterministic(), resp,
        sync = *std::move(sync), trace](Device& d) -> absl::Status {
         // Ask the backend first: a batch its workspaces cannot plan is refused unchanged.
         std::vector<int64_t> lengths, counts;
         for (const AppendItem& item : items) {
           const Sequence* seq = d.pool->Find(item.seq_id);
           if (seq == nullptr) break;  // ReserveAppend names it below
           lengths.push_back(seq->lengths[static_cast<size_t>(layer)]);
           counts.push_back(item.num_new_tokens);
         }
         if (lengths.size() == items.size()) {
           if (absl::Status s = d.backend->CheckAttentionFits(lengths, counts, deterministic);
               !s.ok())
             return s;
         }
         std::vector<int64_t> starts;
         auto copies = d.pool->ReserveAppend(layer, items, &starts);
         if (!copies.ok()) return copies.status();
         PublishPoolState(d);
         AttentionWork work;
         work.append = AppendWork{layer, MakeEntries(*d.pool, items, starts), t.k.data, t.v.data,
                                  sync.work};
         work.append.table_epoch = d.pool->table_epoch();
         work.q = t.q.data;
         work.out = t.out.data;
         work.lse = t.has_lse ? reinterpret_cast<float*>(t.lse.data) : nullptr;
         work.deterministic = deterministic;
         work.decode = decode;
         absl::Status s = d.backend->CopyPages(*copies);
         if (s.ok()) s = d.backend->Attention(work);
         if (trace != nullptr) trace->enqueued = work.enqueued;
         if (s.ok() && sync.work.signal != nullptr) s = KeepUntilDone(d, std::tuple{t, sync.owners});
         if (!s.ok()) {
           MarkFaulted(d, s, absl::StrCat(rpc, " layer=", layer, " items=", items.size()));
           return absl::InternalError(absl::StrCat("device ", d.id, ": ", s.message()));
         }
         for (size_t i = 0; i < items.size(); ++i)
           resp->add_lengths(static_cast<uint64_t>(starts[i] + items[i].num_new_tokens));
         metrics_->AddTokens(d.index, static_cast<int64_t>(total), static_cast<int64_t>(total));
         if (cuda_ && decode) metrics_->RecordDecodeLaunch(d.index, work.graph_bucket);
         return absl::OkStatus();
       },
       trace);
}

// ---- KV export / import ----

namespace {

template <typename Req>
absl::StatusOr<std::vector<uint64_t>> TransferShape(const Req& req, const ServerConfig& config) {
  const ModelShape& m = config.model;
  if (req.layer_begin() >= req.layer_end() || req.layer_end() > m.num_layers)
    return absl::InvalidArgumentError(absl::StrCat("layer_begin, layer_end: [", req.layer_begin(),
                                                   ", ", req.layer_end(),
                                                   ") must be a non-empty range within [0, ",
                                                   m.num_layers, ")"));
  if (req.head_begin() >= req.head_end() || req.head_end() > m.num_kv_heads)
    return absl::InvalidArgumentError(absl::StrCat("head_begin, head_end: [", req.head_begin(),
                                                   ", ", req.head_end(),
                                                   ") must be a non-empty range within [0, ",
                                                   m.num_kv_heads, ")"));
  if (req.num_tokens() == 0 || req.num_tokens() > static_cast<uint64_t>(config.max_seq_len))
    return absl::InvalidArgumentError(absl::StrCat("num_tokens: ", req.num_tokens(),
                                                   " must be in [1, max_seq_len ",
                                                   config.max_seq_len, "]"));
  if (req.sync().wait_event().size() + req.sync().signal_event().size() > 0)
    return absl::FailedPreconditionError("sync: IPC events are not implemented for KV transfers yet");
  return std::vector<uint64_t>{req.layer_end() - req.layer_begin(), 2, req.num_tokens(),
                               req.head_end() - req.head_begin(),
                               static_cast<uint64_t>(m.head_dim)};
}

template <typename Req>
KvTransferWork MakeTransfer(const Req& req, const Sequence& seq, void* buffer, bool to_pool) {
  KvTransferWork w;
  w.page_table = absl::MakeConstSpan(seq.pages);
  w.layer_begin = req.layer_begin();
  w.layer_end = req.layer_end();
  w.head_begin = req.head_begin();
  w.head_end = req.head_end();
  w.num_tokens = static_cast<int64_t>(req.num_tokens());
  w.buffer = buffer;
  w.to_pool = to_pool;
  return w;
}

}  // namespace

void Engine::ExportKv(const v1::ExportKvRequest& req, v1::ExportKvResponse*, Done done) {
  auto device_or = FindDevice(req.device());
  if (!device_or.ok()) return std::move(done)(device_or.status());
  auto shape = TransferShape(req, config_);
  if (!shape.ok()) return std::move(done)(shape.status());
  auto dst = ResolveTensor(regions_, req.dst(), "dst", attnd::ToWire(config_.model.dtype), *shape,
                           PlacementFor(**device_or));
  if (!dst.ok()) return std::move(done)(dst.status());
  Post(*device_or, std::move(done), [this, req, dst = *std::move(dst)](Device& d) -> absl::Status {
    const Sequence* seq = d.pool->Find(req.seq_id());
    if (seq == nullptr)
      return absl::NotFoundError(
          absl::StrCat("seq_id: no sequence ", req.seq_id(), " on device ", d.id));
    for (uint32_t layer = req.layer_begin(); layer < req.layer_end(); ++layer) {
      if (static_cast<uint64_t>(seq->lengths[layer]) < req.num_tokens())
        return absl::FailedPreconditionError(
            absl::StrCat("num_tokens: ", req.num_tokens(), " exceeds the ", seq->lengths[layer],
                         " tokens sequence ", req.seq_id(), " holds at layer ", layer));
    }
    absl::Status s = d.backend->TransferKv(MakeTransfer(req, *seq, dst.data, /*to_pool=*/false));
    if (!s.ok()) {
      MarkFaulted(d, s, "ExportKv");
      return absl::InternalError(absl::StrCat("device ", d.id, ": ", s.message()));
    }
    return absl::OkStatus();
  });
}

void Engine::ImportKv(const v1::ImportKvRequest& req, v1::ImportKvResponse* resp, Done done) {
  auto device_or = FindDevice(req.device());
  if (!device_or.ok()) return std::move(done)(device_or.status());
  auto shape = TransferShape(req, config_);
  if (!shape.ok()) return std::move(done)(shape.status());
  auto src = ResolveTensor(regions_, req.src(), "src", attnd::ToWire(config_.model.dtype), *shape,
                           PlacementFor(**device_or));
  if (!src.ok()) return std::move(done)(src.status());
  Post(*device_or, std::move(done),
       [this, req, src = *std::move(src), resp](Device& d) -> absl::Status {
         const Sequence* seq = d.pool->Find(req.seq_id());
         if (seq == nullptr)
           return absl::NotFoundError(
               absl::StrCat("seq_id: no sequence ", req.seq_id(), " on device ", d.id));
         std::vector<PageWrite> writes;
         const int64_t n = static_cast<int64_t>(req.num_tokens());
         for (uint32_t layer = req.layer_begin(); layer < req.layer_end(); ++layer) {
           const int64_t len = seq->lengths[layer];
           if (len != 0 && len != n)
             return absl::FailedPreconditionError(absl::StrCat(
                 "num_tokens: sequence ", req.seq_id(), " holds ", len, " tokens at layer ",
                 layer, "; an import needs 0 or exactly ", n));
           writes.push_back({req.seq_id(), layer, 0, n});
         }
         auto copies = d.pool->ReserveWrites(writes);
         if (!copies.ok()) return copies.status();
         PublishPoolState(d);
         absl::Status s = d.backend->CopyPages(*copies);
         if (s.ok())
           s = d.backend->TransferKv(MakeTransfer(req, *seq, src.data, /*to_pool=*/true));
         if (!s.ok()) {
           MarkFaulted(d, s, "ImportKv");
           return absl::InternalError(absl::StrCat("device ", d.id, ": ", s.message()));
         }
         for (int64_t len : seq->lengths) resp->add_layer_lengths(static_cast<uint64_t>(len));
         metrics_->AddTokens(d.index, n * (req.layer_end() - req.layer_begin()), 0);
         return absl::OkStatus();
       });
}

}  // namespace attnd
