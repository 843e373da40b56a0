// The engine's clients: leases, what a client holds, and releasing all of it at once (by the
// client, or by the lease thread once the client is gone).
#include <algorithm>
#include <utility>

#include "absl/strings/escaping.h"
#include "server/engine/engine.h"
#include "spdlog/spdlog.h"

namespace attnd {

LeaseState Engine::GetLease(const ClientRef& client) {
  const ClientHoldings held = clients_.HoldingsOf(client.id);
  LeaseState lease{held.name, 0, 0, held.regions, held.region_bytes, held.events};
  for (auto& device : devices_) {
    (void)RunOnWorker(*device, [&]() -> absl::Status {
      const OwnerUsage usage = device->pool->UsageOf(client.id);
      lease.sequences += usage.sequences;
      lease.pages += usage.pages;
      return absl::OkStatus();
    });
  }
  return lease;
}

ReleasedHoldings Engine::ReleaseAll(const ClientRef& client) {
  ReleasedHoldings released;
  for (const std::shared_ptr<Region>& region : regions_.RemoveOwner(client.id)) {
    clients_.ReleaseRegion(client, region->byte_size());
    ++released.regions;
  }
  released.events = events_.RemoveOwner(client.id);
  DropHolds(grants_.RevokeOwner(client.id));
  for (int64_t i = 0; i < released.events; ++i) clients_.ReleaseEvent(client);
  for (auto& device : devices_) {
    // The pool is plain bookkeeping: released even on a device that faulted.
    (void)RunOnWorker(*device, [&]() -> absl::Status {
      const OwnerUsage freed = device->pool->ReleaseOwner(client.id);
      released.sequences += freed.sequences;
      released.freed_pages += freed.pages;
      PublishPoolState(*device);
      return absl::OkStatus();
    });
  }
  return released;
}

void Engine::ReapExpiredLeases(absl::Time now) {
  const absl::Duration timeout = absl::Seconds(config_.lease_timeout_s);
  for (const ExpiredClient& gone : clients_.TakeExpired(now, timeout)) {
    const ReleasedHoldings r = ReleaseAll(gone.ref);
    if (r.sequences + r.regions + r.events == 0) continue;
    metrics_->RecordLeaseExpired();
    spdlog::info(
        "lease expired client=\"{}\" sequences={} freed_pages={} regions={} events={}",
        absl::CHexEscape(gone.name), r.sequences, r.freed_pages, r.regions, r.events);
  }
  metrics_->SetClients(clients_.num_clients());
}

void Engine::RunLeaseThread() {
  // Often enough that a lease ends within about a quarter of its timeout of running out.
  const absl::Duration period =
      std::clamp(absl::Seconds(config_.lease_timeout_s) / 4, absl::Milliseconds(50), absl::Seconds(5));
  absl::MutexLock lock(&lease_mu_);
  while (!lease_mu_.AwaitWithTimeout(absl::Condition(&stop_leases_), period)) {
    lease_mu_.Unlock();
    ReapExpiredLeases(absl::Now());
    DropHolds(grants_.Sweep(absl::Now()));
    lease_mu_.Lock();
  }
}

}  // namespace attnd
