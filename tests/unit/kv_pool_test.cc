// Tests of server/engine/kv_pool.h: the bookkeeping of one device's KV pool. Sequences, refcounted pages
// shared by forks, copy-on-write, truncate, release, per-layer lengths and all-or-nothing
// reservations. Every test ends by checking the pool's invariants; a randomized test drives the
// pool with random operations and checks it against a plain model after each one.
//
// One executable, kv_pool_test, by topic: this file holds Create, Append and all-or-nothing;
// kv_pool_fork_test.cc, kv_pool_truncate_release_test.cc, kv_pool_reserve_writes_test.cc,
// kv_pool_property_test.cc (randomized) and kv_pool_table_epoch_test.cc the rest, with the shared
// helpers and fixture in kv_pool_test_util.h.
#include "server/engine/kv_pool.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <regex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "tests/unit/kv_pool_test_util.h"

namespace attnd::kv_pool_test_util {
namespace {

// ---- Create ----

TEST_F(KvPoolTest, NewPoolHasEveryPageFreeAndNoSequences) {
  EXPECT_EQ(pool_.total_pages(), kPages);
  EXPECT_EQ(pool_.free_pages(), kPages);
  EXPECT_EQ(pool_.used_pages(), 0);
  EXPECT_EQ(pool_.num_sequences(), 0);
  EXPECT_EQ(pool_.page_size(), kPageSize);
  EXPECT_EQ(pool_.num_layers(), kLayers);
  EXPECT_TRUE(FreeListIsDisjointFromOwnedPages(pool_, kMaxSeqLen));
}

TEST_F(KvPoolTest, CreateMakesAnEmptySequenceWithZeroLengthPerLayerAndNoPages) {
  ASSERT_TRUE(pool_.Create(7).ok());
  const Sequence* seq = pool_.Find(7);
  ASSERT_NE(seq, nullptr);
  EXPECT_EQ(seq->id, 7u);
  EXPECT_EQ(seq->lengths, std::vector<int64_t>(kLayers, 0));
  EXPECT_TRUE(seq->pages.empty());
  EXPECT_EQ(seq->MaxLength(), 0);
  EXPECT_EQ(pool_.num_sequences(), 1);
  EXPECT_EQ(pool_.free_pages(), kPages);
}

TEST_F(KvPoolTest, CreateOfAnExistingIdIsAlreadyExistsAndKeepsTheSequence) {
  ASSERT_TRUE(pool_.Create(7).ok());
  AppendOk(pool_, 7, 0, 5);
  const Snapshot before = Snap(pool_);
  const absl::Status s = pool_.Create(7);
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists) << s;
  EXPECT_NE(s.message().find("seq_id"), absl::string_view::npos) << s;
  EXPECT_EQ(Snap(pool_), before);
}

TEST_F(KvPoolTest, FindOfUnknownIdIsNull) { EXPECT_EQ(pool_.Find(42), nullptr); }

TEST_F(KvPoolTest, ListIsSortedById) {
  for (uint64_t id : {9, 2, 5}) ASSERT_TRUE(pool_.Create(id).ok());
  std::vector<uint64_t> ids;
  for (const Sequence* seq : pool_.List()) ids.push_back(seq->id);
  EXPECT_EQ(ids, (std::vector<uint64_t>{2, 5, 9}));
}

// ---- Append ----

TEST_F(KvPoolTest, AppendAllocatesPagesForTheNewTokensAndReportsStarts) {
  ASSERT_TRUE(pool_.Create(1).ok());
  ASSERT_TRUE(pool_.Create(2).ok());
  std::vector<int64_t> starts;
  const AppendItem items[] = {{1, 5}, {2, 1}};
  auto copies = pool_.ReserveAppend(0, items, &starts);
  ASSERT_TRUE(copies.ok()) << copies.status();
  EXPECT_TRUE(copies->empty());
  EXPECT_EQ(starts, (std::vector<int64_t>{0, 0}));
  EXPECT_EQ(Pages(pool_, 1).size(), 2u);
  EXPECT_EQ(Pages(pool_, 2).size(), 1u);
  EXPECT_EQ(pool_.free_pages(), kPages - 3);

  const AppendItem more[] = {{2, 3}, {1, 3}};
  copies = pool_.ReserveAppend(0, more, &starts);
  ASSERT_TRUE(copies.ok()) << copies.status();
  EXPECT_EQ(starts, (std::vector<int64_t>{1, 5}));  // each item's length before the call
  EXPECT_EQ(Lengths(pool_, 1), (std::vector<int64_t>{8, 0, 0}));
  EXPECT_EQ(Lengths(pool_, 2), (std::vector<int64_t>{4, 0, 0}));
  EXPECT_EQ(Pages(pool_, 1).size(), 2u);  // 8 tokens fill exactly two pages
  EXPECT_EQ(Pages(pool_, 2).size(), 1u);
}

TEST_F(KvPoolTest, PerLayerLengthsAreIndependentAndShareThePages) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 6);
  const std::vector<int32_t> pages = Pages(pool_, 1);
  ASSERT_EQ(pages.size(), 2u);
  // Layer 2 fits in the pages layer 0 already holds: no new page.
  AppendOk(pool_, 1, 2, 3);
  EXPECT_EQ(Lengths(pool_, 1), (std::vector<int64_t>{6, 0, 3}));
  EXPECT_EQ(Pages(pool_, 1), pages);
  EXPECT_EQ(pool_.free_pages(), kPages - 2);
  // Layer 2 grows past layer 0: the page table grows for every layer.
  std::vector<int64_t> starts;
  const AppendItem item{1, 7};
  ASSERT_TRUE(pool_.ReserveAppend(2, {&item, 1}, &starts).ok());
  EXPECT_EQ(starts, std::vector<int64_t>{3});
  EXPECT_EQ(Lengths(pool_, 1), (std::vector<int64_t>{6, 0, 10}));
  EXPECT_EQ(Pages(pool_, 1).size(), 3u);
  EXPECT_EQ(pool_.free_pages(), kPages - 3);
}

