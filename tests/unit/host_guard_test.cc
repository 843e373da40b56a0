// Tests of server/regions/host_guard.h: a client that shrinks its shm object under attnd turns
// the region into zeros and marks it damaged instead of killing the process; a SIGBUS anywhere
// else keeps the fate it had before the guard.
#include "server/regions/host_guard.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <latch>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "server/regions/region.h"
#include "tests/unit/unit_test_util.h"

namespace attnd {
namespace {

using testing_util::ShmObject;

size_t PageSize() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

void FillPattern(uint8_t* p, size_t n, uint8_t salt) {
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>((i * 131 + salt) | 1);
}

// Reads every byte; true if all were zero. Volatile, so each read really touches the memory.
bool AllZero(const uint8_t* p, size_t n) {
  const volatile uint8_t* v = p;
  uint8_t any = 0;
  for (size_t i = 0; i < n; ++i) any |= v[i];
  return any == 0;
}

// What the client does to attnd: shrink the object behind the region.
void ShrinkObject(const std::string& key, size_t bytes) {
  const int fd = shm_open(key.c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0) << key << ": " << std::strerror(errno);
  EXPECT_EQ(ftruncate(fd, static_cast<off_t>(bytes)), 0) << std::strerror(errno);
  close(fd);
}

std::unique_ptr<HostRegion> OpenWhole(const ShmObject& shm) {
  auto region = HostRegion::Open("r", shm.key(), 0, shm.size());
  EXPECT_TRUE(region.ok()) << region.status();
  return region.ok() ? *std::move(region) : nullptr;
}

// A mapping of a nameless memory file cut to nothing, which the guard does not know: touching
// it raises SIGBUS. Nameless, so a death-test child that dies of it leaves nothing behind.
uint8_t* UnguardedShrunkMapping(size_t bytes, void* at = nullptr) {
  const int fd = memfd_create("attnd-unguarded", 0);
  if (fd < 0 || ftruncate(fd, static_cast<off_t>(bytes)) != 0) return nullptr;
  void* map = mmap(at, bytes, PROT_READ | PROT_WRITE,
                   MAP_SHARED | (at != nullptr ? MAP_FIXED_NOREPLACE : 0), fd, 0);
  const bool cut = ftruncate(fd, 0) == 0;
  close(fd);
  return map == MAP_FAILED || !cut ? nullptr : static_cast<uint8_t*>(map);
}

// ---- an object cut under a region ----

TEST(HostGuardTest, ARegionWhoseObjectIsCutToZeroReadsZerosOverItsWholeRange) {
  ShmObject shm(4 * PageSize());
  FillPattern(shm.data(), shm.size(), 5);
  auto region = OpenWhole(shm);
  ASSERT_NE(region, nullptr);
  ShrinkObject(shm.key(), 0);
  EXPECT_TRUE(AllZero(region->base(), region->byte_size()));
  EXPECT_TRUE(region->damaged());
}

TEST(HostGuardTest, ARegionWhoseObjectIsCutToZeroCanBeWrittenOverItsWholeRange) {
  ShmObject shm(4 * PageSize());
  auto region = OpenWhole(shm);
  ASSERT_NE(region, nullptr);
  ShrinkObject(shm.key(), 0);
  FillPattern(region->base(), region->byte_size(), 9);  // the first access is a write
  std::vector<uint8_t> want(region->byte_size());
  FillPattern(want.data(), want.size(), 9);
  EXPECT_EQ(std::memcmp(region->base(), want.data(), want.size()), 0);
  EXPECT_TRUE(region->damaged());
}

TEST(HostGuardTest, BeforeAnyAccessToTheCutPartTheKeptPartStillShowsTheClientsBytes) {
  ShmObject shm(4 * PageSize());
  FillPattern(shm.data(), shm.size(), 3);
  auto region = OpenWhole(shm);
  ASSERT_NE(region, nullptr);
  ShrinkObject(shm.key(), 2 * PageSize());
  EXPECT_EQ(std::memcmp(region->base(), shm.data(), 2 * PageSize()), 0);
  EXPECT_FALSE(region->damaged());
}

TEST(HostGuardTest, OnceTheCutPartIsTouchedTheWholeRegionReadsZerosKeptPartIncluded) {
  ShmObject shm(4 * PageSize());
  FillPattern(shm.data(), shm.size(), 3);
  auto region = OpenWhole(shm);
  ASSERT_NE(region, nullptr);
  ShrinkObject(shm.key(), 2 * PageSize());
  EXPECT_TRUE(AllZero(region->base() + 3 * PageSize(), PageSize()));
  EXPECT_TRUE(region->damaged());
  // Never a mix of the client's bytes and zeros: the kept half reads zeros too.
  EXPECT_TRUE(AllZero(region->base(), 2 * PageSize()));
}

TEST(HostGuardTest, WritesAfterTheDamageNeverReachTheClientsObject) {
  ShmObject shm(4 * PageSize());
  FillPattern(shm.data(), shm.size(), 3);
  auto region = OpenWhole(shm);
  ASSERT_NE(region, nullptr);
  ShrinkObject(shm.key(), 2 * PageSize());
  region->base()[3 * PageSize()] = 1;  // faults: the region is damaged from here on
  ASSERT_TRUE(region->damaged());
  std::memset(region->base(), 0xee, 2 * PageSize());
  std::vector<uint8_t> client(2 * PageSize());
  FillPattern(client.data(), client.size(), 3);
  EXPECT_EQ(std::memcmp(shm.data(), client.data(), client.size()), 0);
}

TEST(HostGuardTest, ARegionAtAnOffsetThatIsNotPageAlignedIsGuardedToo) {
  ShmObject shm(4 * PageSize());
  auto region = HostRegion::Open("r", shm.key(), PageSize() + 100, 2 * PageSize());
  ASSERT_TRUE(region.ok()) << region.status();
  ShrinkObject(shm.key(), 0);
  EXPECT_TRUE(AllZero((*region)->base(), (*region)->byte_size()));
  EXPECT_TRUE((*region)->damaged());
}

TEST(HostGuardTest, FaultsOnFourThreadsAtOnceAreAllSurvived) {
  constexpr int kThreads = 4;
  // Several rounds, each a fresh region, so the threads' faults really overlap in some.
  for (int round = 0; round < 20; ++round) {
    SCOPED_TRACE(round);
    ShmObject shm(kThreads * 16 * PageSize());
    FillPattern(shm.data(), shm.size(), 1);
    auto region = OpenWhole(shm);
    ASSERT_NE(region, nullptr);
    ShrinkObject(shm.key(), 0);
    std::latch start(kThreads);
    std::vector<int> zeros(kThreads, 0);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        const size_t quarter = region->byte_size() / kThreads;
        start.arrive_and_wait();
        zeros[t] = AllZero(region->base() + t * quarter, quarter);
      });
    }
    for (std::thread& t : threads) t.join();
    for (int t = 0; t < kThreads; ++t) EXPECT_TRUE(zeros[t]) << "thread " << t;
    EXPECT_TRUE(region->damaged());
  }
}

