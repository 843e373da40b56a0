// Where one data request's time goes inside attnd. The service, the engine, the device worker
// and the backend each stamp a steady_clock time as the request passes them; the differences
// are the stages recorded in attnd_request_stage_seconds. A stamp costs tens of nanoseconds, so
// the trace is always on: the round-trip overhead it explains is tens of microseconds.
#ifndef ATTND_SERVER_METRICS_REQUEST_TRACE_H_
#define ATTND_SERVER_METRICS_REQUEST_TRACE_H_

#include <array>
#include <chrono>

namespace attnd {

struct RequestTrace {
  using Clock = std::chrono::steady_clock;
  Clock::time_point received;   // the service holds the parsed request
  Clock::time_point posted;     // validated and resolved, queued on the device's worker
  Clock::time_point dequeued;   // the worker took it from its queue
  Clock::time_point enqueued;   // the backend's host work is done: launched (CUDA), computed (CPU)
  Clock::time_point completed;  // the worker saw the outputs written (or the signal event recorded)
  Clock::time_point handed;     // the reply was handed to gRPC (Finish / StartWrite returned)
  Clock::time_point written;    // Stream only: gRPC reported the response written (OnWriteDone)
};

// The stages, each the time between two stamps:
//   validate  received -> posted     checks, tensor resolution, on the gRPC thread
//   queue     posted -> dequeued     waiting for, and waking, the device worker
//   host      dequeued -> enqueued   pool bookkeeping, planning, uploads, launches
//   device    enqueued -> completed  the wait for the GPU (0 with a signal event, or on the CPU)
//   reply     completed -> handed    metrics and handing the reply to gRPC
//   write     handed -> written      gRPC writing a Stream response (Stream only)
//   total     received -> handed     everything attnd does, gRPC's reads and writes aside
enum class Stage { kValidate, kQueue, kHost, kDevice, kReply, kWrite, kTotal };
inline constexpr int kNumStages = 7;

const char* StageName(Stage stage);

// Seconds spent in each stage; a stage whose stamps are missing is negative (not recorded).
// A request that never reached the worker (rejected by the service or the engine up front) has
// every stage negative. A backend that never stamped `enqueued` (the request was refused on the
// worker) counts its whole worker time as host.
std::array<double, kNumStages> StageSeconds(const RequestTrace& trace);

}  // namespace attnd

#endif  // ATTND_SERVER_METRICS_REQUEST_TRACE_H_
