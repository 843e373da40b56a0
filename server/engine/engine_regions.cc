// The engine's regions and IPC events: client memory and events, opened once and named.
#include <memory>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "server/engine/engine.h"
#include "spdlog/spdlog.h"

namespace attnd {

absl::Status Engine::RegisterHostRegion(const ClientRef& client, const HostRegionSpec& spec) {
  if (absl::Status s = ValidateRegionName(spec.name); !s.ok()) return s;
  if (regions_.Find(spec.name, client.id) != nullptr)
    return absl::AlreadyExistsError(
        absl::StrCat("name: a region named '", spec.name, "' is already registered"));
  // Counted before anything is mapped (mappings are a finite resource of the whole process),
  // released if anything fails.
  if (absl::Status s = clients_.ReserveRegion(client, spec.byte_size); !s.ok()) return s;
  auto region = OpenHostRegion(client, spec);
  absl::Status added = region.status();
  if (added.ok()) added = AddHostRegion(client, *std::move(region));
  if (!added.ok()) {
    clients_.ReleaseRegion(client, spec.byte_size);
    return added;
  }
  // The key is the client's text, not checked like a name: escaped, it cannot forge a log line.
  spdlog::info("region={} kind=host shm_key=\"{}\" offset={} bytes={}", spec.name,
               absl::CHexEscape(spec.shm_key), spec.offset, spec.byte_size);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<HostRegion>> Engine::OpenHostRegion(const ClientRef& client,
                                                                   const HostRegionSpec& spec) {
  // attnd may run as root and would open objects its caller cannot: it opens only what the
  // caller owns, so a client it cannot give a uid (TCP without a token that names one) gets
  // no host regions. The in-process client (id 0) is attnd's own code.
  if (client.id != 0 && !client.uid.has_value())
    return absl::PermissionDeniedError(
        "shm_key: host regions need the caller's uid, known on the Unix socket (or from a "
        "--token_file entry's uid=); this caller has none");
  std::optional<uid_t> uid;
  if (client.uid.has_value()) uid = static_cast<uid_t>(*client.uid);
  return HostRegion::Open(spec.name, spec.shm_key, spec.offset, spec.byte_size, uid);
}

absl::Status Engine::AddHostRegion(const ClientRef& client, std::unique_ptr<HostRegion> region) {
  if (platform_->PinsHostMemory()) {
    // Page-locked and portable, so every device's kernels reach it; pinned from the first
    // device's worker (a thread bound to a device), unpinned from anywhere.
    HostRegion* host = region.get();
    DevicePlatform* platform = platform_.get();
    absl::Status pinned = RunOnWorker(*devices_.front(), [host, platform]() {
      return platform->PinHostMemory(host->mapping(), host->mapping_bytes());
    });
    if (!pinned.ok()) return pinned;
    host->SetBeforeUnmap(
        [platform, mapping = host->mapping()] { platform->UnpinHostMemory(mapping); });
  }
  return regions_.Add(std::shared_ptr<Region>(std::move(region)), client.id);
}

void Engine::RegisterIpcRegion(const ClientRef& client, const IpcRegionSpec& spec, Done done) {
  if (!platform_->SupportsIpc()) {
    // The platform says why (the CPU backend has no CUDA memory).
    auto refused = platform_->OpenIpcRegion(spec.name, spec.ipc_handle, -1, spec.byte_size, {});
    return std::move(done)(refused.status());
  }
  if (absl::Status s = ValidateRegionName(spec.name); !s.ok()) return std::move(done)(s);
  if (regions_.Find(spec.name, client.id) != nullptr)
    return std::move(done)(absl::AlreadyExistsError(
        absl::StrCat("name: a region named '", spec.name, "' is already registered")));
  auto device = FindDevice(spec.device);
  if (!device.ok()) return std::move(done)(device.status());
  if (absl::Status s = clients_.ReserveRegion(client, spec.byte_size); !s.ok())
    return std::move(done)(s);
  PostDone(*device, std::move(done), [this, client, spec](Device& d) -> absl::Status {
    auto region = platform_->OpenIpcRegion(spec.name, spec.ipc_handle, d.id, spec.byte_size,
                                           PosterFor(d));
    absl::Status s = region.status();
    if (s.ok()) s = regions_.Add(std::shared_ptr<Region>(*std::move(region)), client.id);
    if (!s.ok()) {
      clients_.ReleaseRegion(client, spec.byte_size);
      return s;
    }
    spdlog::info("region={} kind=cuda device={} bytes={}", spec.name, d.id, spec.byte_size);
    return absl::OkStatus();
  });
}

absl::Status Engine::UnregisterRegion(const ClientRef& client, const std::string& name) {
  std::shared_ptr<Region> region = regions_.Take(name, client.id);
  if (region == nullptr) return absl::NotFoundError(absl::StrCat("name: no region named '", name, "'"));
  clients_.ReleaseRegion(client, region->byte_size());
  spdlog::info("region={} unregistered", name);
  return absl::OkStatus();
}

std::vector<RegionSummary> Engine::ListRegions(const ClientRef& client) const {
  return regions_.List(client.id);
}

void Engine::RegisterIpcEvent(const ClientRef& client, const IpcEventSpec& spec, Done done) {
  if (!platform_->SupportsIpc()) {
    auto refused = platform_->OpenIpcEvent(spec.ipc_handle, -1, {});
    return std::move(done)(refused.status());
  }
  if (absl::Status s = ValidateRegionName(spec.name); !s.ok()) return std::move(done)(s);
  if (events_.Contains(spec.name, client.id))
    return std::move(done)(absl::AlreadyExistsError(
        absl::StrCat("name: a CUDA event named '", spec.name, "' is already registered")));
  auto device = FindDevice(spec.device);
  if (!device.ok()) return std::move(done)(device.status());
  if (absl::Status s = clients_.ReserveEvent(client); !s.ok()) return std::move(done)(s);
  PostDone(*device, std::move(done), [this, client, spec](Device& d) -> absl::Status {
    auto event = platform_->OpenIpcEvent(spec.ipc_handle, d.id, PosterFor(d));
    absl::Status s = event.status();
    if (s.ok()) s = events_.Add(spec.name, *std::move(event), client.id);
    if (!s.ok()) {
      clients_.ReleaseEvent(client);
      return s;
    }
    spdlog::info("event={} device={} registered", spec.name, d.id);
    return absl::OkStatus();
  });
}

absl::Status Engine::UnregisterIpcEvent(const ClientRef& client, const std::string& name) {
  if (absl::Status s = events_.Remove(name, client.id); !s.ok()) return s;
  clients_.ReleaseEvent(client);
  return absl::OkStatus();
}

absl::StatusOr<ResolvedEvents> Engine::ResolveEvents(const EventNames& sync,
                                                     const Device& device,
                                                     const ClientRef& client) const {
  if (sync.empty()) return ResolvedEvents{};
  if (!platform_->SupportsIpc())
    return absl::FailedPreconditionError(
        "sync: the CPU backend has no CUDA events; leave sync empty");
  return events_.Resolve(sync.wait_event, sync.signal_event, device.id, client.id);
}

}  // namespace attnd
