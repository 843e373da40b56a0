// `attnctl demo`: drives a real prefill + decode workload through a running attnd and checks
// every output against a dense fp64 reference computed in the client, then measures Decode
// latency over the unary RPC and over the Stream.
#ifndef ATTND_CLIENT_ATTNCTL_DEMO_H_
#define ATTND_CLIENT_ATTNCTL_DEMO_H_

#include <cstdint>

#include "client/client.h"

namespace attnd::attnctl {

struct DemoOptions {
  uint32_t device = 0;       // server device the sequences live on
  int sequences = 16;        // prompts prefilled (one of them imported with Append instead)
  int steps = 32;            // decode steps, one Decode per layer each
  int max_prompt = 300;      // prompt lengths are drawn from [1, max_prompt]
  int prefill_chunk = 64;    // most tokens of one sequence per Prefill item
  int prefill_tokens = 256;  // most tokens per Prefill request
  uint64_t seed = 0;         // 0: draw one and print it
  int bench_batch = 64;      // 0: no benchmark
  int bench_context = 512;
  int bench_calls = 200;  // timed Decode calls per transport
};

// Runs the demo and returns the process exit code: 0 only if every check passed. The last
// line printed is "demo: PASS" or "demo: FAIL (reason)".
int RunDemo(client::Client& client, const DemoOptions& options);

}  // namespace attnd::attnctl

#endif  // ATTND_CLIENT_ATTNCTL_DEMO_H_
