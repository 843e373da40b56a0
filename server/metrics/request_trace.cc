#include "server/metrics/request_trace.h"

namespace attnd {

const char* StageName(Stage stage) {
  switch (stage) {
    case Stage::kValidate: return "validate";
    case Stage::kQueue: return "queue";
    case Stage::kHost: return "host";
    case Stage::kDevice: return "device";
    case Stage::kReply: return "reply";
    case Stage::kWrite: return "write";
    case Stage::kTotal: return "total";
  }
  return "unknown";
}

std::array<double, kNumStages> StageSeconds(const RequestTrace& t) {
  using TimePoint = RequestTrace::Clock::time_point;
  std::array<double, kNumStages> out;
  out.fill(-1.0);
  if (t.completed == TimePoint{}) return out;  // never reached the worker
  auto seconds = [](TimePoint a, TimePoint b) {
    return a == TimePoint{} || b == TimePoint{} ? -1.0
                                                : std::chrono::duration<double>(b - a).count();
  };
  const TimePoint enqueued = t.enqueued == TimePoint{} ? t.completed : t.enqueued;
  out[static_cast<int>(Stage::kValidate)] = seconds(t.received, t.posted);
  out[static_cast<int>(Stage::kQueue)] = seconds(t.posted, t.dequeued);
  out[static_cast<int>(Stage::kHost)] = seconds(t.dequeued, enqueued);
  out[static_cast<int>(Stage::kDevice)] = seconds(enqueued, t.completed);
  out[static_cast<int>(Stage::kReply)] = seconds(t.completed, t.handed);
  out[static_cast<int>(Stage::kWrite)] = seconds(t.handed, t.written);
  out[static_cast<int>(Stage::kTotal)] = seconds(t.received, t.handed);
  return out;
}

}  // namespace attnd
