// The same-run UCX ceiling of the KV transfer: two UcxTransports in one process over host
// memory, one Read of --bytes as a single run, then the same bytes in runs of --run_bytes.
// Prints GB/s (best and median of --iters) for each; UCX_TLS picks the transport, e.g.
//   UCX_TLS=tcp UCX_NET_DEVICES=lo build/bench/ucx_ceiling --bytes=268435456 --run_bytes=65536
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/time/clock.h"
#include "server/transport/ucx_transport.h"

ABSL_FLAG(uint64_t, bytes, 256ull << 20, "bytes read per iteration");
ABSL_FLAG(uint64_t, run_bytes, 64 << 10, "run size of the split read");
ABSL_FLAG(int, iters, 5, "timed iterations of each read (after one warm-up)");

namespace {

// Best and median GB/s of `iters` reads of `runs`, after one untimed read; 0 after an error.
std::pair<double, double> Time(attnd::UcxTransport& to, const attnd::RemotePool& from,
                               const std::vector<attnd::CopyRun>& runs, uint64_t bytes,
                               int iters) {
  std::vector<double> rates;
  for (int i = -1; i < iters; ++i) {
    const absl::Time start = absl::Now();
    if (absl::Status s = to.Read(from, runs, absl::Now() + absl::Seconds(120)); !s.ok()) {
      std::fprintf(stderr, "read failed: %s\n", s.ToString().c_str());
      return {0, 0};
    }
    const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
    if (i >= 0) rates.push_back(static_cast<double>(bytes) / seconds / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  return {rates.back(), rates[rates.size() / 2]};
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const uint64_t bytes = absl::GetFlag(FLAGS_bytes);
  const uint64_t run_bytes = std::max<uint64_t>(1, absl::GetFlag(FLAGS_run_bytes));
  const int iters = std::max(1, absl::GetFlag(FLAGS_iters));
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  auto source = attnd::UcxTransport::Create({src.data(), bytes, false});
  auto dest = attnd::UcxTransport::Create({dst.data(), bytes, false});
  if (!source.ok() || !dest.ok()) {
    std::fprintf(stderr, "UcxTransport: %s\n",
                 (source.ok() ? dest.status() : source.status()).ToString().c_str());
    return 1;
  }
  const attnd::RemotePool from{(*source)->worker_address(), (*source)->pool_rkey(),
                               (*source)->pool_base(), (*source)->pool_bytes()};
  std::vector<attnd::CopyRun> split;
  for (uint64_t at = 0; at < bytes; at += run_bytes) {
    split.push_back({at, at, std::min(run_bytes, bytes - at)});
  }
  const auto [one_best, one_median] = Time(**dest, from, {{0, 0, bytes}}, bytes, iters);
  const auto [split_best, split_median] = Time(**dest, from, split, bytes, iters);
  std::printf("UCX %s, %llu bytes, %d iterations\n", attnd::UcxTransport::Version().c_str(),
              static_cast<unsigned long long>(bytes), iters);
  std::printf("one run:               best %.2f GB/s, median %.2f GB/s\n", one_best, one_median);
  std::printf("%zu runs of %llu bytes: best %.2f GB/s, median %.2f GB/s\n", split.size(),
              static_cast<unsigned long long>(run_bytes), split_best, split_median);
  return one_best > 0 && split_best > 0 ? 0 : 1;
}
