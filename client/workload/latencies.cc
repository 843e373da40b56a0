#include "client/workload/latencies.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_format.h"

namespace attnd::workload {

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string Micros(double seconds) { return absl::StrFormat("%.0f us", seconds * 1e6); }

double Latencies::Percentile(double p) const {
  if (samples_.empty()) return 0;
  std::vector<double> sorted = samples_;
  std::sort(sorted.begin(), sorted.end());
  const size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * sorted.size()));
  return sorted[std::min(sorted.size() - 1, rank == 0 ? 0 : rank - 1)];
}

std::string Latencies::Summary() const {
  if (samples_.empty()) return "no calls";
  return absl::StrFormat("n=%d  p50 %s  p90 %s  p99 %s  mean %s", count(), Micros(Percentile(50)),
                         Micros(Percentile(90)), Micros(Percentile(99)), Micros(total_ / count()));
}

}  // namespace attnd::workload
