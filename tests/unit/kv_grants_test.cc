// Grants: an unguessable id; pulls open and close against it; the hold comes back exactly once,
// when the grant has ended and no pull of it is open.
#include "server/engine/kv_grants.h"

#include "gtest/gtest.h"

namespace attnd {
namespace {

const absl::Time kNow = absl::FromUnixSeconds(1000000);

KvGrantSpec Spec(uint32_t owner = 1, uint32_t max_pulls = 0, absl::Duration ttl = absl::Seconds(60)) {
  KvGrantSpec s;
  s.owner = owner;
  s.device_index = 0;
  s.seq_id = 5;
  s.num_tokens = 20;
  s.pages = {4, 7};
  s.expires = kNow + ttl;
  s.max_pulls = max_pulls;
  return s;
}

TEST(KvGrantsTest, IdsAreSixteenRandomBytesAndDiffer) {
  KvGrants g;
  auto a = g.Add(Spec());
  auto b = g.Add(Spec());
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->size(), 16u);
  EXPECT_NE(*a, *b);
}

TEST(KvGrantsTest, APullSeesTheHeldPagesAndAtMostTheGrantedTokens) {
  KvGrants g;
  auto id = g.Add(Spec());
  ASSERT_TRUE(id.ok());
  auto pull = g.Open(*id, 0, kNow, kNow + absl::Seconds(5));
  ASSERT_TRUE(pull.ok());
  EXPECT_EQ(pull->num_tokens, 20);
  EXPECT_EQ(pull->pages, (std::vector<int32_t>{4, 7}));
  EXPECT_EQ(g.Open(*id, 21, kNow, kNow).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(g.Open(std::string(16, 'z'), 1, kNow, kNow).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(KvGrantsTest, TheHoldComesBackAfterTheLastAllowedPullCloses) {
  KvGrants g;
  auto id = g.Add(Spec(1, /*max_pulls=*/2));
  auto p1 = g.Open(*id, 0, kNow, kNow + absl::Seconds(5));
  auto p2 = g.Open(*id, 0, kNow, kNow + absl::Seconds(5));
  ASSERT_TRUE(p1.ok() && p2.ok());
  EXPECT_EQ(g.Open(*id, 0, kNow, kNow).status().code(), absl::StatusCode::kResourceExhausted);
  auto e1 = g.Close(p1->pull_id, true);
  ASSERT_TRUE(e1.ok());
  EXPECT_TRUE(e1->empty());
  auto e2 = g.Close(p2->pull_id, true);
  ASSERT_TRUE(e2.ok());
  ASSERT_EQ(e2->size(), 1u);
  EXPECT_EQ((*e2)[0].pages, (std::vector<int32_t>{4, 7}));
  EXPECT_EQ(g.num_grants(), 0);
  EXPECT_EQ(g.Close(p2->pull_id, true).status().code(), absl::StatusCode::kNotFound);
}

TEST(KvGrantsTest, AFailedPullDoesNotUseUpTheGrant) {
  KvGrants g;
  auto id = g.Add(Spec(1, /*max_pulls=*/1));
  auto p1 = g.Open(*id, 0, kNow, kNow + absl::Seconds(5));
  ASSERT_TRUE(g.Close(p1->pull_id, /*completed=*/false).ok());
  EXPECT_TRUE(g.Open(*id, 0, kNow, kNow + absl::Seconds(5)).ok());
}

TEST(KvGrantsTest, ARevokedGrantKeepsItsPagesUntilItsOpenPullCloses) {
  KvGrants g;
  auto id = g.Add(Spec(1));
  auto p = g.Open(*id, 0, kNow, kNow + absl::Seconds(5));
  EXPECT_EQ(g.Revoke(2, *id).status().code(), absl::StatusCode::kNotFound);  // not the owner
  auto revoked = g.Revoke(1, *id);
  ASSERT_TRUE(revoked.ok());
  EXPECT_TRUE(revoked->empty());
  EXPECT_EQ(g.Open(*id, 0, kNow, kNow).status().code(), absl::StatusCode::kNotFound);
  auto closed = g.Close(p->pull_id, true);
  ASSERT_TRUE(closed.ok());
  EXPECT_EQ(closed->size(), 1u);
}

TEST(KvGrantsTest, SweepEndsExpiredGrantsAndPullsPastTheirDeadline) {
  KvGrants g;
  auto short_lived = g.Add(Spec(1, 0, absl::Seconds(1)));
  auto long_lived = g.Add(Spec(1, 0, absl::Seconds(100)));
  auto p = g.Open(*long_lived, 0, kNow, kNow + absl::Seconds(2));
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(g.Sweep(kNow + absl::Seconds(1)).size(), 1u);  // the short grant
  EXPECT_EQ(g.num_open_pulls(), 1);
  EXPECT_TRUE(g.Sweep(kNow + absl::Seconds(3)).empty());  // the stale pull closes; grant lives
  EXPECT_EQ(g.num_open_pulls(), 0);
  EXPECT_EQ(g.Sweep(kNow + absl::Seconds(100)).size(), 1u);
  EXPECT_EQ(g.num_grants(), 0);
}

TEST(KvGrantsTest, AnOwnersGrantsEndWithItsLease) {
  KvGrants g;
  ASSERT_TRUE(g.Add(Spec(1)).ok());
  ASSERT_TRUE(g.Add(Spec(1)).ok());
  ASSERT_TRUE(g.Add(Spec(2)).ok());
  EXPECT_EQ(g.RevokeOwner(1).size(), 2u);
  EXPECT_EQ(g.num_grants(), 1);
}

}  // namespace
}  // namespace attnd
