// The engine's regions and IPC events: client memory and events, opened once and named.
#include <memory>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "server/engine/engine.h"
#include "spdlog/spdlog.h"

namespace attnd {

absl::Status Engine::RegisterHostRegion(const HostRegionSpec& spec) {
  if (absl::Status s = ValidateRegionName(spec.name); !s.ok()) return s;
  if (regions_.Find(spec.name) != nullptr)
    return absl::AlreadyExistsError(
        absl::StrCat("name: a region named '", spec.name, "' is already registered"));
  auto region = HostRegion::Open(spec.name, spec.shm_key, spec.offset, spec.byte_size);
  if (!region.ok()) return region.status();
  if (platform_->PinsHostMemory()) {
    // Page-locked and portable, so every device's kernels reach it; pinned from the first
    // device's worker (a thread bound to a device), unpinned from anywhere.
    HostRegion* host = region->get();
    DevicePlatform* platform = platform_.get();
    absl::Status pinned = RunOnWorker(*devices_.front(), [host, platform]() {
      return platform->PinHostMemory(host->mapping(), host->mapping_bytes());
    });
    if (!pinned.ok()) return pinned;
    host->SetBeforeUnmap(
        [platform, mapping = host->mapping()] { platform->UnpinHostMemory(mapping); });
  }
  if (absl::Status s = regions_.Add(std::shared_ptr<Region>(*std::move(region))); !s.ok()) return s;
  // The key is the client's text, not checked like a name: escaped, it cannot forge a log line.
  spdlog::info("region={} kind=host shm_key=\"{}\" offset={} bytes={}", spec.name,
               absl::CHexEscape(spec.shm_key), spec.offset, spec.byte_size);
  return absl::OkStatus();
}

void Engine::RegisterIpcRegion(const IpcRegionSpec& spec, Done done) {
  if (!platform_->SupportsIpc()) {
    // The platform says why (the CPU backend has no CUDA memory).
    auto refused = platform_->OpenIpcRegion(spec.name, spec.ipc_handle, -1, spec.byte_size, {});
    return std::move(done)(refused.status());
  }
  if (absl::Status s = ValidateRegionName(spec.name); !s.ok()) return std::move(done)(s);
  if (regions_.Find(spec.name) != nullptr)
    return std::move(done)(absl::AlreadyExistsError(
        absl::StrCat("name: a region named '", spec.name, "' is already registered")));
  auto device = FindDevice(spec.device);
  if (!device.ok()) return std::move(done)(device.status());
  PostDone(*device, std::move(done), [this, spec](Device& d) -> absl::Status {
    auto region = platform_->OpenIpcRegion(spec.name, spec.ipc_handle, d.id, spec.byte_size,
                                           PosterFor(d));
    if (!region.ok()) return region.status();
    if (absl::Status s = regions_.Add(std::shared_ptr<Region>(*std::move(region))); !s.ok())
      return s;
    spdlog::info("region={} kind=cuda device={} bytes={}", spec.name, d.id, spec.byte_size);
    return absl::OkStatus();
  });
}

absl::Status Engine::UnregisterRegion(const std::string& name) {
  if (absl::Status s = regions_.Remove(name); !s.ok()) return s;
  spdlog::info("region={} unregistered", name);
  return absl::OkStatus();
}

std::vector<RegionSummary> Engine::ListRegions() const { return regions_.List(); }

void Engine::RegisterIpcEvent(const IpcEventSpec& spec, Done done) {
  if (!platform_->SupportsIpc()) {
    auto refused = platform_->OpenIpcEvent(spec.ipc_handle, -1, {});
    return std::move(done)(refused.status());
  }
  if (absl::Status s = ValidateRegionName(spec.name); !s.ok()) return std::move(done)(s);
  if (events_.Contains(spec.name))
    return std::move(done)(absl::AlreadyExistsError(
        absl::StrCat("name: a CUDA event named '", spec.name, "' is already registered")));
  auto device = FindDevice(spec.device);
  if (!device.ok()) return std::move(done)(device.status());
  PostDone(*device, std::move(done), [this, spec](Device& d) -> absl::Status {
    auto event = platform_->OpenIpcEvent(spec.ipc_handle, d.id, PosterFor(d));
    if (!event.ok()) return event.status();
    if (absl::Status s = events_.Add(spec.name, *std::move(event)); !s.ok()) return s;
    spdlog::info("event={} device={} registered", spec.name, d.id);
    return absl::OkStatus();
  });
}

absl::Status Engine::UnregisterIpcEvent(const std::string& name) { return events_.Remove(name); }

absl::StatusOr<ResolvedEvents> Engine::ResolveEvents(const EventNames& sync,
                                                     const Device& device) const {
  if (sync.empty()) return ResolvedEvents{};
  if (!platform_->SupportsIpc())
    return absl::FailedPreconditionError(
        "sync: the CPU backend has no CUDA events; leave sync empty");
  return events_.Resolve(sync.wait_event, sync.signal_event, device.id);
}

}  // namespace attnd
