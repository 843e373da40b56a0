// KvPool and its clients: a sequence id names only its owner's sequence, and pages and sequences
// count against the owner's principal, whose quota a request may not pass (refused with nothing
// changed).
#include <gtest/gtest.h>

#include "server/engine/kv_pool.h"
#include "tests/unit/kv_pool_test_util.h"

namespace attnd {
namespace {

using kv_pool_test_util::PoolIsConsistent;

constexpr uint32_t kAlice = 1, kBob = 2;          // owners
constexpr uint32_t kAlicePrincipal = 10, kBobPrincipal = 20;
constexpr uint32_t kAliceOther = 3;               // another instance of Alice's principal

class KvPoolOwnersTest : public ::testing::Test {
 protected:
  KvPoolOwnersTest() : pool_(0, /*num_pages=*/64, /*num_layers=*/2, /*page_size=*/4, 1024) {}
  void TearDown() override { EXPECT_TRUE(PoolIsConsistent(pool_)); }

  absl::Status Grow(uint32_t owner, uint64_t id, int64_t tokens, int64_t layer = 0) {
    AppendItem item{id, tokens};
    std::vector<int64_t> starts;
    return pool_.ReserveAppend(layer, {&item, 1}, &starts, owner).status();
  }

  KvPool pool_;
};

TEST_F(KvPoolOwnersTest, TheSameIdNamesADifferentSequenceForEachOwner) {
  ASSERT_TRUE(pool_.Create(7, kAlice, kAlicePrincipal).ok());
  ASSERT_TRUE(pool_.Create(7, kBob, kBobPrincipal).ok());
  ASSERT_TRUE(Grow(kAlice, 7, 9).ok());
  EXPECT_EQ(pool_.Find(7, kAlice)->lengths[0], 9);
  EXPECT_EQ(pool_.Find(7, kBob)->lengths[0], 0);
  EXPECT_EQ(pool_.Find(7, /*owner=*/0), nullptr);
}

TEST_F(KvPoolOwnersTest, AnotherOwnersSequenceIsNotFoundForEveryOperation) {
  ASSERT_TRUE(pool_.Create(5, kAlice, kAlicePrincipal).ok());
  ASSERT_TRUE(Grow(kAlice, 5, 6).ok());
  EXPECT_EQ(Grow(kBob, 5, 1).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(pool_.Truncate(5, 0, kBob).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(pool_.Release(5, kBob).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(pool_.Fork(5, 6, kBob).code(), absl::StatusCode::kNotFound);
  PageWrite w{5, 0, 0, 2};
  EXPECT_EQ(pool_.ReserveWrites({&w, 1}, kBob).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(pool_.Find(5, kAlice)->lengths[0], 6);  // untouched
  EXPECT_TRUE(pool_.ListOwned(kBob).empty());
  ASSERT_EQ(pool_.ListOwned(kAlice).size(), 1u);
}

TEST_F(KvPoolOwnersTest, APageQuotaRefusesTheRequestThatWouldPassItAndChangesNothing) {
  pool_.SetQuotas(/*max_sequences=*/0, /*max_pages=*/3);
  ASSERT_TRUE(pool_.Create(1, kAlice, kAlicePrincipal).ok());
  ASSERT_TRUE(Grow(kAlice, 1, 8).ok());  // 2 pages
  const int64_t free_before = pool_.free_pages();
  const absl::Status s = Grow(kAlice, 1, 5);  // would need 2 more
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_NE(s.message().find("--max_pages_per_client"), absl::string_view::npos) << s;
  EXPECT_EQ(pool_.Find(1, kAlice)->lengths[0], 8);
  EXPECT_EQ(pool_.free_pages(), free_before);
  EXPECT_TRUE(Grow(kAlice, 1, 4).ok());  // exactly the third page
}

TEST_F(KvPoolOwnersTest, InstancesOfOnePrincipalShareItsPageQuota) {
  pool_.SetQuotas(0, 4);
  ASSERT_TRUE(pool_.Create(1, kAlice, kAlicePrincipal).ok());
  ASSERT_TRUE(pool_.Create(1, kAliceOther, kAlicePrincipal).ok());
  ASSERT_TRUE(Grow(kAlice, 1, 12).ok());  // 3 pages
  EXPECT_EQ(Grow(kAliceOther, 1, 8).code(), absl::StatusCode::kResourceExhausted);
  // Another principal has its own quota.
  ASSERT_TRUE(pool_.Create(1, kBob, kBobPrincipal).ok());
  EXPECT_TRUE(Grow(kBob, 1, 16).ok());
}

TEST_F(KvPoolOwnersTest, ForkedPagesCountOnceAndCopiesOnWriteCountAgain) {
  pool_.SetQuotas(0, 3);
  ASSERT_TRUE(pool_.Create(1, kAlice, kAlicePrincipal).ok());
  ASSERT_TRUE(Grow(kAlice, 1, 6).ok());  // 2 pages, the second half full
  ASSERT_TRUE(pool_.Fork(1, 2, kAlice).ok());
  EXPECT_EQ(pool_.UsageOf(kAlice).pages, 2);
  ASSERT_TRUE(Grow(kAlice, 2, 1).ok());  // copies the shared half-full page: 3 pages
  EXPECT_EQ(pool_.UsageOf(kAlice).pages, 3);
  // Sequence 1 alone holds its second page now; growing into a fourth page passes the quota.
  EXPECT_EQ(Grow(kAlice, 1, 3).code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(KvPoolOwnersTest, ASequenceQuotaRefusesCreateAndFork) {
  pool_.SetQuotas(/*max_sequences=*/2, 0);
  ASSERT_TRUE(pool_.Create(1, kAlice, kAlicePrincipal).ok());
  ASSERT_TRUE(pool_.Create(2, kAliceOther, kAlicePrincipal).ok());
  EXPECT_EQ(pool_.Create(3, kAlice, kAlicePrincipal).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool_.Fork(1, 4, kAlice).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool_.num_sequences(), 2);
  ASSERT_TRUE(pool_.Release(2, kAliceOther).ok());
  EXPECT_TRUE(pool_.Create(3, kAlice, kAlicePrincipal).ok());
}

TEST_F(KvPoolOwnersTest, ReleaseOwnerFreesEveryPageOfThatOwnerAndNoOtherOwners) {
  ASSERT_TRUE(pool_.Create(1, kAlice, kAlicePrincipal).ok());
  ASSERT_TRUE(pool_.Create(2, kAlice, kAlicePrincipal).ok());
  ASSERT_TRUE(pool_.Create(1, kBob, kBobPrincipal).ok());
  ASSERT_TRUE(Grow(kAlice, 1, 9).ok());
  ASSERT_TRUE(pool_.Fork(1, 3, kAlice).ok());
  ASSERT_TRUE(Grow(kAlice, 2, 4).ok());
  ASSERT_TRUE(Grow(kBob, 1, 5).ok());
  const OwnerUsage released = pool_.ReleaseOwner(kAlice);
  EXPECT_EQ(released.sequences, 3);
  EXPECT_EQ(released.pages, 4);  // 3 shared by the fork, 1 of sequence 2
  EXPECT_EQ(pool_.used_pages(), 2);  // Bob's
  EXPECT_EQ(pool_.Find(1, kBob)->lengths[0], 5);
  EXPECT_EQ(pool_.UsageOf(kAlice).sequences, 0);
}

}  // namespace
}  // namespace attnd
