#include "client/workload/report.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace attnd::workload {
namespace {

// One transport's line; per_sample: calls per latency sample.
std::string BenchLine(const std::string& name, const Latencies& lat, int64_t per_sample,
                      int64_t batch) {
  const double per_call = lat.total() / (lat.count() * per_sample);
  return absl::StrFormat(
      "  %-26s p50 %8s  p99 %8s  mean/call %8s  %8.0f calls/s  %10.0f tokens/s\n", name,
      Micros(lat.Percentile(50)), Micros(lat.Percentile(99)), Micros(per_call), 1.0 / per_call,
      batch / per_call);
}

}  // namespace

std::string FormatSummary(const Accounting& a, const CheckStats& checks, size_t failures) {
  const double rpc_seconds = a.rpc_seconds();
  const double per_second = rpc_seconds > 0 ? 1.0 / rpc_seconds : 0.0;
  std::string out = "summary:\n";
  absl::StrAppendFormat(
      &out, "  calls       %d data calls: Prefill %d, Decode %d unary + %d Stream, Append %d\n",
      a.calls, a.prefill.count(), a.decode_unary.count(), a.decode_stream.count(),
      a.append.count());
  absl::StrAppendFormat(
      &out, "  tokens      %d (query tokens attended + K/V tokens appended, all layers)\n",
      a.tokens);
  absl::StrAppendFormat(&out,
                        "  throughput  %.0f tokens/s, %.0f calls/s (%.3f s inside data calls)\n",
                        a.tokens * per_second, a.calls * per_second, rpc_seconds);
  absl::StrAppendFormat(&out, "  Prefill          %s\n", a.prefill.Summary());
  absl::StrAppendFormat(&out, "  Decode (unary)   %s\n", a.decode_unary.Summary());
  absl::StrAppendFormat(&out, "  Decode (Stream)  %s\n", a.decode_stream.Summary());
  absl::StrAppendFormat(&out, "  Append           %s\n", a.append.Summary());
  absl::StrAppendFormat(
      &out,
      "  checks      %d outputs (max rel err Prefill %.2e, Decode %.2e; tol %.0e), %d lse "
      "(max abs err %.2e; tol %.0e), %d failed\n",
      checks.outputs, checks.max_error[0], checks.max_error[1], checks.tolerance, checks.lse,
      checks.max_lse_error, checks.lse_tolerance, failures);
  return out;
}

std::string FormatBenchReport(const BenchResult& b) {
  std::string out = absl::StrFormat(
      "bench: Decode of %d sequences at ~%d tokens, %d calls per transport (layers in turn), "
      "checked once per transport\n",
      b.batch, b.context, b.calls);
  absl::StrAppend(&out, BenchLine("unary Decode", b.unary, 1, b.batch));
  absl::StrAppend(&out, BenchLine("Stream (one in flight)", b.stream, 1, b.batch));
  absl::StrAppend(&out, BenchLine(absl::StrFormat("Stream (%d in flight)", b.pipeline), b.rounds,
                                  b.pipeline, b.batch));
  absl::StrAppendFormat(&out, "  (pipelined p50/p99 are per round of %d calls)\n", b.pipeline);
  return out;
}

}  // namespace attnd::workload
