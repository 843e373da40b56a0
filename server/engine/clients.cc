#include "server/engine/clients.h"

#include "absl/strings/str_cat.h"

namespace attnd {
namespace {

std::string ClientName(const Caller& caller) {
  return caller.instance.empty() ? caller.principal
                                 : absl::StrCat(caller.principal, "/", caller.instance);
}

absl::Status OverQuota(absl::string_view what, int64_t held, int64_t limit,
                       absl::string_view flag) {
  return absl::ResourceExhaustedError(absl::StrCat("this client holds ", held, " ", what,
                                                   ", its quota of ", limit, " (--", flag, ")"));
}

}  // namespace

ClientRef ClientRegistry::Attach(const Caller& caller, absl::Time now) {
  const std::string name = ClientName(caller);
  absl::MutexLock lock(&mu_);
  auto [pit, new_principal] = principal_ids_.try_emplace(caller.principal, 0);
  if (new_principal) pit->second = next_id_++;
  auto [cit, new_client] = client_ids_.try_emplace(name, 0);
  if (new_client) {
    cit->second = next_id_++;
    Client& c = clients_[cit->second];
    c.id = cit->second;
    c.principal = pit->second;
    c.name = name;
  }
  Client& client = clients_[cit->second];
  client.last_seen = now;
  if (caller.connection != 0) client.connections.insert(caller.connection);
  return ClientRef{client.id, client.principal, caller.uid};
}

ClientRegistry::Client* ClientRegistry::FindLocked(uint32_t id) {
  auto it = clients_.find(id);
  return it == clients_.end() ? nullptr : &it->second;
}

void ClientRegistry::StreamOpened(uint32_t client) {
  absl::MutexLock lock(&mu_);
  if (Client* c = FindLocked(client)) ++c->open_streams;
}

void ClientRegistry::StreamClosed(uint32_t client, absl::Time now) {
  absl::MutexLock lock(&mu_);
  if (Client* c = FindLocked(client)) {
    --c->open_streams;
    c->last_seen = now;
  }
}

void ClientRegistry::ConnectionClosed(uint64_t connection, absl::Time now) {
  absl::MutexLock lock(&mu_);
  for (auto& [id, c] : clients_) {
    if (c.connections.erase(connection) > 0) c.last_seen = now;
  }
}

absl::Status ClientRegistry::ReserveRegion(const ClientRef& client, uint64_t bytes) {
  absl::MutexLock lock(&mu_);
  Principal& p = principals_[client.principal];
  if (quotas_.max_regions > 0 && p.regions >= quotas_.max_regions)
    return OverQuota("regions", p.regions, quotas_.max_regions, "max_regions_per_client");
  if (quotas_.max_region_bytes > 0 &&
      static_cast<uint64_t>(quotas_.max_region_bytes - p.region_bytes) < bytes)
    return OverQuota("bytes of regions", p.region_bytes, quotas_.max_region_bytes,
                     "max_region_bytes_per_client");
  ++p.regions;
  p.region_bytes += static_cast<int64_t>(bytes);
  if (Client* c = FindLocked(client.id)) {
    ++c->regions;
    c->region_bytes += static_cast<int64_t>(bytes);
  }
  return absl::OkStatus();
}

void ClientRegistry::ReleaseRegion(const ClientRef& client, uint64_t bytes) {
  absl::MutexLock lock(&mu_);
  Principal& p = principals_[client.principal];
  --p.regions;
  p.region_bytes -= static_cast<int64_t>(bytes);
  if (Client* c = FindLocked(client.id)) {
    --c->regions;
    c->region_bytes -= static_cast<int64_t>(bytes);
  }
}

absl::Status ClientRegistry::ReserveEvent(const ClientRef& client) {
  absl::MutexLock lock(&mu_);
  Principal& p = principals_[client.principal];
  if (quotas_.max_events > 0 && p.events >= quotas_.max_events)
    return OverQuota("CUDA events", p.events, quotas_.max_events, "max_events_per_client");
  ++p.events;
  if (Client* c = FindLocked(client.id)) ++c->events;
  return absl::OkStatus();
}

void ClientRegistry::ReleaseEvent(const ClientRef& client) {
  absl::MutexLock lock(&mu_);
  --principals_[client.principal].events;
  if (Client* c = FindLocked(client.id)) --c->events;
}

ClientHoldings ClientRegistry::HoldingsOf(uint32_t client) const {
  absl::MutexLock lock(&mu_);
  auto it = clients_.find(client);
  if (it == clients_.end()) return ClientHoldings{client == 0 ? "local" : "", 0, 0, 0};
  const Client& c = it->second;
  return ClientHoldings{c.name, c.regions, c.region_bytes, c.events};
}

std::vector<ExpiredClient> ClientRegistry::TakeExpired(absl::Time now, absl::Duration timeout) {
  std::vector<ExpiredClient> expired;
  absl::MutexLock lock(&mu_);
  for (auto it = clients_.begin(); it != clients_.end();) {
    const Client& c = it->second;
    if (c.connections.empty() && c.open_streams <= 0 && now - c.last_seen >= timeout) {
      expired.push_back(ExpiredClient{ClientRef{c.id, c.principal, std::nullopt}, c.name});
      client_ids_.erase(c.name);
      clients_.erase(it++);
    } else {
      ++it;
    }
  }
  return expired;
}

int64_t ClientRegistry::num_clients() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int64_t>(clients_.size());
}

}  // namespace attnd
