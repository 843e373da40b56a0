// Tests of server/request_trace.h: each stage is the time between its two stamps, and what a
// request never reached is not reported.
#include "server/metrics/request_trace.h"

#include <gtest/gtest.h>

#include <string>

namespace attnd {
namespace {

using Clock = RequestTrace::Clock;
using std::chrono::microseconds;

double Us(int64_t us) { return static_cast<double>(us) * 1e-6; }
double At(const std::array<double, kNumStages>& s, Stage stage) {
  return s[static_cast<int>(stage)];
}

RequestTrace Stamped() {
  const Clock::time_point t0 = Clock::now();
  RequestTrace t;
  t.received = t0;
  t.posted = t0 + microseconds(2);
  t.dequeued = t0 + microseconds(12);
  t.enqueued = t0 + microseconds(30);
  t.completed = t0 + microseconds(280);
  t.handed = t0 + microseconds(295);
  t.written = t0 + microseconds(300);
  return t;
}

TEST(RequestTraceTest, EachStageIsTheTimeBetweenItsStamps) {
  const auto s = StageSeconds(Stamped());
  EXPECT_NEAR(At(s, Stage::kValidate), Us(2), 1e-9);
  EXPECT_NEAR(At(s, Stage::kQueue), Us(10), 1e-9);
  EXPECT_NEAR(At(s, Stage::kHost), Us(18), 1e-9);
  EXPECT_NEAR(At(s, Stage::kDevice), Us(250), 1e-9);
  EXPECT_NEAR(At(s, Stage::kReply), Us(15), 1e-9);
  EXPECT_NEAR(At(s, Stage::kWrite), Us(5), 1e-9);
  EXPECT_NEAR(At(s, Stage::kTotal), Us(295), 1e-9);
}

TEST(RequestTraceTest, AUnaryCallHasNoWriteStage) {
  RequestTrace t = Stamped();
  t.written = {};
  const auto s = StageSeconds(t);
  EXPECT_LT(At(s, Stage::kWrite), 0);
  EXPECT_NEAR(At(s, Stage::kTotal), Us(295), 1e-9);
}

TEST(RequestTraceTest, WithoutAnEnqueueStampTheWorkersWholeTimeIsHost) {
  RequestTrace t = Stamped();  // e.g. refused by the pool on the worker: no backend call
  t.enqueued = {};
  const auto s = StageSeconds(t);
  EXPECT_NEAR(At(s, Stage::kHost), Us(268), 1e-9);
  EXPECT_NEAR(At(s, Stage::kDevice), 0, 1e-12);
}

TEST(RequestTraceTest, ARequestThatNeverReachedTheWorkerHasNoStages) {
  RequestTrace t;
  t.received = Clock::now();
  t.handed = t.received + microseconds(5);
  for (double v : StageSeconds(t)) EXPECT_LT(v, 0);
}

TEST(RequestTraceTest, StagesHaveDistinctNames) {
  for (int i = 0; i < kNumStages; ++i) {
    for (int j = i + 1; j < kNumStages; ++j)
      EXPECT_NE(std::string(StageName(static_cast<Stage>(i))),
                std::string(StageName(static_cast<Stage>(j))));
  }
  EXPECT_EQ(std::string(StageName(Stage::kQueue)), "queue");
}

}  // namespace
}  // namespace attnd
