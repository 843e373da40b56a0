// KvPool's part in KV transfer: a grant's hold keeps pages allocated and unchanged (writes copy
// them first) until dropped; a pull's detached pages are all or nothing, count against the
// quota, and become a new or empty sequence.
#include <gtest/gtest.h>

#include "server/engine/kv_pool.h"
#include "tests/unit/kv_pool_test_util.h"

namespace attnd {
namespace {

using kv_pool_test_util::PoolIsConsistent;

class KvPoolTransferTest : public ::testing::Test {
 protected:
  KvPoolTransferTest() : pool_(0, /*num_pages=*/16, /*num_layers=*/2, /*page_size=*/4, 1024) {}

  void Grow(uint64_t id, int64_t tokens, uint32_t owner = 0) {
    for (int64_t layer = 0; layer < 2; ++layer) {
      AppendItem item{id, tokens};
      std::vector<int64_t> starts;
      ASSERT_TRUE(pool_.ReserveAppend(layer, {&item, 1}, &starts, owner).ok());
    }
  }

  KvPool pool_;
};

TEST_F(KvPoolTransferTest, AHeldPageOutlivesItsSequence) {
  ASSERT_TRUE(pool_.Create(1).ok());
  Grow(1, 10);  // 3 pages
  auto held = pool_.Hold(1, 10);
  ASSERT_TRUE(held.ok());
  EXPECT_EQ(held->size(), 3u);
  ASSERT_TRUE(pool_.Release(1).ok());
  EXPECT_EQ(pool_.free_pages(), 13);
  EXPECT_EQ(pool_.DropPages(*held), 3);
  EXPECT_EQ(pool_.free_pages(), 16);
  EXPECT_TRUE(PoolIsConsistent(pool_));
}

TEST_F(KvPoolTransferTest, AWriteIntoAHeldPageGoesToACopy) {
  ASSERT_TRUE(pool_.Create(1).ok());
  Grow(1, 6);  // pages 0..1, the second partly full
  auto held = pool_.Hold(1, 6);
  ASSERT_TRUE(held.ok());
  AppendItem item{1, 1};
  std::vector<int64_t> starts;
  auto copies = pool_.ReserveAppend(0, {&item, 1}, &starts);
  ASSERT_TRUE(copies.ok());
  ASSERT_EQ(copies->size(), 1u);
  EXPECT_EQ((*copies)[0].src, (*held)[1]);
  EXPECT_NE(pool_.Find(1)->pages[1], (*held)[1]);
  pool_.DropPages(*held);
  EXPECT_TRUE(PoolIsConsistent(pool_));
}

TEST_F(KvPoolTransferTest, AHoldNeedsTheTokensAtEveryLayer) {
  ASSERT_TRUE(pool_.Create(1).ok());
  AppendItem item{1, 8};
  std::vector<int64_t> starts;
  ASSERT_TRUE(pool_.ReserveAppend(0, {&item, 1}, &starts).ok());  // layer 1 stays empty
  EXPECT_EQ(pool_.Hold(1, 8).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(pool_.Hold(2, 1).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(KvPoolTransferTest, DetachedPagesAreAllOrNothingAndCountAgainstTheQuota) {
  pool_.SetQuotas(0, /*max_pages=*/5);
  EXPECT_EQ(pool_.AllocateDetached(6, 7).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool_.free_pages(), 16);
  auto pages = pool_.AllocateDetached(5, 7);
  ASSERT_TRUE(pages.ok());
  EXPECT_EQ(pool_.free_pages(), 11);
  EXPECT_EQ(pool_.AllocateDetached(1, 7).status().code(), absl::StatusCode::kResourceExhausted);
  pool_.SetQuotas(0, 0);
  EXPECT_EQ(pool_.AllocateDetached(12, 8).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool_.DropPages(*pages), 5);
  EXPECT_EQ(pool_.free_pages(), 16);
}

TEST_F(KvPoolTransferTest, AdoptedPagesMakeANewSequenceWithTheGivenLayersFilled) {
  auto pages = pool_.AllocateDetached(3, 0);
  ASSERT_TRUE(pages.ok());
  ASSERT_TRUE(pool_.Adopt(9, 0, 0, *pages, 1, 2, 10).ok());
  const Sequence* seq = pool_.Find(9);
  ASSERT_NE(seq, nullptr);
  EXPECT_EQ(seq->pages, *pages);
  EXPECT_EQ(seq->lengths, (std::vector<int64_t>{0, 10}));
  EXPECT_TRUE(PoolIsConsistent(pool_));
}

TEST_F(KvPoolTransferTest, AdoptFillsAnEmptySequenceButNotOneHoldingTokens) {
  ASSERT_TRUE(pool_.Create(1).ok());
  ASSERT_TRUE(pool_.Create(2).ok());
  Grow(2, 3);
  auto pages = pool_.AllocateDetached(1, 0);
  ASSERT_TRUE(pages.ok());
  EXPECT_EQ(pool_.CheckAdoptable(2, 0, 0).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(pool_.Adopt(2, 0, 0, *pages, 0, 2, 4).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(pool_.Adopt(1, 0, 0, *pages, 0, 2, 4).ok());
  EXPECT_EQ(pool_.Find(1)->lengths, (std::vector<int64_t>{4, 4}));
  EXPECT_TRUE(PoolIsConsistent(pool_));
}

TEST_F(KvPoolTransferTest, AReleasedSequencesPagesComeBackInTheOrderItHadThem) {
  ASSERT_TRUE(pool_.Create(1).ok());
  ASSERT_TRUE(pool_.Create(2).ok());
  Grow(1, 8);   // pages 0, 1
  Grow(2, 12);  // pages 2, 3, 4
  const std::vector<int32_t> had = pool_.Find(2)->pages;
  ASSERT_TRUE(pool_.Release(2).ok());
  ASSERT_TRUE(pool_.Create(3).ok());
  Grow(3, 12);
  // Consecutive before, consecutive again: a pull of the new sequence merges its pages.
  EXPECT_EQ(pool_.Find(3)->pages, had);
  EXPECT_TRUE(PoolIsConsistent(pool_));
}

}  // namespace
}  // namespace attnd
