// Tests of server/device_worker.h: one thread per device that runs posted tasks in order, and
// drains its queue before it stops.
#include "server/engine/device_worker.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"

namespace attnd {
namespace {

TEST(DeviceWorkerTest, TasksRunInTheOrderTheyWerePosted) {
  std::vector<int> ran;  // touched only by the worker thread until it is joined
  {
    DeviceWorker worker;
    for (int i = 0; i < 2000; ++i) worker.Post([&ran, i] { ran.push_back(i); });
  }
  ASSERT_EQ(ran.size(), 2000u);
  for (int i = 0; i < 2000; ++i) ASSERT_EQ(ran[i], i);
}

TEST(DeviceWorkerTest, TasksPostedFromManyThreadsKeepEachPostersOrder) {
  constexpr int kPosters = 4, kEach = 500;
  std::vector<std::pair<int, int>> ran;
  {
    DeviceWorker worker;
    std::vector<std::thread> posters;
    for (int p = 0; p < kPosters; ++p) {
      posters.emplace_back([&, p] {
        for (int i = 0; i < kEach; ++i) worker.Post([&ran, p, i] { ran.emplace_back(p, i); });
      });
    }
    for (std::thread& t : posters) t.join();
  }
  ASSERT_EQ(ran.size(), static_cast<size_t>(kPosters * kEach));
  std::vector<int> next(kPosters, 0);
  for (auto [p, i] : ran) ASSERT_EQ(i, next[p]++) << "poster " << p;
}

TEST(DeviceWorkerTest, EveryTaskRunsOnOneThreadThatIsNotThePosters) {
  std::set<std::thread::id> threads;
  {
    DeviceWorker worker;
    for (int i = 0; i < 100; ++i)
      worker.Post([&threads] { threads.insert(std::this_thread::get_id()); });
  }
  ASSERT_EQ(threads.size(), 1u);
  EXPECT_NE(*threads.begin(), std::this_thread::get_id());
}

TEST(DeviceWorkerTest, BindRunsOnceOnTheWorkerThreadBeforeAnyTask) {
  std::vector<std::pair<char, std::thread::id>> events;
  {
    DeviceWorker worker([&events] { events.emplace_back('b', std::this_thread::get_id()); });
    for (int i = 0; i < 3; ++i)
      worker.Post([&events] { events.emplace_back('t', std::this_thread::get_id()); });
  }
  ASSERT_EQ(events.size(), 4u);
  EXPECT_EQ(events[0].first, 'b');
  for (size_t i = 1; i < events.size(); ++i) {
    EXPECT_EQ(events[i].first, 't');
    EXPECT_EQ(events[i].second, events[0].second);
  }
  EXPECT_NE(events[0].second, std::this_thread::get_id());
}

TEST(DeviceWorkerTest, QueuedCountsTasksThatHaveNotStarted) {
  absl::Notification started, release;
  DeviceWorker worker;
  worker.Post([&] {
    started.Notify();
    release.WaitForNotification();
  });
  started.WaitForNotification();
  EXPECT_EQ(worker.queued(), 0u);  // the running task is no longer queued
  for (int i = 0; i < 5; ++i) worker.Post([] {});
  EXPECT_EQ(worker.queued(), 5u);
  release.Notify();
}

TEST(DeviceWorkerTest, TheDestructorRunsEveryQueuedTaskBeforeJoining) {
  absl::Notification started, release;
  std::atomic<int> ran{0};
  auto worker = std::make_unique<DeviceWorker>();
  worker->Post([&] {
    started.Notify();
    release.WaitForNotification();
  });
  started.WaitForNotification();
  constexpr int kQueued = 50;
  for (int i = 0; i < kQueued; ++i) worker->Post([&ran] { ++ran; });
  ASSERT_EQ(worker->queued(), static_cast<size_t>(kQueued));
  // Destroy while the first task still blocks, so the destructor finds the queue full; let the
  // blocked task go only after the destructor has begun.
  std::atomic<bool> destroyed{false};
  std::thread destroyer([&] {
    worker.reset();
    destroyed = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(destroyed.load());  // it waits for the running task
  release.Notify();
  destroyer.join();
  EXPECT_EQ(ran.load(), kQueued);
}

TEST(DeviceWorkerTest, ATaskMayPostAnotherWhichRunsAfterIt) {
  std::vector<int> ran;
  absl::Notification posted;
  {
    DeviceWorker worker;
    DeviceWorker* w = &worker;
    worker.Post([&posted] { posted.WaitForNotification(); });  // hold until both are queued
    worker.Post([&ran, w] {
      ran.push_back(1);
      w->Post([&ran] { ran.push_back(3); });
    });
    worker.Post([&ran] { ran.push_back(2); });
    posted.Notify();
  }
  EXPECT_EQ(ran, (std::vector<int>{1, 2, 3}));
}

TEST(DeviceWorkerTest, AnIdleWorkerStopsPromptly) {
  const auto start = std::chrono::steady_clock::now();
  { DeviceWorker worker; }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
}

// A spinning worker polls its queue for a while after each task instead of sleeping.

TEST(DeviceWorkerTest, ASpinningWorkerRunsTasksInOrderWhetherItSpinsOrSleeps) {
  std::vector<int> ran;
  {
    DeviceWorker worker(nullptr, std::chrono::microseconds(2000));
    for (int i = 0; i < 200; ++i) {
      worker.Post([&ran, i] { ran.push_back(i); });
      // Some tasks land while the worker spins, some after it went to sleep.
      if (i % 50 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  ASSERT_EQ(ran.size(), 200u);
  for (int i = 0; i < 200; ++i) ASSERT_EQ(ran[i], i);
}

TEST(DeviceWorkerTest, ATaskPostedDuringTheSpinRunsWithoutWaitingForItToEnd) {
  DeviceWorker worker(nullptr, std::chrono::seconds(10));
  absl::Notification first, second;
  worker.Post([&first] { first.Notify(); });
  first.WaitForNotification();  // the worker now spins, for up to 10 s
  const auto posted = std::chrono::steady_clock::now();
  worker.Post([&second] { second.Notify(); });
  EXPECT_TRUE(second.WaitForNotificationWithTimeout(absl::Seconds(5)));
  EXPECT_LT(std::chrono::steady_clock::now() - posted, std::chrono::seconds(5));
}

TEST(DeviceWorkerTest, ASpinningWorkerStopsPromptly) {
  auto worker = std::make_unique<DeviceWorker>(nullptr, std::chrono::seconds(10));
  absl::Notification ran;
  worker->Post([&ran] { ran.Notify(); });
  ran.WaitForNotification();  // spinning now
  const auto start = std::chrono::steady_clock::now();
  worker.reset();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
}

TEST(DeviceWorkerTest, MoveOnlyTasksAreAccepted) {
  auto value = std::make_unique<int>(41);
  int seen = 0;
  {
    DeviceWorker worker;
    worker.Post([v = std::move(value), &seen]() mutable { seen = ++*v; });
  }
  EXPECT_EQ(seen, 42);
}

}  // namespace
}  // namespace attnd
