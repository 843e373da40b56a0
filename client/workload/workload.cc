#include "client/workload/workload.h"

#include <random>
#include <utility>

#include "client/workload/bench.h"
#include "client/workload/generator.h"
#include "client/workload/lifecycle.h"
#include "client/workload/report.h"
#include "client/workload/session.h"

namespace attnd::workload {
namespace {

// The schedule, up to the summary: sequences created, prompts prefilled or imported, decode
// steps, lengths checked, everything released.
absl::Status RunSchedule(Session& s) {
  SequenceList seqs;
  if (absl::Status st = CreateSequences(s, seqs); !st.ok()) return st;
  if (absl::Status st = PrefillPrompts(s, seqs); !st.ok()) return st;
  for (auto& seq : seqs) {
    if (seq->imported) {
      if (absl::Status st = ImportPrompt(s, *seq); !st.ok()) return st;
    }
  }
  if (absl::Status st = DecodeSteps(s, seqs); !st.ok()) return st;
  if (absl::Status st = CheckServerLengths(s, seqs); !st.ok()) return st;
  return ReleaseAll(s, seqs);
}

void PrintSummary(const Session& s, WorkloadResult& result) {
  result.accounting = s.accounting;
  s.out.Put(FormatSummary(s.accounting, s.verifier.stats(), s.verifier.failures().size()));
}

}  // namespace

uint64_t RandomSeed() {
  std::random_device entropy;
  const uint64_t seed = (static_cast<uint64_t>(entropy()) << 32) | entropy();
  return seed == 0 ? 1 : seed;
}

WorkloadResult RunWorkload(client::Client& client, const WorkloadOptions& options) {
  WorkloadResult result;
  result.seed = options.seed != 0 ? options.seed : RandomSeed();
  if (options.sequences < 1 || options.steps < 0) {
    result.status = absl::InvalidArgumentError("sequences must be >= 1 and steps >= 0");
    return result;
  }
  WorkloadOptions resolved = options;
  resolved.seed = result.seed;
  Session s(client, resolved);
  // The summary is printed once: after the workload's own calls and before the benchmark's, or
  // at the end when the run stops before that.
  bool summary_printed = false;
  result.status = [&]() -> absl::Status {
    if (absl::Status st = Open(s); !st.ok()) return st;
    if (absl::Status st = RunSchedule(s); !st.ok()) return st;
    PrintSummary(s, result);
    summary_printed = true;
    if (options.bench_batch <= 0) return absl::OkStatus();
    absl::StatusOr<BenchResult> bench = RunDecodeBench(s);
    if (!bench.ok()) return bench.status();
    result.bench = *std::move(bench);
    return absl::OkStatus();
  }();
  Close(s);
  if (!summary_printed) PrintSummary(s, result);
  s.out.Flush();
  result.failures = s.verifier.failures();
  result.checks = s.verifier.stats();
  return result;
}

}  // namespace attnd::workload
