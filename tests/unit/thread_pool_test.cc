#include "server/cpu/thread_pool.h"

#include <atomic>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace attnd {
namespace {

TEST(ThreadPoolTest, ParallelForRunsEveryIndexExactlyOnce) {
  ThreadPool pool(3);
  for (int64_t n : {0, 1, 2, 7, 1000}) {
    std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
    pool.ParallelFor(n, [&](int64_t i) { hits[static_cast<size_t>(i)]++; });
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(hits[static_cast<size_t>(i)].load(), 1) << i;
  }
}

TEST(ThreadPoolTest, ParallelForReturnsOnlyAfterEveryIndexFinished) {
  ThreadPool pool(2);
  std::atomic<int> finished{0};
  pool.ParallelFor(16, [&](int64_t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    finished++;
  });
  EXPECT_EQ(finished.load(), 16);
}

TEST(ThreadPoolTest, SpreadsWorkOverSeveralThreads) {
  ThreadPool pool(2);
  std::mutex mu;
  std::set<std::thread::id> ids;
  pool.ParallelFor(64, [&](int64_t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(std::this_thread::get_id());
  });
  EXPECT_GE(ids.size(), 2u);
}

TEST(ThreadPoolTest, CallersFromSeveralThreadsTakeTurns) {
  ThreadPool pool(2);
  std::atomic<int64_t> sum{0};
  std::vector<std::thread> callers;
  for (int c = 0; c < 4; ++c)
    callers.emplace_back([&] { pool.ParallelFor(100, [&](int64_t i) { sum += i; }); });
  for (auto& t : callers) t.join();
  EXPECT_EQ(sum.load(), 4 * 4950);
}

TEST(ThreadPoolTest, APoolOfNoThreadsRunsOnTheCaller) {
  ThreadPool pool(0);
  std::vector<std::thread::id> ids;
  pool.ParallelFor(5, [&](int64_t) { ids.push_back(std::this_thread::get_id()); });
  ASSERT_EQ(ids.size(), 5u);
  for (auto id : ids) EXPECT_EQ(id, std::this_thread::get_id());
}

}  // namespace
}  // namespace attnd
