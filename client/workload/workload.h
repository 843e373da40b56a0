// A prefill + decode workload driven through a running attnd, with every output checked against
// a dense fp64 reference computed in the client, and the latency and throughput of its calls:
//
//   workload::WorkloadOptions options;  // sequences, steps, chunking, benchmark, seed
//   workload::WorkloadResult result = workload::RunWorkload(*client, options);
//   if (!result.passed()) ...  // result.status, result.failures
//
// The run creates its own sequences (fresh ids) and shared-memory region and releases and
// unregisters them at the end, whatever happened in between. See generator.h for the schedule
// and bench.h for the Decode latency benchmark that follows it.
#ifndef ATTND_CLIENT_WORKLOAD_WORKLOAD_H_
#define ATTND_CLIENT_WORKLOAD_WORKLOAD_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "client/client.h"
#include "client/workload/accounting.h"
#include "client/workload/bench.h"
#include "client/workload/options.h"
#include "client/workload/verifier.h"

namespace attnd::workload {

struct WorkloadResult {
  uint64_t seed = 0;                  // the seed the run used (drawn when options.seed was 0)
  absl::Status status;                // why the run stopped early; OK if it ran to the end
  std::vector<std::string> failures;  // checks that failed, in order
  Accounting accounting;              // the workload's calls before the benchmark
  CheckStats checks;                  // every check, the benchmark's included
  std::optional<BenchResult> bench;   // when the benchmark ran to the end

  bool passed() const { return status.ok() && failures.empty(); }
};

// Runs the workload; progress, the summary and the benchmark's table go to options.log. An
// INVALID_ARGUMENT status for options no workload can run (fewer than one sequence, negative
// steps).
WorkloadResult RunWorkload(client::Client& client, const WorkloadOptions& options);

}  // namespace attnd::workload

#endif  // ATTND_CLIENT_WORKLOAD_WORKLOAD_H_
