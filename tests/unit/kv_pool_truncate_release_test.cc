// Tests of server/engine/kv_pool.h: Truncate (per-layer lengths, pages past the longest layer
// released, shared pages kept for their other owner) and Release (freed page counts).
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "server/engine/kv_pool.h"
#include "tests/unit/kv_pool_test_util.h"

namespace attnd::kv_pool_test_util {
namespace {

// ---- Truncate ----

TEST_F(KvPoolTest, TruncateKeepsMinOfEachLayerAndReleasesPagesPastTheLongestLayer) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 14);  // 4 pages
  AppendOk(pool_, 1, 1, 3);
  const std::vector<int32_t> pages = Pages(pool_, 1);
  const int64_t free_before = pool_.free_pages();
  ASSERT_TRUE(pool_.Truncate(1, 5).ok());
  EXPECT_EQ(Lengths(pool_, 1), (std::vector<int64_t>{5, 3, 0}));
  EXPECT_EQ(Pages(pool_, 1), std::vector<int32_t>(pages.begin(), pages.begin() + 2));
  EXPECT_EQ(pool_.free_pages(), free_before + 2);
}

TEST_F(KvPoolTest, TruncateToAPageBoundaryKeepsNoEmptyPage) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 2, 9);
  ASSERT_TRUE(pool_.Truncate(1, 8).ok());
  EXPECT_EQ(Pages(pool_, 1).size(), 2u);
  ASSERT_TRUE(pool_.Truncate(1, 0).ok());
  EXPECT_TRUE(Pages(pool_, 1).empty());
  EXPECT_EQ(Lengths(pool_, 1), std::vector<int64_t>(kLayers, 0));
  EXPECT_EQ(pool_.free_pages(), kPages);
  EXPECT_NE(pool_.Find(1), nullptr);  // the sequence itself lives on
}

TEST_F(KvPoolTest, TruncateToMoreThanTheLengthChangesNothing) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 6);
  AppendOk(pool_, 1, 1, 2);
  const Snapshot before = Snap(pool_);
  ASSERT_TRUE(pool_.Truncate(1, 6).ok());
  ASSERT_TRUE(pool_.Truncate(1, 1000).ok());
  EXPECT_EQ(Snap(pool_), before);
}

TEST_F(KvPoolTest, TruncateKeepsSharedPagesAliveForTheOtherOwner) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 10);
  ASSERT_TRUE(pool_.Fork(1, 2).ok());
  const std::vector<int32_t> pages = Pages(pool_, 1);
  const int64_t free_before = pool_.free_pages();
  ASSERT_TRUE(pool_.Truncate(2, 0).ok());
  EXPECT_TRUE(Pages(pool_, 2).empty());
  EXPECT_EQ(pool_.free_pages(), free_before);  // the parent still owns all three
  EXPECT_EQ(Pages(pool_, 1), pages);
  EXPECT_EQ(Lengths(pool_, 1)[0], 10);
  EXPECT_EQ(pool_.SharedPages(*pool_.Find(1)), 0);
  auto freed = pool_.Release(1);
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(*freed, 3);
}

TEST_F(KvPoolTest, TruncateThenAppendReusesTheKeptPartialPage) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 10);
  ASSERT_TRUE(pool_.Truncate(1, 6).ok());
  const std::vector<int32_t> pages = Pages(pool_, 1);
  std::vector<int64_t> starts;
  const AppendItem item{1, 2};
  ASSERT_TRUE(pool_.ReserveAppend(0, {&item, 1}, &starts).ok());
  EXPECT_EQ(starts, std::vector<int64_t>{6});
  EXPECT_EQ(Pages(pool_, 1), pages);
}

TEST_F(KvPoolTest, TruncateOfAnUnknownSequenceIsNotFound) {
  EXPECT_EQ(pool_.Truncate(5, 0).code(), absl::StatusCode::kNotFound);
}

TEST_F(KvPoolTest, TruncateToANegativeLengthIsInvalidArgumentAndChangesNothing) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 6);
  const Snapshot before = Snap(pool_);
  const absl::Status s = pool_.Truncate(1, -1);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("length"), absl::string_view::npos) << s;
  EXPECT_EQ(Snap(pool_), before);
}

// ---- Release ----

TEST_F(KvPoolTest, ReleaseReturnsTheFreedPageCountAndForgetsTheSequence) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 1, 9);
  auto freed = pool_.Release(1);
  ASSERT_TRUE(freed.ok()) << freed.status();
  EXPECT_EQ(*freed, 3);
  EXPECT_EQ(pool_.Find(1), nullptr);
  EXPECT_EQ(pool_.free_pages(), kPages);
  EXPECT_EQ(pool_.num_sequences(), 0);
  EXPECT_TRUE(pool_.Create(1).ok());  // the id can be used again
}

TEST_F(KvPoolTest, ReleaseOfAForkedSequenceFreesOnlyItsUnsharedPages) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 6);  // p0 full, p1 partial
  ASSERT_TRUE(pool_.Fork(1, 2).ok());
  AppendOk(pool_, 2, 0, 5);  // copies p1, adds p2'
  auto freed = pool_.Release(2);
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(*freed, 2);  // its copy of p1 and its new page; p0 stays with the parent
  EXPECT_EQ(pool_.SharedPages(*pool_.Find(1)), 0);
  freed = pool_.Release(1);
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(*freed, 2);
  EXPECT_EQ(pool_.free_pages(), kPages);
}

TEST_F(KvPoolTest, ReleaseOfAnUnknownSequenceIsNotFound) {
  ASSERT_TRUE(pool_.Create(1).ok());
  const Snapshot before = Snap(pool_);
  auto freed = pool_.Release(2);
  EXPECT_EQ(freed.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(freed.status().message().find("seq_id"), absl::string_view::npos) << freed.status();
  EXPECT_EQ(Snap(pool_), before);
}

}  // namespace
}  // namespace attnd::kv_pool_test_util
