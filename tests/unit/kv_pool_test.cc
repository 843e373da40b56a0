// Tests of server/kv_pool.h: the bookkeeping of one device's KV pool. Sequences, refcounted pages
// shared by forks, copy-on-write, truncate, release, per-layer lengths and all-or-nothing
// reservations. Every test ends by checking the pool's invariants; a randomized test drives the
// pool with random operations and checks it against a plain model after each one.
#include "server/engine/kv_pool.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "tests/unit/unit_test_util.h"

namespace attnd {
namespace {

using ::testing::AssertionFailure;
using ::testing::AssertionResult;
using ::testing::AssertionSuccess;

constexpr int kDevice = 3;

int64_t PagesFor(int64_t tokens, int64_t page_size) { return (tokens + page_size - 1) / page_size; }

// The pool's invariants, from its public view:
//  - every page id is in [0, total) and no page table holds a page twice;
//  - a sequence holds exactly the pages its longest layer needs;
//  - owned pages + free pages == total (no page is lost, none is owned and free at once);
//  - SharedPages(seq) counts exactly the pages some other sequence also holds.
AssertionResult PoolIsConsistent(const KvPool& pool) {
  std::map<int32_t, int> owners;
  for (const Sequence* seq : pool.List()) {
    if (static_cast<int64_t>(seq->lengths.size()) != pool.num_layers())
      return AssertionFailure() << "sequence " << seq->id << " has " << seq->lengths.size()
                                << " layer lengths, the pool has " << pool.num_layers()
                                << " layers";
    std::set<int32_t> mine;
    for (int32_t page : seq->pages) {
      if (page < 0 || page >= pool.total_pages())
        return AssertionFailure() << "sequence " << seq->id << " holds page " << page
                                  << " outside [0, " << pool.total_pages() << ")";
      if (!mine.insert(page).second)
        return AssertionFailure() << "sequence " << seq->id << " holds page " << page
                                  << " twice: [" << absl::StrJoin(seq->pages, ", ") << "]";
      ++owners[page];
    }
    const int64_t want_pages = PagesFor(seq->MaxLength(), pool.page_size());
    if (static_cast<int64_t>(seq->pages.size()) != want_pages)
      return AssertionFailure() << "sequence " << seq->id << " holds " << seq->pages.size()
                                << " pages for a longest layer of " << seq->MaxLength()
                                << " tokens; expected " << want_pages;
  }
  if (static_cast<int64_t>(owners.size()) + pool.free_pages() != pool.total_pages())
    return AssertionFailure() << owners.size() << " owned pages + " << pool.free_pages()
                              << " free pages != " << pool.total_pages() << " total";
  for (const Sequence* seq : pool.List()) {
    int64_t shared = 0;
    for (int32_t page : seq->pages) shared += owners[page] > 1 ? 1 : 0;
    if (pool.SharedPages(*seq) != shared)
      return AssertionFailure() << "SharedPages(" << seq->id << ") = " << pool.SharedPages(*seq)
                                << ", but " << shared << " of its pages have another owner";
  }
  return AssertionSuccess();
}

// The stronger check that no page is both owned and on the free list: hand every free page to
// probe sequences, check none of them is owned by anyone else, and give them back. Leaves the
// pool as it was except for the order of its free list.
AssertionResult FreeListIsDisjointFromOwnedPages(KvPool& pool, int64_t max_seq_len) {
  std::set<int32_t> owned;
  for (const Sequence* seq : pool.List()) owned.insert(seq->pages.begin(), seq->pages.end());
  const int64_t free_before = pool.free_pages();
  const int64_t per_probe = max_seq_len / pool.page_size();
  std::vector<uint64_t> probes;
  std::set<int32_t> handed_out;
  uint64_t probe_id = std::numeric_limits<uint64_t>::max();
  while (pool.free_pages() > 0) {
    const int64_t pages = std::min(pool.free_pages(), per_probe);
    if (!pool.Create(probe_id).ok()) return AssertionFailure() << "probe id in use";
    probes.push_back(probe_id);
    std::vector<int64_t> starts;
    const AppendItem item{probe_id, pages * pool.page_size()};
    auto copies = pool.ReserveAppend(0, {&item, 1}, &starts);
    if (!copies.ok()) return AssertionFailure() << "probe append: " << copies.status();
    for (int32_t page : pool.Find(probe_id)->pages) {
      if (owned.count(page) != 0)
        return AssertionFailure() << "page " << page << " was on the free list and owned";
      if (!handed_out.insert(page).second)
        return AssertionFailure() << "page " << page << " is on the free list twice";
    }
    --probe_id;
  }
  int64_t freed = 0;
  for (uint64_t id : probes) freed += *pool.Release(id);
  if (freed != free_before || pool.free_pages() != free_before)
    return AssertionFailure() << "probes freed " << freed << " of " << free_before << " pages";
  return AssertionSuccess();
}

// Everything a failed call must leave as it was.
struct Snapshot {
  int64_t free_pages;
  std::map<uint64_t, std::pair<std::vector<int32_t>, std::vector<int64_t>>> sequences;
  bool operator==(const Snapshot&) const = default;
};

Snapshot Snap(const KvPool& pool) {
  Snapshot s{pool.free_pages(), {}};
  for (const Sequence* seq : pool.List()) s.sequences[seq->id] = {seq->pages, seq->lengths};
  return s;
}

std::vector<int64_t> Lengths(const KvPool& pool, uint64_t id) { return pool.Find(id)->lengths; }
std::vector<int32_t> Pages(const KvPool& pool, uint64_t id) { return pool.Find(id)->pages; }

// Appends n tokens to one sequence at one layer and returns the copies (must succeed).
std::vector<PageCopy> AppendOk(KvPool& pool, uint64_t id, int64_t layer, int64_t n) {
  std::vector<int64_t> starts;
  const AppendItem item{id, n};
  auto copies = pool.ReserveAppend(layer, {&item, 1}, &starts);
  EXPECT_TRUE(copies.ok()) << copies.status();
  return copies.ok() ? *copies : std::vector<PageCopy>{};
}

// Takes `pages` free pages into filler sequences (ids from 1000 up), each within max_seq_len.
void TakePages(KvPool& pool, int64_t pages, int64_t max_seq_len) {
  uint64_t id = 1000;
  const int64_t per_seq = max_seq_len / pool.page_size();
  while (pages > 0) {
    while (pool.Find(id) != nullptr) ++id;
    ASSERT_TRUE(pool.Create(id).ok());
    const int64_t n = std::min(pages, per_seq);
    AppendOk(pool, id, 0, n * pool.page_size());
    pages -= n;
  }
}

// Small pool: 3 layers, 4 tokens per page, 16 pages, sequences of at most 40 tokens.
class KvPoolTest : public ::testing::Test {
 protected:
  static constexpr int64_t kLayers = 3;
  static constexpr int64_t kPageSize = 4;
  static constexpr int64_t kPages = 16;
  static constexpr int64_t kMaxSeqLen = 40;

