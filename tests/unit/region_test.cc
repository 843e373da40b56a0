// Tests of server/region.h: HostRegion over real POSIX shared-memory objects made by the test, and
// the RegionRegistry (names, removal while a request still holds a region, in-flight counts).
#include "server/regions/region.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "tests/unit/unit_test_util.h"

namespace attnd {
namespace {

using testing_util::ShmObject;

uint64_t PageSize() { return static_cast<uint64_t>(sysconf(_SC_PAGESIZE)); }

void FillPattern(uint8_t* p, size_t n, uint8_t salt) {
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>((i * 131 + salt) & 0xff);
}

bool HasMessage(const absl::Status& s, absl::string_view word) {
  return s.message().find(word) != absl::string_view::npos;
}

// How many mappings of the shared-memory object /proc/self/maps shows. The test's own
// ShmObject accounts for one.
int MappingCount(const std::string& shm_key) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  int n = 0;
  while (std::getline(maps, line)) n += line.find("/dev/shm" + shm_key) != std::string::npos;
  return n;
}

std::shared_ptr<Region> OpenShared(const std::string& name, const ShmObject& shm,
                                   uint64_t offset, uint64_t bytes) {
  auto r = HostRegion::Open(name, shm.key(), offset, bytes);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? std::shared_ptr<Region>(*std::move(r)) : nullptr;
}

// ---- HostRegion::Open ----

TEST(HostRegionTest, MapsTheObjectAndSeesTheBytesTheTestWrote) {
  ShmObject shm(3 * PageSize());
  FillPattern(shm.data(), shm.size(), 7);
  auto region = HostRegion::Open("r", shm.key(), 0, shm.size());
  ASSERT_TRUE(region.ok()) << region.status();
  ASSERT_NE((*region)->base(), nullptr);
  EXPECT_EQ((*region)->byte_size(), shm.size());
  EXPECT_EQ(std::memcmp((*region)->base(), shm.data(), shm.size()), 0);
  // Later writes by the owner are visible too: it is the same memory, not a copy.
  shm.data()[shm.size() - 1] ^= 0xff;
  EXPECT_EQ((*region)->base()[shm.size() - 1], shm.data()[shm.size() - 1]);
}

TEST(HostRegionTest, WritesThroughTheRegionAreSeenByTheObjectsOwner) {
  ShmObject shm(2 * PageSize());
  std::memset(shm.data(), 0, shm.size());
  auto region = HostRegion::Open("r", shm.key(), 0, shm.size());
  ASSERT_TRUE(region.ok()) << region.status();
  FillPattern((*region)->base(), shm.size(), 42);
  std::vector<uint8_t> want(shm.size());
  FillPattern(want.data(), want.size(), 42);
  EXPECT_EQ(std::memcmp(shm.data(), want.data(), want.size()), 0);
}

TEST(HostRegionTest, AnOffsetThatIsNotPageAlignedStartsAtThatByte) {
  ShmObject shm(4 * PageSize());
  FillPattern(shm.data(), shm.size(), 3);
  for (uint64_t offset : {uint64_t{1}, uint64_t{13}, PageSize() - 1, PageSize() + 5,
                          2 * PageSize() + 4093}) {
    SCOPED_TRACE(offset);
    const uint64_t bytes = shm.size() - offset;
    auto region = HostRegion::Open("r", shm.key(), offset, bytes);
    ASSERT_TRUE(region.ok()) << region.status();
    EXPECT_EQ((*region)->byte_size(), bytes);
    EXPECT_EQ(std::memcmp((*region)->base(), shm.data() + offset, bytes), 0);
    (*region)->base()[0] = 0xab;
    (*region)->base()[bytes - 1] = 0xcd;
    EXPECT_EQ(shm.data()[offset], 0xab);
    EXPECT_EQ(shm.data()[shm.size() - 1], 0xcd);
    FillPattern(shm.data(), shm.size(), 3);
  }
}

TEST(HostRegionTest, ASmallRangeInsideTheObjectIsAccepted) {
  ShmObject shm(2 * PageSize());
  FillPattern(shm.data(), shm.size(), 9);
  auto region = HostRegion::Open("r", shm.key(), 100, 28);
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_EQ(std::memcmp((*region)->base(), shm.data() + 100, 28), 0);
}

TEST(HostRegionTest, ReportsItsKindKeyOffsetAndSource) {
  ShmObject shm(PageSize());
  auto region = HostRegion::Open("my-region", shm.key(), 64, 128);
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_EQ((*region)->name(), "my-region");
  EXPECT_EQ((*region)->kind(), Region::Kind::kHost);
  EXPECT_EQ((*region)->device(), -1);
  EXPECT_EQ((*region)->shm_key(), shm.key());
  EXPECT_EQ((*region)->shm_offset(), 64u);
  EXPECT_EQ((*region)->source(), "shm:" + shm.key() + "+64");
}

TEST(HostRegionTest, ByteSizePastTheObjectsEndIsInvalidArgumentNamingByteSize) {
  ShmObject shm(PageSize());
  for (auto [offset, bytes] : {std::pair<uint64_t, uint64_t>{0, PageSize() + 1},
                               {1, PageSize()},
                               {PageSize(), 1},
                               {10 * PageSize(), 8}}) {
    SCOPED_TRACE(testing::Message() << "offset " << offset << " bytes " << bytes);
    auto region = HostRegion::Open("r", shm.key(), offset, bytes);
    ASSERT_FALSE(region.ok());
    EXPECT_EQ(region.status().code(), absl::StatusCode::kInvalidArgument) << region.status();
    EXPECT_TRUE(HasMessage(region.status(), "byte_size")) << region.status();
  }
}

TEST(HostRegionTest, ExactlyTheObjectsSizeIsAccepted) {
  ShmObject shm(PageSize() + 100);
  EXPECT_TRUE(HostRegion::Open("r", shm.key(), 0, shm.size()).ok());
  EXPECT_TRUE(HostRegion::Open("r", shm.key(), 100, PageSize()).ok());
}

TEST(HostRegionTest, OffsetPlusByteSizeOverflowIsInvalidArgument) {
  ShmObject shm(PageSize());
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  for (auto [offset, bytes] : {std::pair<uint64_t, uint64_t>{kMax, 1},
                               {kMax - 10, 100},
                               {16, kMax - 8},
                               {uint64_t{1} << 63, uint64_t{1} << 63}}) {
    SCOPED_TRACE(testing::Message() << "offset " << offset << " bytes " << bytes);
    auto region = HostRegion::Open("r", shm.key(), offset, bytes);
    ASSERT_FALSE(region.ok());
    EXPECT_EQ(region.status().code(), absl::StatusCode::kInvalidArgument) << region.status();
    EXPECT_TRUE(HasMessage(region.status(), "byte_size")) << region.status();
  }
}

TEST(HostRegionTest, ZeroByteSizeIsInvalidArgument) {
  ShmObject shm(PageSize());
  auto region = HostRegion::Open("r", shm.key(), 0, 0);
  EXPECT_EQ(region.status().code(), absl::StatusCode::kInvalidArgument) << region.status();
  EXPECT_TRUE(HasMessage(region.status(), "byte_size")) << region.status();
}

TEST(HostRegionTest, AMissingObjectIsNotFoundNamingTheKey) {
  const std::string key = "/attnd-unit-no-such-object-" + std::to_string(getpid());
  auto region = HostRegion::Open("r", key, 0, 16);
  EXPECT_EQ(region.status().code(), absl::StatusCode::kNotFound) << region.status();
  EXPECT_TRUE(HasMessage(region.status(), "shm_key")) << region.status();
}

TEST(HostRegionTest, AMalformedKeyIsInvalidArgument) {
  for (const std::string& key : {std::string(""), std::string("/"), std::string("no-slash"),
                                 std::string("/a/b"), std::string("//"),
                                 "/" + std::string(255, 'x')}) {
    SCOPED_TRACE("key '" + key + "'");
    auto region = HostRegion::Open("r", key, 0, 16);
    EXPECT_EQ(region.status().code(), absl::StatusCode::kInvalidArgument) << region.status();
    EXPECT_TRUE(HasMessage(region.status(), "shm_key")) << region.status();
  }
}

TEST(HostRegionTest, TheMappingIsClosedWhenTheRegionIsDestroyed) {
  ShmObject shm(PageSize());
  auto region = HostRegion::Open("r", shm.key(), 0, shm.size());
  ASSERT_TRUE(region.ok());
  EXPECT_EQ(MappingCount(shm.key()), 2);
  region->reset();
  EXPECT_EQ(MappingCount(shm.key()), 1);
}

// ---- HostRegion::Open's owner check (the caller's uid) ----

// Gives the object to `uid` (root only); false if that is not possible here.
bool GiveObjectTo(const ShmObject& shm, uid_t uid) {
  if (geteuid() != 0) return false;
  const int fd = shm_open(shm.key().c_str(), O_RDWR, 0);
  if (fd < 0) return false;
  const bool given = fchown(fd, uid, static_cast<gid_t>(-1)) == 0;
  close(fd);
  return given;
}

TEST(HostRegionOwnerTest, AnObjectOwnedByAnotherUidIsPermissionDeniedNamingKeyAndBothUids) {
  ShmObject shm(PageSize());
  // As root the test plays attnd for a caller of uid 1000 who points it at root's object; as
  // anyone else, a caller one uid away from the object's owner.
  const uid_t owner = geteuid();
  const uid_t caller = owner == 0 ? 1000 : owner + 1;
  auto region = HostRegion::Open("r", shm.key(), 0, 64, caller);
  ASSERT_FALSE(region.ok());
  EXPECT_EQ(region.status().code(), absl::StatusCode::kPermissionDenied) << region.status();
  EXPECT_TRUE(HasMessage(region.status(), shm.key())) << region.status();
  EXPECT_TRUE(HasMessage(region.status(), "uid " + std::to_string(owner))) << region.status();
  EXPECT_TRUE(HasMessage(region.status(), "uid " + std::to_string(caller))) << region.status();
}

TEST(HostRegionOwnerTest, AnObjectOwnedByTheCallerIsAccepted) {
  ShmObject shm(PageSize());
  // Root's own objects are never checked (uid 0 skips the check), so as root the object goes
  // to nobody (65534) and the caller is nobody.
  const uid_t owner = GiveObjectTo(shm, 65534) ? 65534 : geteuid();
  if (owner == 0) GTEST_SKIP() << "cannot give the object to another uid";
  auto region = HostRegion::Open("r", shm.key(), 0, 64, owner);
  EXPECT_TRUE(region.ok()) << region.status();
}

TEST(HostRegionOwnerTest, ARootCallerMayOpenAnObjectOfAnyOwner) {
  ShmObject shm(PageSize());
  const uid_t owner = GiveObjectTo(shm, 65534) ? 65534 : geteuid();
  if (owner == 0) GTEST_SKIP() << "cannot give the object to another uid";
  auto region = HostRegion::Open("r", shm.key(), 0, 64, uid_t{0});
  EXPECT_TRUE(region.ok()) << region.status();
}

TEST(HostRegionOwnerTest, WithoutACallerUidTheOwnerIsNotChecked) {
  ShmObject shm(PageSize());
  if (!GiveObjectTo(shm, 65534)) GTEST_SKIP() << "not root: cannot give the object away";
  auto region = HostRegion::Open("r", shm.key(), 0, 64);
  EXPECT_TRUE(region.ok()) << region.status();
}

// The key names an entry of /dev/shm directly, but that entry could be a symlink a client
// planted to make attnd open something else: shm_open does not follow it.
TEST(HostRegionOwnerTest, AKeyThatIsASymlinkIsNotFollowed) {
  ShmObject target(PageSize());
  const std::string link = "/attnd-unit-link-" + std::to_string(getpid());
  ASSERT_EQ(symlink(("/dev/shm" + target.key()).c_str(), ("/dev/shm" + link).c_str()), 0)
      << std::strerror(errno);
  auto region = HostRegion::Open("r", link, 0, 64);
  unlink(("/dev/shm" + link).c_str());
  ASSERT_FALSE(region.ok());
  EXPECT_EQ(region.status().code(), absl::StatusCode::kFailedPrecondition) << region.status();
  EXPECT_TRUE(HasMessage(region.status(), "shm_key")) << region.status();
}

// ---- ValidateRegionName ----

TEST(RegionNameTest, OneTo128PrintableBytesAreValid) {
  EXPECT_TRUE(ValidateRegionName("a").ok());
  EXPECT_TRUE(ValidateRegionName(std::string(128, 'n')).ok());
  EXPECT_TRUE(ValidateRegionName("q.out-0_[x]/y").ok());
}

TEST(RegionNameTest, EmptyTooLongOrUnprintableNamesAreInvalidArgument) {
  for (const std::string& name : {std::string(""), std::string(129, 'n'), std::string("a b"),
                                  std::string("tab\t"), std::string("nl\n"),
                                  std::string("nul\0x", 5), std::string("\x7f"),
                                  std::string("\xc3\xa9")}) {
    const absl::Status s = ValidateRegionName(name);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << "'" << name << "'";
    EXPECT_TRUE(HasMessage(s, "name")) << s;
  }
}

// ---- RegionRegistry ----

TEST(RegionRegistryTest, AddThenFindReturnsTheSameRegion) {
  ShmObject shm(PageSize());
  RegionRegistry registry;
  auto region = OpenShared("a", shm, 0, 64);
  ASSERT_TRUE(registry.Add(region).ok());
  EXPECT_EQ(registry.Find("a"), region);
  EXPECT_EQ(registry.Find("b"), nullptr);
  EXPECT_EQ(registry.size(), 1u);
}

TEST(RegionRegistryTest, AddingATakenNameIsAlreadyExistsAndKeepsTheFirst) {
  ShmObject shm(PageSize());
  RegionRegistry registry;
  auto first = OpenShared("a", shm, 0, 64);
  auto second = OpenShared("a", shm, 64, 64);
  ASSERT_TRUE(registry.Add(first).ok());
  const absl::Status s = registry.Add(second);
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists) << s;
  EXPECT_TRUE(HasMessage(s, "name")) << s;
  EXPECT_EQ(registry.Find("a"), first);
  EXPECT_EQ(registry.size(), 1u);
}

