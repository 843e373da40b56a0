// Tests of server/wire/stream_registry.h: how a drain ends the open Streams, with fake streams
// that record what the registry asked of them.
#include "server/wire/stream_registry.h"

#include <gtest/gtest.h>

namespace attnd::wire {
namespace {

class FakeStream final : public StreamRegistry::Closable {
 public:
  explicit FakeStream(bool idle) : idle_(idle) {}

  bool BeginClose() override {
    ++begin_close_calls;
    return idle_;
  }
  void FinishClosed() override { ++finish_calls; }

  int begin_close_calls = 0;
  int finish_calls = 0;

 private:
  const bool idle_;
};

TEST(StreamRegistry, CloseAllFinishesAnIdleStreamAtOnce) {
  StreamRegistry registry;
  FakeStream idle(/*idle=*/true);
  ASSERT_TRUE(registry.Add(&idle));
  registry.CloseAll();
  EXPECT_EQ(idle.begin_close_calls, 1);
  EXPECT_EQ(idle.finish_calls, 1);
}

TEST(StreamRegistry, CloseAllLeavesABusyStreamToFinishItself) {
  StreamRegistry registry;
  FakeStream busy(/*idle=*/false);
  ASSERT_TRUE(registry.Add(&busy));
  registry.CloseAll();
  EXPECT_EQ(busy.begin_close_calls, 1);
  EXPECT_EQ(busy.finish_calls, 0);
}

TEST(StreamRegistry, ARemovedStreamIsNotClosed) {
  StreamRegistry registry;
  FakeStream ended(/*idle=*/true);
  ASSERT_TRUE(registry.Add(&ended));
  registry.Remove(&ended);
  registry.CloseAll();
  EXPECT_EQ(ended.begin_close_calls, 0);
  EXPECT_EQ(registry.size(), 0u);
}

TEST(StreamRegistry, AStreamOpenedAfterCloseAllIsRefused) {
  StreamRegistry registry;
  registry.CloseAll();
  FakeStream late(/*idle=*/true);
  EXPECT_FALSE(registry.Add(&late));
  EXPECT_EQ(registry.size(), 0u);
}

}  // namespace
}  // namespace attnd::wire