  void TearDown() override { EXPECT_TRUE(PoolIsConsistent(pool_)); }

  KvPool pool_{kDevice, kPages, kLayers, kPageSize, kMaxSeqLen};
};

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

// ---- ReserveWrites (the import path) ----

TEST_F(KvPoolTest, ReserveWritesOverExistingTokensKeepsTheLength) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendOk(pool_, 1, 0, 9);
  const PageWrite w{1, 0, 0, 5};
  auto copies = pool_.ReserveWrites({&w, 1});
  ASSERT_TRUE(copies.ok()) << copies.status();
  EXPECT_TRUE(copies->empty());
  EXPECT_EQ(Lengths(pool_, 1)[0], 9);
  EXPECT_EQ(pool_.free_pages(), kPages - 3);
}

TEST_F(KvPoolTest, ReserveWritesOfTheSameSequenceAtSeveralLayersCountsItsNewPagesOnce) {
  // An import of n tokens into every layer of an empty sequence needs PagesFor(n) pages: the
  // page table is shared by all layers.
  ASSERT_TRUE(pool_.Create(1).ok());
  TakePages(pool_, kPages - 3, kMaxSeqLen);
  ASSERT_EQ(pool_.free_pages(), 3);
  std::vector<PageWrite> writes;
  for (int64_t layer = 0; layer < kLayers; ++layer) writes.push_back({1, layer, 0, 3 * kPageSize});
  auto copies = pool_.ReserveWrites(writes);
  ASSERT_TRUE(copies.ok()) << copies.status();
  EXPECT_EQ(pool_.free_pages(), 0);
  EXPECT_EQ(Lengths(pool_, 1), std::vector<int64_t>(kLayers, 3 * kPageSize));
}

TEST_F(KvPoolTest, ReserveWritesIntoSharedPagesAtSeveralLayersCopiesEachPageOnce) {
  ASSERT_TRUE(pool_.Create(1).ok());
  for (int64_t layer = 0; layer < kLayers; ++layer) AppendOk(pool_, 1, layer, 6);
  ASSERT_TRUE(pool_.Fork(1, 2).ok());
  const int64_t free_before = pool_.free_pages();
  std::vector<PageWrite> writes;
  for (int64_t layer = 0; layer < kLayers; ++layer) writes.push_back({2, layer, 0, 6});
  auto copies = pool_.ReserveWrites(writes);
  ASSERT_TRUE(copies.ok()) << copies.status();
  EXPECT_EQ(copies->size(), 2u);
  EXPECT_EQ(pool_.free_pages(), free_before - 2);
  EXPECT_EQ(pool_.SharedPages(*pool_.Find(1)), 0);
}

TEST_F(KvPoolTest, ReserveWritesOfTheSameSequenceAndLayerTwiceIsInvalidArgument) {
  ASSERT_TRUE(pool_.Create(1).ok());
  const Snapshot before = Snap(pool_);
  const PageWrite writes[] = {{1, 0, 0, 2}, {1, 0, 0, 2}};
  auto copies = pool_.ReserveWrites(writes);
  EXPECT_EQ(copies.status().code(), absl::StatusCode::kInvalidArgument) << copies.status();
  EXPECT_EQ(Snap(pool_), before);
}

TEST_F(KvPoolTest, ReserveWritesOfAnUnknownSequenceIsNotFoundAndChangesNothing) {
  ASSERT_TRUE(pool_.Create(1).ok());
  const Snapshot before = Snap(pool_);
  const PageWrite writes[] = {{1, 0, 0, 2}, {8, 0, 0, 2}};
  auto copies = pool_.ReserveWrites(writes);
  EXPECT_EQ(copies.status().code(), absl::StatusCode::kNotFound) << copies.status();
  EXPECT_EQ(Snap(pool_), before);
}

// ---- Randomized: the pool against a plain model ----

// The model: each sequence is a list of abstract page tokens and per-layer lengths. A token
// shared by several sequences is one refcounted page; a write into a page whose token has more
// than one owner gives the writer a fresh token (copy-on-write), applied item by item.
struct ModelSeq {
  std::vector<int64_t> lengths;
  std::vector<int> tokens;
};

struct Model {
  std::map<uint64_t, ModelSeq> seqs;
  int next_token = 0;