TEST_F(KvPoolTest, PageTablesNeverHoldAPageTwiceAndNoOwnedPageIsFree) {
  for (uint64_t id = 1; id <= 4; ++id) ASSERT_TRUE(pool_.Create(id).ok());
  AppendOk(pool_, 1, 0, 9);
  AppendOk(pool_, 2, 1, 3);
  ASSERT_TRUE(pool_.Fork(1, 5).ok());
  AppendOk(pool_, 5, 0, 2);
  ASSERT_TRUE(pool_.Release(2).ok());
  AppendOk(pool_, 3, 2, 6);
  ASSERT_TRUE(pool_.Truncate(1, 3).ok());
  AppendOk(pool_, 4, 0, 1);
  EXPECT_TRUE(PoolIsConsistent(pool_));
  EXPECT_TRUE(FreeListIsDisjointFromOwnedPages(pool_, kMaxSeqLen));
}

TEST_F(KvPoolTest, AppendOfAnUnknownSequenceIsNotFoundAndChangesNothing) {
  ASSERT_TRUE(pool_.Create(1).ok());
  const Snapshot before = Snap(pool_);
  std::vector<int64_t> starts;
  const AppendItem items[] = {{1, 3}, {99, 1}};
  auto copies = pool_.ReserveAppend(0, items, &starts);
  EXPECT_EQ(copies.status().code(), absl::StatusCode::kNotFound) << copies.status();
  EXPECT_NE(copies.status().message().find("items[1].seq_id"), absl::string_view::npos)
      << copies.status();
  EXPECT_EQ(Snap(pool_), before);
}

