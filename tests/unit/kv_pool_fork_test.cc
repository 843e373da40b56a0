// Tests of server/engine/kv_pool.h: Fork, which shares every page of the parent, and the
// copy-on-write of a shared page on its first write (including several owners writing it in one
// batch).
#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <vector>

#include "absl/status/status.h"
#include "server/engine/kv_pool.h"
#include "tests/unit/kv_pool_test_util.h"

namespace attnd::kv_pool_test_util {
namespace {

// ---- Fork and copy-on-write ----

TEST_F(KvPoolTest, ForkSharesEveryPageAndTakesNoFreePage) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 10);
  AppendOk(pool_, 1, 1, 4);
  const int64_t free_before = pool_.free_pages();
  ASSERT_TRUE(pool_.Fork(1, 2).ok());
  EXPECT_EQ(pool_.free_pages(), free_before);
  EXPECT_EQ(Pages(pool_, 2), Pages(pool_, 1));
  EXPECT_EQ(Lengths(pool_, 2), (std::vector<int64_t>{10, 4, 0}));
  EXPECT_EQ(pool_.SharedPages(*pool_.Find(1)), 3);
  EXPECT_EQ(pool_.SharedPages(*pool_.Find(2)), 3);
  EXPECT_EQ(pool_.num_sequences(), 2);
}

TEST_F(KvPoolTest, ForkOfAnEmptySequenceSharesNothing) {
  ASSERT_TRUE(pool_.Create(1).ok());
  ASSERT_TRUE(pool_.Fork(1, 2).ok());
  EXPECT_TRUE(Pages(pool_, 2).empty());
  EXPECT_EQ(Lengths(pool_, 2), std::vector<int64_t>(kLayers, 0));
}

TEST_F(KvPoolTest, ForkOfAnUnknownParentIsNotFoundAndChangesNothing) {
  const Snapshot before = Snap(pool_);
  const absl::Status s = pool_.Fork(1, 2);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_NE(s.message().find("parent_id"), absl::string_view::npos) << s;
  EXPECT_EQ(Snap(pool_), before);
}

TEST_F(KvPoolTest, ForkOntoAnExistingChildIsAlreadyExistsAndChangesNothing) {
  ASSERT_TRUE(pool_.Create(1).ok());
  ASSERT_TRUE(pool_.Create(2).ok());
  AppendOk(pool_, 1, 0, 5);
  const Snapshot before = Snap(pool_);
  const absl::Status s = pool_.Fork(1, 2);
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists) << s;
  EXPECT_NE(s.message().find("child_id"), absl::string_view::npos) << s;
  EXPECT_EQ(Snap(pool_), before);
  EXPECT_EQ(pool_.Fork(1, 1).code(), absl::StatusCode::kAlreadyExists);
}

TEST_F(KvPoolTest, FirstWriteIntoASharedPageCopiesItAndTheOtherOwnerKeepsTheOldPage) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 10);  // pages p0 p1 p2, p2 holds 2 of 4 tokens
  ASSERT_TRUE(pool_.Fork(1, 2).ok());
  const std::vector<int32_t> parent_pages = Pages(pool_, 1);
  const int64_t free_before = pool_.free_pages();

  const std::vector<PageCopy> copies = AppendOk(pool_, 2, 0, 1);
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].src, parent_pages[2]);
  EXPECT_NE(copies[0].dst, parent_pages[2]);
  EXPECT_EQ(Pages(pool_, 1), parent_pages);  // the parent keeps its page
  const std::vector<int32_t> child_pages = Pages(pool_, 2);
  EXPECT_EQ(child_pages[0], parent_pages[0]);
  EXPECT_EQ(child_pages[1], parent_pages[1]);
  EXPECT_EQ(child_pages[2], copies[0].dst);
  EXPECT_EQ(pool_.free_pages(), free_before - 1);
  EXPECT_EQ(pool_.SharedPages(*pool_.Find(1)), 2);
  EXPECT_EQ(Lengths(pool_, 1)[0], 10);
  EXPECT_EQ(Lengths(pool_, 2)[0], 11);

  // The parent is now the only owner of its page: writing into it copies nothing.
  EXPECT_TRUE(AppendOk(pool_, 1, 0, 1).empty());
  EXPECT_EQ(pool_.free_pages(), free_before - 1);
}