  int Owners(int token) const {
    int n = 0;
    for (const auto& [id, s] : seqs) n += std::count(s.tokens.begin(), s.tokens.end(), token);
    return n;
  }
  int64_t Used() const {
    std::set<int> all;
    for (const auto& [id, s] : seqs) all.insert(s.tokens.begin(), s.tokens.end());
    return static_cast<int64_t>(all.size());
  }
};

class KvPoolModelChecker {
 public:
  KvPoolModelChecker(int64_t pages, int64_t layers, int64_t page_size, int64_t max_seq_len)
      : pool_(kDevice, pages, layers, page_size, max_seq_len),
        pages_(pages), layers_(layers), page_size_(page_size), max_seq_len_(max_seq_len) {}

  // Checks the pool against the model: lengths, page counts, a consistent token <-> page
  // bijection, shared counts, free pages, and the invariants.
  void Check(const std::string& step) {
    SCOPED_TRACE(step);
    ASSERT_TRUE(PoolIsConsistent(pool_));
    ASSERT_EQ(pool_.num_sequences(), static_cast<int64_t>(model_.seqs.size()));
    ASSERT_EQ(pool_.free_pages(), pages_ - model_.Used());
    std::map<int, int32_t> token_to_page;
    std::map<int32_t, int> page_to_token;
    for (const auto& [id, ms] : model_.seqs) {
      const Sequence* seq = pool_.Find(id);
      ASSERT_NE(seq, nullptr) << id;
      ASSERT_EQ(seq->lengths, ms.lengths) << id;
      ASSERT_EQ(seq->pages.size(), ms.tokens.size()) << id;
      int64_t shared = 0;
      for (size_t i = 0; i < ms.tokens.size(); ++i) {
        auto [t, t_new] = token_to_page.emplace(ms.tokens[i], seq->pages[i]);
        ASSERT_EQ(t->second, seq->pages[i]) << "sequence " << id << " page " << i;
        auto [p, p_new] = page_to_token.emplace(seq->pages[i], ms.tokens[i]);
        ASSERT_EQ(p->second, ms.tokens[i]) << "sequence " << id << " page " << i;
        shared += model_.Owners(ms.tokens[i]) > 1 ? 1 : 0;
      }
      ASSERT_EQ(pool_.SharedPages(*seq), shared) << id;
    }
  }

