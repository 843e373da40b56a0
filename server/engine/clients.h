// Clients: who owns what. Every sequence, region and event belongs to the client that made it,
// and a client sees and touches only its own. A client is a principal (a uid on the Unix
// socket, a bearer token's name, or "tcp") plus an optional instance name the caller picks
// (the `attnd-client` metadata), so one user's processes can keep separate leases; quotas are
// per principal, so instances cannot multiply them. A client's lease lives while it has a
// connection or an open Stream, and for lease_timeout after its last call; the engine's reaper
// then releases everything the client held.
#ifndef ATTND_SERVER_ENGINE_CLIENTS_H_
#define ATTND_SERVER_ENGINE_CLIENTS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace attnd {

// Who makes a call, as the wire layer established it.
struct Caller {
  std::string principal;            // "uid:1000", "token:alice", "tcp"
  std::string instance;             // the `attnd-client` metadata; may be empty
  std::optional<uint32_t> uid;      // the peer's uid (Unix socket only): host-region owner checks
  uint64_t connection = 0;          // the Unix-socket connection; 0 when unknown
};

// A client as the engine knows it. The default is the in-process client (tests, tools): owner
// 0, principal 0, no uid check.
struct ClientRef {
  uint32_t id = 0;
  uint32_t principal = 0;
  std::optional<uint32_t> uid;
};

// Per-principal limits; 0: none.
struct ClientQuotas {
  int64_t max_regions = 0;
  int64_t max_region_bytes = 0;
  int64_t max_events = 0;
};

// What one client holds of the things counted here (sequences and pages live in the pools).
struct ClientHoldings {
  std::string name;
  int64_t regions = 0;
  int64_t region_bytes = 0;
  int64_t events = 0;
};

// A client whose lease ran out, forgotten by the registry; its holdings are still to release.
struct ExpiredClient {
  ClientRef ref;
  std::string name;
};

class ClientRegistry {
 public:
  explicit ClientRegistry(ClientQuotas quotas) : quotas_(quotas) {}

  // Finds or makes the caller's client and renews its lease.
  ClientRef Attach(const Caller& caller, absl::Time now);
  // An open Stream keeps its client's lease alive.
  void StreamOpened(uint32_t client);
  void StreamClosed(uint32_t client, absl::Time now);
  // A Unix-socket connection ended: its clients' leases start running out.
  void ConnectionClosed(uint64_t connection, absl::Time now);

  // Counts a region (an event) against the client's principal; RESOURCE_EXHAUSTED past a
  // quota. Release undoes it.
  absl::Status ReserveRegion(const ClientRef& client, uint64_t bytes);
  void ReleaseRegion(const ClientRef& client, uint64_t bytes);
  absl::Status ReserveEvent(const ClientRef& client);
  void ReleaseEvent(const ClientRef& client);

  ClientHoldings HoldingsOf(uint32_t client) const;
  // Clients whose lease ran out (no connection, no Stream, nothing since `now - timeout`).
  // They are forgotten: a later call from the same caller starts a fresh client.
  std::vector<ExpiredClient> TakeExpired(absl::Time now, absl::Duration timeout);
  int64_t num_clients() const;
  const ClientQuotas& quotas() const { return quotas_; }

 private:
  struct Client {
    uint32_t id = 0;
    uint32_t principal = 0;
    std::string name;
    absl::flat_hash_set<uint64_t> connections;
    int64_t open_streams = 0;
    absl::Time last_seen;
    int64_t regions = 0;
    int64_t region_bytes = 0;
    int64_t events = 0;
  };
  struct Principal {
    int64_t regions = 0;
    int64_t region_bytes = 0;
    int64_t events = 0;
  };
  Client* FindLocked(uint32_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const ClientQuotas quotas_;
  mutable absl::Mutex mu_;
  uint32_t next_id_ ABSL_GUARDED_BY(mu_) = 1;  // 0 is the in-process client
  absl::flat_hash_map<std::string, uint32_t> principal_ids_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint32_t, Principal> principals_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, uint32_t> client_ids_ ABSL_GUARDED_BY(mu_);  // by name
  absl::flat_hash_map<uint32_t, Client> clients_ ABSL_GUARDED_BY(mu_);
};

}  // namespace attnd

#endif  // ATTND_SERVER_ENGINE_CLIENTS_H_