TEST_F(KvPoolTest, AnItemNotAtItsExpectedLengthRefusesTheWholeBatchAndChangesNothing) {
  ASSERT_TRUE(pool_.Create(1).ok());
  ASSERT_TRUE(pool_.Create(2).ok());
  AppendOk(pool_, 1, 0, 4);
  const Snapshot before = Snap(pool_);
  std::vector<int64_t> starts;
  // Item 0 is where it should be; item 1 (holding 0 tokens) says it expects 1: a retry of a
  // call that was already applied is refused, not appended twice.
  const AppendItem items[] = {{1, 2, 4}, {2, 1, 1}};
  auto copies = pool_.ReserveAppend(0, items, &starts);
  EXPECT_EQ(copies.status().code(), absl::StatusCode::kFailedPrecondition) << copies.status();
  EXPECT_NE(copies.status().message().find("items[1].expected_length"), absl::string_view::npos)
      << copies.status();
  EXPECT_EQ(Snap(pool_), before);
}

TEST_F(KvPoolTest, ItemsAtTheirExpectedLengthsAreAppended) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 1, 3);
  std::vector<int64_t> starts;
  const AppendItem items[] = {{1, 2, 3}};
  ASSERT_TRUE(pool_.ReserveAppend(1, items, &starts).ok());
  EXPECT_EQ(Lengths(pool_, 1), (std::vector<int64_t>{0, 5, 0}));
}

TEST_F(KvPoolTest, TheSameSequenceTwiceInOneBatchIsInvalidArgumentAndChangesNothing) {
  ASSERT_TRUE(pool_.Create(1).ok());
  ASSERT_TRUE(pool_.Create(2).ok());
  const Snapshot before = Snap(pool_);
  std::vector<int64_t> starts;
  const AppendItem items[] = {{1, 3}, {2, 1}, {1, 1}};
  auto copies = pool_.ReserveAppend(0, items, &starts);
  EXPECT_EQ(copies.status().code(), absl::StatusCode::kInvalidArgument) << copies.status();
  EXPECT_NE(copies.status().message().find("items[2].seq_id"), absl::string_view::npos)
      << copies.status();
  EXPECT_EQ(Snap(pool_), before);
}

TEST_F(KvPoolTest, GrowingPastMaxSeqLenIsInvalidArgumentAndChangesNothing) {
  ASSERT_TRUE(pool_.Create(1).ok());
  ASSERT_TRUE(pool_.Create(2).ok());
  AppendOk(pool_, 2, 1, kMaxSeqLen - 2);
  const Snapshot before = Snap(pool_);
  std::vector<int64_t> starts;
  const AppendItem items[] = {{1, 1}, {2, 3}};
  auto copies = pool_.ReserveAppend(1, items, &starts);
  EXPECT_EQ(copies.status().code(), absl::StatusCode::kInvalidArgument) << copies.status();
  EXPECT_NE(copies.status().message().find("max_seq_len"), absl::string_view::npos)
      << copies.status();
  EXPECT_EQ(Snap(pool_), before);
}

TEST_F(KvPoolTest, GrowingToExactlyMaxSeqLenIsAllowed) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 1, kMaxSeqLen - 2);
  AppendOk(pool_, 1, 1, 2);
  EXPECT_EQ(Lengths(pool_, 1)[1], kMaxSeqLen);
}

TEST_F(KvPoolTest, LayerOutOfRangeIsInvalidArgumentAndChangesNothing) {
  ASSERT_TRUE(pool_.Create(1).ok());
  const Snapshot before = Snap(pool_);
  std::vector<int64_t> starts;
  const AppendItem item{1, 1};
  for (int64_t layer : {int64_t{-1}, kLayers, kLayers + 100}) {
    auto copies = pool_.ReserveAppend(layer, {&item, 1}, &starts);
    EXPECT_EQ(copies.status().code(), absl::StatusCode::kInvalidArgument) << layer;
    EXPECT_NE(copies.status().message().find("layer"), absl::string_view::npos) << copies.status();
  }
  EXPECT_EQ(Snap(pool_), before);
}