  void Run(std::mt19937& rng, int ops) {
    std::uniform_int_distribution<int> op_dist(0, 99);
    std::uniform_int_distribution<uint64_t> id_dist(1, 10);
    std::uniform_int_distribution<int64_t> layer_dist(0, layers_ - 1);
    for (int i = 0; i < ops; ++i) {
      const int op = op_dist(rng);
      std::string what;
      if (op < 12) {
        what = Create(id_dist(rng));
      } else if (op < 22) {
        what = Fork(id_dist(rng), id_dist(rng));
      } else if (op < 34) {
        what = Truncate(id_dist(rng), std::uniform_int_distribution<int64_t>(0, 20)(rng));
      } else if (op < 44) {
        what = Release(id_dist(rng));
      } else {
        std::vector<AppendItem> items(std::uniform_int_distribution<int>(1, 4)(rng));
        for (AppendItem& item : items) {
          item.seq_id = id_dist(rng);
          item.num_new_tokens = std::uniform_int_distribution<int64_t>(1, 2 * page_size_ + 1)(rng);
        }
        what = Append(layer_dist(rng), items);
      }
      Check(absl::StrCat("op ", i, ": ", what));
      if (::testing::Test::HasFatalFailure()) return;
    }
  }

  void ReleaseAll() {
    for (const auto& [id, s] : std::map<uint64_t, ModelSeq>(model_.seqs)) Release(id);
    Check("release all");
    EXPECT_EQ(pool_.free_pages(), pages_);
    EXPECT_EQ(pool_.num_sequences(), 0);
  }

 private:
  std::string Create(uint64_t id) {
    const absl::Status s = pool_.Create(id);
    if (model_.seqs.count(id)) {
      EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists) << s;
    } else {
      EXPECT_TRUE(s.ok()) << s;
      model_.seqs[id] = ModelSeq{std::vector<int64_t>(layers_, 0), {}};
    }
    return absl::StrCat("Create(", id, ") -> ", s.ToString());
  }

