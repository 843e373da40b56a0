// KV transfer between two attnd processes: a sequence of --tokens tokens on every layer of the
// source, granted once, pulled --repeats times whole into --dest and as a head range into
// --dest_half (kv heads [0, half's heads)). Prints per pull the bytes, the UCX requests, and
// GB/s of the UCX reads alone (PullKvResponse.transfer_s) and of the whole PullKv call. The
// ceiling (ucx_perftest in the same run) is measured by the calling script.
//   kv_transfer_bench --source=unix:///tmp/src.sock --dest=unix:///tmp/dst.sock \
//       --dest_half=unix:///tmp/half.sock --tokens=4096
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "testing/harness.h"

ABSL_FLAG(std::string, source, "", "the source attnd");
ABSL_FLAG(std::string, dest, "", "a destination with the source's model");
ABSL_FLAG(std::string, dest_half, "", "a destination with fewer kv heads (optional)");
ABSL_FLAG(uint32_t, tokens, 4096, "tokens of the sequence, on every layer");
ABSL_FLAG(int, repeats, 5, "pulls of each kind");
ABSL_FLAG(uint32_t, dest_device, 0, "the destinations' device");

namespace attnd {
namespace {

struct Row {
  double transfer_gbs, call_gbs;
  uint64_t bytes, requests;
};

int Run() {
  const uint32_t tokens = absl::GetFlag(FLAGS_tokens);
  auto src = client::Client::Connect(absl::GetFlag(FLAGS_source));
  if (!src.ok()) return fprintf(stderr, "source: %s\n", src.status().ToString().c_str()), 1;
  auto h = testing::Harness::Create(src->get(), absl::StrCat("bench-", getpid()), 0, tokens, 1);
  if (!h.ok()) return fprintf(stderr, "harness: %s\n", h.status().ToString().c_str()), 1;
  (void)(*src)->ReleaseSequence(0, 1);  // an earlier run's
  if (!(*h)->CreateSequence(1).ok()) return 1;
  const uint32_t layers = (*h)->info().model().num_layers();
  // One random fill serves every layer: the bytes' values do not matter here, and filling is
  // the slow part.
  v1::AppendRequest append = (*h)->BuildAppend(0, {{1, tokens}});
  for (uint32_t layer = 0; layer < layers; ++layer) {
    append.set_layer(layer);
    auto r = (*src)->Append(append);
    if (!r.ok()) return fprintf(stderr, "append: %s\n", r.status().ToString().c_str()), 1;
  }
  v1::GrantKvRequest g;
  g.set_seq_id(1);
  g.set_ttl_ms(600000);
  auto grant = (*src)->GrantKv(g);
  if (!grant.ok()) return fprintf(stderr, "grant: %s\n", grant.status().ToString().c_str()), 1;

  const auto pull = [&](const std::string& target, uint32_t heads, const char* label) -> int {
    auto dst = client::Client::Connect(target);
    if (!dst.ok()) return 1;
    std::vector<Row> rows;
    for (int i = 0; i < absl::GetFlag(FLAGS_repeats); ++i) {
      v1::PullKvRequest r;
      r.set_source(absl::GetFlag(FLAGS_source));
      r.set_grant(grant->grant());
      r.set_head_end(heads);
      r.set_seq_id(100 + i);
      r.set_device(absl::GetFlag(FLAGS_dest_device));
      const auto t0 = std::chrono::steady_clock::now();
      auto resp = (*dst)->PullKv(r);
      const double call_s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (!resp.ok()) return fprintf(stderr, "%s pull: %s\n", label, resp.status().ToString().c_str()), 1;
      rows.push_back({resp->bytes() / resp->transfer_s() / 1e9, resp->bytes() / call_s / 1e9,
                      resp->bytes(), resp->requests()});
      (void)(*dst)->ReleaseSequence(absl::GetFlag(FLAGS_dest_device), 100 + i);
    }
    std::sort(rows.begin(), rows.end(),
              [](const Row& a, const Row& b) { return a.transfer_gbs < b.transfer_gbs; });
    const Row& med = rows[rows.size() / 2];
    printf("%-10s bytes=%llu requests=%llu transfer_GBps_median=%.1f best=%.1f call_GBps_median=%.1f\n",
           label, static_cast<unsigned long long>(med.bytes),
           static_cast<unsigned long long>(med.requests), med.transfer_gbs,
           rows.back().transfer_gbs, med.call_gbs);
    return 0;
  };
  const uint32_t heads = (*h)->info().model().num_kv_heads();
  if (pull(absl::GetFlag(FLAGS_dest), heads, "whole") != 0) return 1;
  if (!absl::GetFlag(FLAGS_dest_half).empty() &&
      pull(absl::GetFlag(FLAGS_dest_half), heads / 2, "half") != 0)
    return 1;
  return 0;
}

}  // namespace
}  // namespace attnd

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return attnd::Run();
}
