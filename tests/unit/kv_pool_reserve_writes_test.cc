// Tests of server/engine/kv_pool.h: ReserveWrites, the import path (writes at given positions
// of given layers, new pages counted once per sequence, shared pages copied once).
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "server/engine/kv_pool.h"
#include "tests/unit/kv_pool_test_util.h"

namespace attnd::kv_pool_test_util {
namespace {

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

}  // namespace
}  // namespace attnd::kv_pool_test_util