  std::string Fork(uint64_t parent, uint64_t child) {
    const absl::Status s = pool_.Fork(parent, child);
    if (!model_.seqs.count(parent)) {
      EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
    } else if (model_.seqs.count(child)) {
      EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists) << s;
    } else {
      EXPECT_TRUE(s.ok()) << s;
      model_.seqs[child] = model_.seqs[parent];
    }
    return absl::StrCat("Fork(", parent, ", ", child, ") -> ", s.ToString());
  }

  std::string Truncate(uint64_t id, int64_t length) {
    const absl::Status s = pool_.Truncate(id, length);
    auto it = model_.seqs.find(id);
    if (it == model_.seqs.end()) {
      EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
    } else {
      EXPECT_TRUE(s.ok()) << s;
      int64_t longest = 0;
      for (int64_t& len : it->second.lengths) longest = std::max(longest, len = std::min(len, length));
      it->second.tokens.resize(static_cast<size_t>(PagesFor(longest, page_size_)));
    }
    return absl::StrCat("Truncate(", id, ", ", length, ") -> ", s.ToString());
  }

  std::string Release(uint64_t id) {
    auto freed = pool_.Release(id);
    auto it = model_.seqs.find(id);
    if (it == model_.seqs.end()) {
      EXPECT_EQ(freed.status().code(), absl::StatusCode::kNotFound) << freed.status();
    } else {
      int64_t want = 0;
      for (int token : it->second.tokens) want += model_.Owners(token) == 1 ? 1 : 0;
      EXPECT_TRUE(freed.ok()) << freed.status();
      if (freed.ok()) {
        EXPECT_EQ(*freed, want);
      }
      model_.seqs.erase(it);
    }
    return absl::StrCat("Release(", id, ") -> ",
                        freed.ok() ? absl::StrCat(*freed, " freed") : freed.status().ToString());
  }

  std::string Append(int64_t layer, const std::vector<AppendItem>& items) {
    std::string what = absl::StrCat("ReserveAppend(layer ", layer, ", [");
    for (const AppendItem& item : items)
      absl::StrAppend(&what, "{", item.seq_id, ", ", item.num_new_tokens, "} ");
    absl::StrAppend(&what, "]) -> ");
    // What the model expects: the first failing check in item order, then capacity.
    absl::StatusCode want = absl::StatusCode::kOk;
    std::set<uint64_t> seen;
    for (const AppendItem& item : items) {
      auto it = model_.seqs.find(item.seq_id);
      if (it == model_.seqs.end()) {
        want = absl::StatusCode::kNotFound;
        break;
      }
      if (!seen.insert(item.seq_id).second) {
        want = absl::StatusCode::kInvalidArgument;
        break;
      }
      if (it->second.lengths[layer] + item.num_new_tokens > max_seq_len_) {
        want = absl::StatusCode::kInvalidArgument;
        break;
      }
    }
    Model after = model_;
    std::vector<int64_t> want_starts;
    int64_t needed = 0;
    if (want == absl::StatusCode::kOk) {
      for (const AppendItem& item : items) {
        ModelSeq& s = after.seqs[item.seq_id];
        const int64_t start = s.lengths[layer];
        want_starts.push_back(start);
        for (int64_t p = start / page_size_; p <= (start + item.num_new_tokens - 1) / page_size_;
             ++p) {
          if (p < static_cast<int64_t>(s.tokens.size())) {
            if (after.Owners(s.tokens[p]) > 1) {
              s.tokens[p] = after.next_token++;
              ++needed;
            }
          } else {
            s.tokens.push_back(after.next_token++);
            ++needed;
          }
        }
        s.lengths[layer] = start + item.num_new_tokens;
      }
      if (needed > pool_.free_pages()) want = absl::StatusCode::kResourceExhausted;
    }
    std::set<int32_t> owned_before;
    for (const Sequence* seq : pool_.List()) owned_before.insert(seq->pages.begin(), seq->pages.end());

    std::vector<int64_t> starts;
    auto copies = pool_.ReserveAppend(layer, items, &starts);
    absl::StrAppend(&what, copies.status().ToString(), " (model: ", absl::StatusCodeToString(want),
                    ", needs ", needed, " of ", pool_.free_pages(), " free)");
    EXPECT_EQ(copies.status().code(), want) << what;
    if (copies.ok() && want == absl::StatusCode::kOk) {
      EXPECT_EQ(starts, want_starts) << what;
      // Each copy reads a page that was owned and writes one that was free.
      std::set<int32_t> dsts;
      for (const PageCopy& c : *copies) {
        EXPECT_TRUE(owned_before.count(c.src)) << what << " copy src " << c.src;
        EXPECT_FALSE(owned_before.count(c.dst)) << what << " copy dst " << c.dst;
        EXPECT_TRUE(dsts.insert(c.dst).second) << what << " copy dst twice " << c.dst;
      }
      model_ = std::move(after);
    }
    return what;
  }

  KvPool pool_;
  Model model_;
  int64_t pages_, layers_, page_size_, max_seq_len_;
};

TEST(KvPoolPropertyTest, RandomOperationsMatchAPlainModelAndReleasingEverythingFreesThePool) {
  const uint32_t seed = testing_util::TestSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed, " (ATTND_TEST_SEED=", seed, " replays it)"));
  std::mt19937 rng(seed);
  constexpr int kEpisodes = 150;
  constexpr int kOpsPerEpisode = 200;
  for (int episode = 0; episode < kEpisodes; ++episode) {
    SCOPED_TRACE(absl::StrCat("episode ", episode));
    // Small pools so that out-of-pages, copy-on-write and max_seq_len all happen often.
    const int64_t page_size = std::uniform_int_distribution<int64_t>(1, 5)(rng);
    const int64_t pages = std::uniform_int_distribution<int64_t>(4, 24)(rng);
    const int64_t layers = std::uniform_int_distribution<int64_t>(1, 3)(rng);
    const int64_t max_seq_len = std::uniform_int_distribution<int64_t>(4, 24)(rng);
    KvPoolModelChecker checker(pages, layers, page_size, max_seq_len);
    checker.Run(rng, kOpsPerEpisode);
    if (HasFatalFailure()) return;
    checker.ReleaseAll();
  }
}

