// attnd's per-stage timings (attnd_request_stage_seconds{rpc,stage}) read back from /metrics:
// snapshots, the difference of two (the requests in between), and medians read off the buckets.
// server_bench prints the breakdown of each path from these; the e2e suite checks them.
#ifndef ATTND_TESTING_STAGE_METRICS_H_
#define ATTND_TESTING_STAGE_METRICS_H_

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace attnd::testing {

// One histogram: cumulative counts at each upper bound (le), ascending, +Inf last.
struct Histogram {
  std::vector<std::pair<double, double>> buckets;
  double sum = 0;
  double count = 0;
};

// (rpc, stage) -> histogram.
using StageHistograms = std::map<std::pair<std::string, std::string>, Histogram>;

// The attnd_request_stage_seconds series of a Prometheus text page.
StageHistograms ParseStageHistograms(const std::string& metrics_text);
// GET /metrics on 127.0.0.1:port and parse it.
absl::StatusOr<StageHistograms> ReadStageHistograms(int metrics_port);

// after - before, bucket by bucket (the requests observed in between).
Histogram Subtract(const Histogram& after, const Histogram& before);
StageHistograms Subtract(const StageHistograms& after, const StageHistograms& before);

// The q-quantile (0..1), interpolated linearly inside its bucket; 0 for an empty histogram.
double Quantile(const Histogram& h, double q);

}  // namespace attnd::testing

#endif  // ATTND_TESTING_STAGE_METRICS_H_
