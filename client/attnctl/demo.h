// `attnctl demo`: drives a real prefill + decode workload through a running attnd and checks
// every output against a dense fp64 reference computed in the client, then measures Decode
// latency over the unary RPC and over the Stream (client/workload/ does the work).
#ifndef ATTND_CLIENT_ATTNCTL_DEMO_H_
#define ATTND_CLIENT_ATTNCTL_DEMO_H_

#include "client/client.h"
#include "client/workload/options.h"

namespace attnd::attnctl {

// Runs the demo and returns the process exit code: 0 only if every check passed, 1 if one
// failed or the run stopped early, 2 for options no workload can run. The first line printed
// is "demo: seed N (rerun with --seed=N)", the last "demo: PASS" or "demo: FAIL (reason)".
int RunDemo(client::Client& client, const workload::WorkloadOptions& options);

}  // namespace attnd::attnctl

#endif  // ATTND_CLIENT_ATTNCTL_DEMO_H_