TEST(KvPoolPropertyTest, FreeListStaysDisjointFromOwnedPagesUnderRandomOperations) {
  const uint32_t seed = testing_util::TestSeed();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937 rng(seed);
  constexpr int64_t kPageSize = 3, kPages = 20, kMaxSeqLen = 30;
  KvPool pool(kDevice, kPages, 2, kPageSize, kMaxSeqLen);
  for (int i = 0; i < 400; ++i) {
    const uint64_t id = std::uniform_int_distribution<uint64_t>(1, 6)(rng);
    const uint64_t other = std::uniform_int_distribution<uint64_t>(1, 6)(rng);
    switch (std::uniform_int_distribution<int>(0, 4)(rng)) {
      case 0:
        (void)pool.Create(id);
        break;
      case 1:
        (void)pool.Fork(id, other);
        break;
      case 2:
        (void)pool.Truncate(id, std::uniform_int_distribution<int64_t>(0, kMaxSeqLen)(rng));
        break;
      case 3:
        (void)pool.Release(id);
        break;
      default: {
        std::vector<int64_t> starts;
        const AppendItem items[] = {{id, std::uniform_int_distribution<int64_t>(1, 7)(rng)},
                                    {other, std::uniform_int_distribution<int64_t>(1, 7)(rng)}};
        (void)pool.ReserveAppend(std::uniform_int_distribution<int64_t>(0, 1)(rng),
                                 {items, id == other ? 1u : 2u}, &starts);
      }
    }
    ASSERT_TRUE(PoolIsConsistent(pool)) << "after op " << i;
    ASSERT_TRUE(FreeListIsDisjointFromOwnedPages(pool, kMaxSeqLen)) << "after op " << i;
  }
}

// ---- Page-table epoch (lets the CUDA graph path keep page ids it already uploaded) ----

TEST_F(KvPoolTest, TableEpochChangesWhenAnyPageTableChangesAndOnlyThen) {
  ASSERT_TRUE(pool_.Create(1).ok());
  uint64_t e = pool_.table_epoch();
  AppendOk(pool_, 1, 0, 3);  // a first page
  EXPECT_NE(pool_.table_epoch(), e);
  e = pool_.table_epoch();
  AppendOk(pool_, 1, 0, 1);  // fills that page: the table is unchanged
  AppendOk(pool_, 1, 1, 4);  // another layer, same page
  EXPECT_EQ(pool_.table_epoch(), e);
  AppendOk(pool_, 1, 0, 1);  // a second page
  EXPECT_NE(pool_.table_epoch(), e);
  e = pool_.table_epoch();
  ASSERT_TRUE(pool_.Fork(1, 2).ok());
  EXPECT_NE(pool_.table_epoch(), e);
  e = pool_.table_epoch();
  AppendOk(pool_, 2, 0, 1);  // into the shared partial page: copied, the child's table changes
  EXPECT_NE(pool_.table_epoch(), e);
  e = pool_.table_epoch();
  ASSERT_TRUE(pool_.Truncate(2, 5).ok());  // keeps both pages
  EXPECT_EQ(pool_.table_epoch(), e);
  ASSERT_TRUE(pool_.Truncate(2, 2).ok());  // drops a page
  EXPECT_NE(pool_.table_epoch(), e);
  e = pool_.table_epoch();
  ASSERT_TRUE(pool_.Release(2).ok());
  EXPECT_NE(pool_.table_epoch(), e);
  e = pool_.table_epoch();
  ASSERT_TRUE(pool_.Create(3).ok());
  EXPECT_NE(pool_.table_epoch(), e);
}

// Whatever a random sequence of operations does, equal epochs mean equal page tables.
TEST_F(KvPoolTest, EqualTableEpochsMeanEqualPageTables) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  std::map<uint64_t, std::map<uint64_t, std::vector<int32_t>>> seen;  // epoch -> id -> pages
  for (int step = 0; step < 2000; ++step) {
    const uint64_t id = rng() % 4;
    switch (rng() % 6) {
      case 0: (void)pool_.Create(id); break;
      case 1: (void)pool_.Fork(id, rng() % 4); break;
      case 2: (void)pool_.Truncate(id, static_cast<int64_t>(rng() % 20)); break;
      case 3: (void)pool_.Release(id); break;
      default:
        if (pool_.Find(id) != nullptr) {
          std::vector<int64_t> starts;
          const AppendItem item{id, 1 + static_cast<int64_t>(rng() % 3)};
          (void)pool_.ReserveAppend(static_cast<int64_t>(rng() % kLayers), {&item, 1}, &starts);
        }
    }
    std::map<uint64_t, std::vector<int32_t>> tables;
    for (const Sequence* s : pool_.List()) tables[s->id] = s->pages;
    auto [it, inserted] = seen.try_emplace(pool_.table_epoch(), tables);
    if (!inserted) {
      ASSERT_EQ(it->second, tables) << "step " << step;
    }
  }
}

}  // namespace
}  // namespace attnd
