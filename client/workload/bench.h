// The Decode latency benchmark: options.bench_batch sequences filled to options.bench_context
// tokens with Append, then options.bench_calls Decode calls (layers in turn) over the unary
// RPC, over the stream one at a time, and over the stream with one call per layer in flight.
// The first call of each transport (the first round, when pipelined) is checked.
#ifndef ATTND_CLIENT_WORKLOAD_BENCH_H_
#define ATTND_CLIENT_WORKLOAD_BENCH_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "client/workload/latencies.h"
#include "client/workload/session.h"

namespace attnd::workload {

struct BenchResult {
  int64_t batch = 0;     // sequences per Decode
  int64_t context = 0;   // their tokens when the timing starts
  int64_t calls = 0;     // timed calls per transport
  int64_t pipeline = 0;  // calls in flight in the pipelined mode
  Latencies unary;       // one sample per call
  Latencies stream;      // one sample per call
  Latencies rounds;      // pipelined: one sample per round of `pipeline` calls
};

// Runs the benchmark, prints its table (FormatBenchReport) and releases its sequences.
absl::StatusOr<BenchResult> RunDecodeBench(Session& s);

}  // namespace attnd::workload

#endif  // ATTND_CLIENT_WORKLOAD_BENCH_H_