TEST(RegionRegistryTest, RemoveOfAnUnknownNameIsNotFound) {
  RegionRegistry registry;
  const absl::Status s = registry.Remove("nope");
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_TRUE(HasMessage(s, "name")) << s;
}

TEST(RegionRegistryTest, RemoveForgetsTheNameWhichCanThenBeReused) {
  ShmObject shm(PageSize());
  RegionRegistry registry;
  ASSERT_TRUE(registry.Add(OpenShared("a", shm, 0, 64)).ok());
  ASSERT_TRUE(registry.Remove("a").ok());
  EXPECT_EQ(registry.Find("a"), nullptr);
  EXPECT_EQ(registry.size(), 0u);
  EXPECT_EQ(registry.Remove("a").code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(registry.Add(OpenShared("a", shm, 0, 64)).ok());
}

TEST(RegionRegistryTest, RemoveWithoutHoldersUnmapsAtOnce) {
  ShmObject shm(PageSize());
  RegionRegistry registry;
  ASSERT_TRUE(registry.Add(OpenShared("a", shm, 0, shm.size())).ok());
  ASSERT_TRUE(registry.Remove("a").ok());
  EXPECT_EQ(MappingCount(shm.key()), 1);  // only the test's own mapping is left
}

TEST(RegionRegistryTest, ARegionHeldByARequestOutlivesRemoveAndStaysReadableAndWritable) {
  ShmObject shm(2 * PageSize());
  FillPattern(shm.data(), shm.size(), 1);
  RegionRegistry registry;
  ASSERT_TRUE(registry.Add(OpenShared("a", shm, 100, 1000)).ok());
  std::shared_ptr<Region> in_flight = registry.Find("a");  // what a request holds
  ASSERT_NE(in_flight, nullptr);
  ASSERT_TRUE(registry.Remove("a").ok());
  EXPECT_EQ(registry.Find("a"), nullptr);
  // The request still reads and writes the client's memory through its reference.
  EXPECT_EQ(std::memcmp(in_flight->base(), shm.data() + 100, 1000), 0);
  in_flight->base()[999] = 0x5a;
  EXPECT_EQ(shm.data()[1099], 0x5a);
  EXPECT_EQ(in_flight->name(), "a");
  EXPECT_EQ(MappingCount(shm.key()), 2);
  in_flight.reset();  // the request ends: the mapping goes
  EXPECT_EQ(MappingCount(shm.key()), 1);
}

TEST(RegionRegistryTest, ListReportsEachRegionAndHowManyRequestsHoldIt) {
  ShmObject shm(PageSize());
  RegionRegistry registry;
  ASSERT_TRUE(registry.Add(OpenShared("a", shm, 8, 64)).ok());
  ASSERT_TRUE(registry.Add(OpenShared("b", shm, 0, 32)).ok());
  std::shared_ptr<Region> h1 = registry.Find("a");
  std::shared_ptr<Region> h2 = registry.Find("a");
  std::vector<RegionSummary> list = registry.List();
  ASSERT_EQ(list.size(), 2u);
  for (const RegionSummary& s : list) {
    EXPECT_EQ(s.kind, Region::Kind::kHost);
    EXPECT_EQ(s.device, -1);
    EXPECT_EQ(s.shm_key, shm.key());
    if (s.name == "a") {
      EXPECT_EQ(s.byte_size, 64u);
      EXPECT_EQ(s.shm_offset, 8u);
      EXPECT_EQ(s.in_flight, 2);
    } else {
      EXPECT_EQ(s.name, "b");
      EXPECT_EQ(s.byte_size, 32u);
      EXPECT_EQ(s.shm_offset, 0u);
      EXPECT_EQ(s.in_flight, 0);
    }
  }
  h1.reset();
  h2.reset();
  for (const RegionSummary& s : registry.List()) EXPECT_EQ(s.in_flight, 0) << s.name;
}

TEST(RegionRegistryTest, ConcurrentAddFindRemoveKeepTheRegistryConsistent) {
  ShmObject shm(PageSize());
  RegionRegistry registry;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        const std::string name = "t" + std::to_string(t) + "-" + std::to_string(i % 8);
        auto region = HostRegion::Open(name, shm.key(), 0, 64);
        ASSERT_TRUE(region.ok());
        const bool had = registry.Find(name) != nullptr;
        const absl::Status added = registry.Add(std::shared_ptr<Region>(*std::move(region)));
        EXPECT_EQ(added.ok(), !had);  // each thread owns its names
        if (i % 3 == 0) {
          EXPECT_TRUE(registry.Remove(name).ok());
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  size_t listed = registry.List().size();
  EXPECT_EQ(listed, registry.size());
}

}  // namespace
}  // namespace attnd
