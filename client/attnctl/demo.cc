#include "client/attnctl/demo.h"

#include "absl/strings/str_format.h"
#include "client/workload/latencies.h"
#include "client/workload/workload.h"

namespace attnd::attnctl {

int RunDemo(client::Client& client, const workload::WorkloadOptions& options) {
  workload::WorkloadOptions run = options;
  if (run.seed == 0) run.seed = workload::RandomSeed();
  absl::PrintF("demo: seed %llu (rerun with --seed=%llu)\n",
               static_cast<unsigned long long>(run.seed),
               static_cast<unsigned long long>(run.seed));
  if (run.sequences < 1 || run.steps < 0) {
    absl::PrintF("demo: FAIL (--demo_sequences must be >= 1 and --demo_steps >= 0)\n");
    return 2;
  }
  run.log = stdout;
  run.shm_prefix = "attnctl";
  run.region_prefix = "attnctl-demo";
  run.unlink_shm_on_signal = true;

  const workload::Clock::time_point begin = workload::Clock::now();
  const workload::WorkloadResult result = workload::RunWorkload(client, run);
  absl::PrintF("demo: wall time %.2f s\n", workload::SecondsSince(begin));
  if (!result.status.ok()) {
    absl::PrintF("demo: FAIL (%s)\n", result.status.ToString());
    return 1;
  }
  if (!result.failures.empty()) {
    absl::PrintF("demo: FAIL (%d checks failed; first: %s)\n", result.failures.size(),
                 result.failures.front());
    return 1;
  }
  absl::PrintF("demo: PASS\n");
  return 0;
}

}  // namespace attnd::attnctl
