// One run of a workload against one server: the connection, what the server serves, the shared
// region, the stream, the random source, the server sequences still to release, and what was
// measured and checked. The phases (generator.h, lifecycle.h, bench.h) all work on a Session.
#ifndef ATTND_CLIENT_WORKLOAD_SESSION_H_
#define ATTND_CLIENT_WORKLOAD_SESSION_H_

#include <cstdint>
#include <memory>
#include <random>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "client/client.h"
#include "client/workload/accounting.h"
#include "client/workload/buffers.h"
#include "client/workload/model.h"
#include "client/workload/options.h"
#include "client/workload/printer.h"
#include "client/workload/verifier.h"

namespace attnd::workload {

struct Session {
  // `options.seed` must be resolved (nonzero).
  Session(client::Client& client, const WorkloadOptions& options);

  client::Client& client;
  const WorkloadOptions options;
  const Printer out;
  std::mt19937_64 rng;

  // Open() fills these.
  v1::ServerInfo info;
  Model model;
  uint64_t pages_free_at_start = 0;  // on options.device
  uint64_t live_at_start = 0;        // sequences on options.device
  std::unique_ptr<Buffers> buffers;
  std::string region;  // the name `buffers` is registered under
  bool region_registered = false;
  std::unique_ptr<client::DataStream> stream;

  uint64_t next_id = 0;         // the next sequence id to create
  std::set<uint64_t> live_ids;  // created on the server and not yet released

  Accounting accounting;
  Verifier verifier;
};

// Learns the server's model and checks the device serves, lays out and registers the region,
// picks fresh sequence ids and opens the stream.
absl::Status Open(Session& session);

// Closes the stream, releases every sequence still live and unregisters the region; what goes
// wrong is recorded as a failed check. Safe after a partial Open.
void Close(Session& session);

}  // namespace attnd::workload

#endif  // ATTND_CLIENT_WORKLOAD_SESSION_H_