TEST_F(KvPoolTest, WriteIntoASharedPageAtAnotherLayerAlsoCopiesIt) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 8);  // two full pages at layer 0, layer 1 empty
  ASSERT_TRUE(pool_.Fork(1, 2).ok());
  const std::vector<int32_t> parent_pages = Pages(pool_, 1);
  // Layer 1 of the child writes positions [0, 5): both shared pages hold them.
  const std::vector<PageCopy> copies = AppendOk(pool_, 2, 1, 5);
  ASSERT_EQ(copies.size(), 2u);
  EXPECT_EQ(copies[0].src, parent_pages[0]);
  EXPECT_EQ(copies[1].src, parent_pages[1]);
  EXPECT_EQ(Pages(pool_, 1), parent_pages);
  EXPECT_EQ(pool_.SharedPages(*pool_.Find(2)), 0);
}

TEST_F(KvPoolTest, ForkAtAPageBoundaryThenAppendAllocatesWithoutCopying) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 2 * kPageSize);
  ASSERT_TRUE(pool_.Fork(1, 2).ok());
  EXPECT_TRUE(AppendOk(pool_, 2, 0, 1).empty());
  EXPECT_TRUE(AppendOk(pool_, 1, 0, 1).empty());
  EXPECT_EQ(pool_.SharedPages(*pool_.Find(1)), 2);
  EXPECT_NE(Pages(pool_, 1)[2], Pages(pool_, 2)[2]);
}

TEST_F(KvPoolTest, ASharedPageWrittenByParentAndChildInOneBatchIsCopiedOnce) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 6);  // p0 full, p1 partial
  ASSERT_TRUE(pool_.Fork(1, 2).ok());
  TakePages(pool_, kPages - 3, kMaxSeqLen);  // leave exactly one free page
  ASSERT_EQ(pool_.free_pages(), 1);
  const int32_t shared = Pages(pool_, 1)[1];

  std::vector<int64_t> starts;
  const AppendItem items[] = {{1, 1}, {2, 1}};
  auto copies = pool_.ReserveAppend(0, items, &starts);
  ASSERT_TRUE(copies.ok()) << copies.status();
  ASSERT_EQ(copies->size(), 1u);
  EXPECT_EQ((*copies)[0].src, shared);
  EXPECT_EQ(pool_.free_pages(), 0);
  // One of them got the copy, the other kept the old page; they no longer share it.
  const int32_t a = Pages(pool_, 1)[1];
  const int32_t b = Pages(pool_, 2)[1];
  EXPECT_NE(a, b);
  EXPECT_TRUE((a == shared && b == (*copies)[0].dst) || (b == shared && a == (*copies)[0].dst));
  EXPECT_EQ(pool_.SharedPages(*pool_.Find(1)), 1);
  EXPECT_EQ(Lengths(pool_, 1)[0], 7);
  EXPECT_EQ(Lengths(pool_, 2)[0], 7);
}

TEST_F(KvPoolTest, ASharedPageWrittenByParentAndChildInOneBatchWithNoFreePageIsExhausted) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 6);
  ASSERT_TRUE(pool_.Fork(1, 2).ok());
  TakePages(pool_, kPages - 2, kMaxSeqLen);
  ASSERT_EQ(pool_.free_pages(), 0);
  const Snapshot before = Snap(pool_);
  std::vector<int64_t> starts;
  const AppendItem items[] = {{1, 1}, {2, 1}};
  auto copies = pool_.ReserveAppend(0, items, &starts);
  EXPECT_EQ(copies.status().code(), absl::StatusCode::kResourceExhausted) << copies.status();
  EXPECT_EQ(Snap(pool_), before);
}

TEST_F(KvPoolTest, APageSharedByThreeAndWrittenByAllThreeInOneBatchIsCopiedTwice) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 3);
  ASSERT_TRUE(pool_.Fork(1, 2).ok());
  ASSERT_TRUE(pool_.Fork(2, 3).ok());
  const int64_t free_before = pool_.free_pages();
  std::vector<int64_t> starts;
  const AppendItem items[] = {{3, 1}, {1, 1}, {2, 1}};
  auto copies = pool_.ReserveAppend(0, items, &starts);
  ASSERT_TRUE(copies.ok()) << copies.status();
  EXPECT_EQ(copies->size(), 2u);
  EXPECT_EQ(pool_.free_pages(), free_before - 2);
  std::set<int32_t> distinct = {Pages(pool_, 1)[0], Pages(pool_, 2)[0], Pages(pool_, 3)[0]};
  EXPECT_EQ(distinct.size(), 3u);
}

}  // namespace
}  // namespace attnd::kv_pool_test_util