// ---- All or nothing ----

TEST_F(KvPoolTest, BatchNeedingMorePagesThanFreeIsResourceExhaustedAndChangesNothing) {
  for (uint64_t id = 1; id <= 3; ++id) ASSERT_TRUE(pool_.Create(id).ok());
  AppendOk(pool_, 1, 0, 6);            // 2 pages, the second partial
  ASSERT_TRUE(pool_.Fork(1, 4).ok());  // shares both
  AppendOk(pool_, 2, 0, 4 * kPageSize);
  ASSERT_EQ(pool_.free_pages(), kPages - 6);
  const Snapshot before = Snap(pool_);
  std::vector<int64_t> starts = {123};
  // Item 0 fits alone (one copy of the shared partial page); item 1 grows by a page; item 2
  // needs more than what is left.
  const AppendItem items[] = {{4, 1}, {2, 1}, {3, (kPages - 6) * kPageSize}};
  auto copies = pool_.ReserveAppend(0, items, &starts);
  EXPECT_EQ(copies.status().code(), absl::StatusCode::kResourceExhausted) << copies.status();
  EXPECT_EQ(Snap(pool_), before);
  EXPECT_EQ(pool_.SharedPages(*pool_.Find(1)), 2);
}

TEST_F(KvPoolTest, BatchNeedingExactlyTheFreePagesSucceeds) {
  ASSERT_TRUE(pool_.Create(1).ok());
  ASSERT_TRUE(pool_.Create(2).ok());
  std::vector<int64_t> starts;
  const AppendItem items[] = {{1, 7 * kPageSize}, {2, 8 * kPageSize - 1}};
  auto copies = pool_.ReserveAppend(0, items, &starts);
  ASSERT_TRUE(copies.ok()) << copies.status();
  EXPECT_EQ(pool_.free_pages(), 1);
  EXPECT_TRUE(FreeListIsDisjointFromOwnedPages(pool_, kMaxSeqLen));
}

TEST_F(KvPoolTest, OutOfPagesMessageNamesNeededAndFreePages) {
  ASSERT_TRUE(pool_.Create(1).ok());
  ASSERT_TRUE(pool_.Create(2).ok());
  AppendOk(pool_, 1, 0, 10 * kPageSize);
  std::vector<int64_t> starts;
  const AppendItem item{2, 7 * kPageSize};
  auto copies = pool_.ReserveAppend(0, {&item, 1}, &starts);
  ASSERT_EQ(copies.status().code(), absl::StatusCode::kResourceExhausted);
  const std::string message(copies.status().message());
  EXPECT_TRUE(std::regex_search(message, std::regex("\\b7\\b"))) << message;  // needed
  EXPECT_TRUE(std::regex_search(message, std::regex("\\b6\\b"))) << message;  // free
}


TEST_F(KvPoolTest, UndoAppendRestoresTheLayerLengthAndFreesPagesNoOtherLayerNeeds) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 6);  // layer 0: 2 pages
  AppendOk(pool_, 1, 1, 3);
  const int64_t free_before = pool_.free_pages();
  const AppendItem items[] = {{1, 7}};
  auto prepared = pool_.PrepareAppend(1, items);
  ASSERT_TRUE(prepared.ok());
  ASSERT_TRUE(pool_.CommitAppend(*prepared).ok());  // layer 1: 10 tokens, a third page
  ASSERT_EQ(pool_.free_pages(), free_before - 1);
  pool_.UndoAppend(*prepared);
  EXPECT_EQ(pool_.Find(1)->lengths[1], 3);
  EXPECT_EQ(pool_.Find(1)->lengths[0], 6);
  EXPECT_EQ(pool_.Find(1)->pages.size(), 2u);  // layer 0 still needs two
  EXPECT_EQ(pool_.free_pages(), free_before);
}

}  // namespace
}  // namespace attnd::kv_pool_test_util