// ---- what is not damaged ----

TEST(HostGuardTest, ARegionReadAndWrittenWhileItsObjectIsWholeStaysUndamaged) {
  ShmObject shm(2 * PageSize());
  auto region = OpenWhole(shm);
  ASSERT_NE(region, nullptr);
  FillPattern(region->base(), region->byte_size(), 4);
  EXPECT_EQ(std::memcmp(region->base(), shm.data(), shm.size()), 0);
  EXPECT_FALSE(region->damaged());
}

TEST(HostGuardTest, AShrunkObjectsRegionThatIsNotTouchedStaysUndamaged) {
  ShmObject shm(2 * PageSize());
  auto region = OpenWhole(shm);
  ASSERT_NE(region, nullptr);
  ShrinkObject(shm.key(), 0);
  EXPECT_FALSE(region->damaged());
}

TEST(HostGuardTest, DamageToOneRegionLeavesARegionOfAnotherObjectAsItWas) {
  ShmObject cut(2 * PageSize());
  ShmObject kept(2 * PageSize());
  FillPattern(kept.data(), kept.size(), 8);
  auto damaged = OpenWhole(cut);
  auto intact = OpenWhole(kept);
  ASSERT_NE(damaged, nullptr);
  ASSERT_NE(intact, nullptr);
  ShrinkObject(cut.key(), 0);
  EXPECT_TRUE(AllZero(damaged->base(), damaged->byte_size()));
  ASSERT_TRUE(damaged->damaged());
  EXPECT_EQ(std::memcmp(intact->base(), kept.data(), kept.size()), 0);
  EXPECT_FALSE(intact->damaged());
}

