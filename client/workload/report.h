// The text a workload prints about itself: the summary of its data calls and checks (counts,
// tokens, throughput, latency percentiles, errors against the reference) and the Decode
// benchmark's table.
#ifndef ATTND_CLIENT_WORKLOAD_REPORT_H_
#define ATTND_CLIENT_WORKLOAD_REPORT_H_

#include <cstddef>
#include <string>

#include "client/workload/accounting.h"
#include "client/workload/bench.h"
#include "client/workload/verifier.h"

namespace attnd::workload {

// "summary:\n  calls ...\n  tokens ...\n  throughput ...\n" then one line of latencies per
// kind of call and one of checks.
std::string FormatSummary(const Accounting& accounting, const CheckStats& checks, size_t failures);

// "bench: Decode of N sequences ...\n" then one line per transport: p50, p99, mean per call,
// calls/s and tokens/s.
std::string FormatBenchReport(const BenchResult& bench);

}  // namespace attnd::workload

#endif  // ATTND_CLIENT_WORKLOAD_REPORT_H_
