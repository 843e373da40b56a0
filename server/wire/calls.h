// How a handler finishes a call: records its outcome and duration, logs refusals, and hands
// the status to gRPC. Shared by the unary handlers and the Stream reactor.
#ifndef ATTND_SERVER_WIRE_CALLS_H_
#define ATTND_SERVER_WIRE_CALLS_H_

#include <chrono>

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"
#include "server/metrics/metrics.h"

namespace attnd::wire {

using Clock = std::chrono::steady_clock;

// Records a unary call's outcome and duration, then finishes its reactor.
void FinishUnary(grpc::ServerUnaryReactor* reactor, Metrics* metrics, const char* rpc,
                 Clock::time_point start, const absl::Status& status);

}  // namespace attnd::wire

#endif  // ATTND_SERVER_WIRE_CALLS_H_