// ---- SIGBUS elsewhere ----

TEST(HostGuardDeathTest, ASigbusOutsideEveryGuardedMappingStillKillsTheProcess) {
  // Installing twice must not make the guard its own previous handler (which would recurse
  // instead of dying).
  ASSERT_TRUE(InstallHostGuard().ok());
  ASSERT_TRUE(InstallHostGuard().ok());
  uint8_t* unguarded = UnguardedShrunkMapping(PageSize());
  ASSERT_NE(unguarded, nullptr);
  EXPECT_EXIT(AllZero(unguarded, 1), ::testing::KilledBySignal(SIGBUS), "");
  munmap(unguarded, PageSize());
}

void ExitWith42(int, siginfo_t*, void*) { _exit(42); }

TEST(HostGuardDeathTest, ASigbusOutsideEveryGuardedMappingGoesToTheHandlerInstalledBefore) {
  // A fresh process (re-executed, not forked), so that the guard is installed after the
  // test's own handler, as attnd installs it after absl's.
  const std::string style = GTEST_FLAG_GET(death_test_style);
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        struct sigaction before;
        std::memset(&before, 0, sizeof(before));
        before.sa_sigaction = ExitWith42;
        before.sa_flags = SA_SIGINFO;
        sigemptyset(&before.sa_mask);
        sigaction(SIGBUS, &before, nullptr);
        if (!InstallHostGuard().ok()) _exit(3);
        uint8_t* unguarded = UnguardedShrunkMapping(PageSize());
        if (unguarded == nullptr) _exit(4);
        AllZero(unguarded, 1);
      },
      ::testing::ExitedWithCode(42), "");
  GTEST_FLAG_SET(death_test_style, style);
}

TEST(HostGuardDeathTest, ADestroyedRegionNoLongerGuardsItsAddresses) {
  ASSERT_TRUE(InstallHostGuard().ok());
  ShmObject shm(PageSize());
  EXPECT_EXIT(
      {
        auto region = HostRegion::Open("r", shm.key(), 0, shm.size());
        if (!region.ok()) _exit(3);
        void* at = (*region)->mapping();
        region->reset();
        // The same addresses, now an unguarded mapping that faults: the process must die.
        uint8_t* reused = UnguardedShrunkMapping(PageSize(), at);
        if (reused != at) _exit(4);
        AllZero(reused, 1);
      },
      ::testing::KilledBySignal(SIGBUS), "");
}

// ---- the table ----

TEST(HostGuardTest, RegisteringAnEmptyOrNullRangeIsInvalidArgument) {
  uint8_t byte = 0;
  EXPECT_EQ(GuardedMapping::Register(nullptr, 16).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GuardedMapping::Register(&byte, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(HostGuardTest, PastTheTablesCapacityRegisterIsResourceExhaustedUntilASlotIsFreed) {
  // Ranges of a buffer that is never faulted: the table only records them.
  std::vector<uint8_t> memory(kGuardedMappingCapacity + 1);
  std::vector<GuardedMapping> held;
  held.reserve(kGuardedMappingCapacity);
  for (size_t i = 0; i < kGuardedMappingCapacity; ++i) {
    auto guard = GuardedMapping::Register(&memory[i], 1);
    ASSERT_TRUE(guard.ok()) << "mapping " << i << ": " << guard.status();
    held.push_back(*std::move(guard));
  }
  auto refused = GuardedMapping::Register(&memory.back(), 1);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  held[12345].Unregister();
  EXPECT_TRUE(GuardedMapping::Register(&memory.back(), 1).ok());
}

}  // namespace
}  // namespace attnd
