// Tests of server/regions/event_registry.h: IPC events by name, resolved per request with
// messages that name the request's field, and kept open while a request holds them.
#include "server/regions/event_registry.h"

#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <string>

namespace attnd {
namespace {

// An event on a device; counts its own destruction so tests see when it is closed.
class FakeEvent final : public IpcEvent {
 public:
  FakeEvent(int device, std::atomic<int>* closed) : device_(device), closed_(closed) {}
  ~FakeEvent() override { ++*closed_; }
  int device() const override { return device_; }
  void* event() const override { return const_cast<FakeEvent*>(this); }

 private:
  int device_;
  std::atomic<int>* closed_;
};

bool Names(const absl::Status& s, absl::string_view word) {
  return s.message().find(word) != absl::string_view::npos;
}

class EventRegistryTest : public ::testing::Test {
 protected:
  std::shared_ptr<FakeEvent> Event(int device) {
    return std::make_shared<FakeEvent>(device, &closed_);
  }
  std::atomic<int> closed_{0};
  EventRegistry events_;
};

TEST_F(EventRegistryTest, ResolvesWaitAndSignalToTheirHandlesAndHoldsBoth) {
  auto wait = Event(0), signal = Event(0);
  ASSERT_TRUE(events_.Add("w", wait).ok());
  ASSERT_TRUE(events_.Add("s", signal).ok());
  auto r = events_.Resolve("w", "s", 0);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->wait, wait->event());
  EXPECT_EQ(r->signal, signal->event());
  EXPECT_EQ(r->owners.size(), 2u);
}

TEST_F(EventRegistryTest, EmptyNamesResolveToNoEvents) {
  auto r = events_.Resolve("", "", 0);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->wait, nullptr);
  EXPECT_EQ(r->signal, nullptr);
  EXPECT_TRUE(r->owners.empty());
}

TEST_F(EventRegistryTest, ANameTakenTwiceIsAlreadyExists) {
  ASSERT_TRUE(events_.Add("e", Event(0)).ok());
  const absl::Status s = events_.Add("e", Event(0));
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists) << s;
  EXPECT_TRUE(Names(s, "name")) << s;
}

TEST_F(EventRegistryTest, AnUnknownEventIsNotFoundNamingTheRequestField) {
  auto r = events_.Resolve("", "nope", 0);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
  EXPECT_TRUE(Names(r.status(), "sync.signal_event")) << r.status();
  EXPECT_TRUE(Names(r.status(), "nope")) << r.status();
}

TEST_F(EventRegistryTest, AnEventOfAnotherDeviceIsInvalidArgumentNamingBothDevices) {
  ASSERT_TRUE(events_.Add("e", Event(1)).ok());
  auto r = events_.Resolve("e", "", 0);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_TRUE(Names(r.status(), "sync.wait_event")) << r.status();
  EXPECT_TRUE(Names(r.status(), "device 1")) << r.status();
}

TEST_F(EventRegistryTest, UnregisteringAnUnknownNameIsNotFound) {
  EXPECT_EQ(events_.Remove("nope").code(), absl::StatusCode::kNotFound);
}

TEST_F(EventRegistryTest, AnUnregisteredEventStaysOpenUntilTheLastRequestLetsGo) {
  ASSERT_TRUE(events_.Add("e", Event(0)).ok());
  auto held = events_.Resolve("e", "", 0);
  ASSERT_TRUE(held.ok()) << held.status();
  ASSERT_TRUE(events_.Remove("e").ok());
  EXPECT_FALSE(events_.Contains("e"));
  EXPECT_EQ(closed_.load(), 0);
  held->owners.clear();
  EXPECT_EQ(closed_.load(), 1);
}

TEST_F(EventRegistryTest, ClearClosesEveryEventNoRequestHolds) {
  ASSERT_TRUE(events_.Add("a", Event(0)).ok());
  ASSERT_TRUE(events_.Add("b", Event(1)).ok());
  events_.Clear();
  EXPECT_EQ(closed_.load(), 2);
  EXPECT_FALSE(events_.Contains("a"));
}

}  // namespace
}  // namespace attnd
