// ClientRegistry: who a caller is, what its principal may hold, and when its lease runs out.
#include "server/engine/clients.h"

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"

namespace attnd {
namespace {

const absl::Time kT0 = absl::FromUnixSeconds(1000);
const absl::Duration kTimeout = absl::Seconds(10);

Caller Uid(uint32_t uid, std::string instance = "", uint64_t connection = 0) {
  return Caller{absl::StrCat("uid:", uid), std::move(instance), uid, connection};
}

TEST(ClientRegistryTest, TheSameCallerIsTheSameClientAndOthersAreNot) {
  ClientRegistry clients({});
  const ClientRef a = clients.Attach(Uid(1000), kT0);
  EXPECT_EQ(clients.Attach(Uid(1000), kT0).id, a.id);
  EXPECT_NE(clients.Attach(Uid(1001), kT0).id, a.id);
  const ClientRef a2 = clients.Attach(Uid(1000, "worker-2"), kT0);
  EXPECT_NE(a2.id, a.id);
  EXPECT_EQ(a2.principal, a.principal);
  EXPECT_NE(a.id, 0u);  // 0 is the in-process client
  EXPECT_EQ(a.uid, 1000u);
}

TEST(ClientRegistryTest, RegionQuotaIsPerPrincipalSoInstancesCannotMultiplyIt) {
  ClientRegistry clients(ClientQuotas{/*max_regions=*/2, /*max_region_bytes=*/0, 0});
  const ClientRef a = clients.Attach(Uid(1000, "x"), kT0);
  const ClientRef b = clients.Attach(Uid(1000, "y"), kT0);
  ASSERT_TRUE(clients.ReserveRegion(a, 10).ok());
  ASSERT_TRUE(clients.ReserveRegion(b, 10).ok());
  const absl::Status s = clients.ReserveRegion(b, 10);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(s.message().find("--max_regions_per_client"), absl::string_view::npos) << s;
  EXPECT_TRUE(clients.ReserveRegion(clients.Attach(Uid(1001), kT0), 10).ok());
  clients.ReleaseRegion(a, 10);
  EXPECT_TRUE(clients.ReserveRegion(b, 10).ok());
}

TEST(ClientRegistryTest, RegionBytesQuotaRefusesTheRegionThatWouldPassIt) {
  ClientRegistry clients(ClientQuotas{0, /*max_region_bytes=*/100, 0});
  const ClientRef a = clients.Attach(Uid(7), kT0);
  ASSERT_TRUE(clients.ReserveRegion(a, 60).ok());
  EXPECT_EQ(clients.ReserveRegion(a, 41).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(clients.ReserveRegion(a, 40).ok());
  EXPECT_EQ(clients.HoldingsOf(a.id).region_bytes, 100);
  EXPECT_EQ(clients.HoldingsOf(a.id).regions, 2);
}

TEST(ClientRegistryTest, EventQuotaRefusesPastTheLimit) {
  ClientRegistry clients(ClientQuotas{0, 0, /*max_events=*/1});
  const ClientRef a = clients.Attach(Uid(7), kT0);
  ASSERT_TRUE(clients.ReserveEvent(a).ok());
  EXPECT_EQ(clients.ReserveEvent(a).code(), absl::StatusCode::kResourceExhausted);
  clients.ReleaseEvent(a);
  EXPECT_TRUE(clients.ReserveEvent(a).ok());
}

TEST(ClientRegistryTest, ALeaseRunsOutTimeoutAfterTheLastCall) {
  ClientRegistry clients({});
  const ClientRef a = clients.Attach(Uid(7), kT0);
  EXPECT_TRUE(clients.TakeExpired(kT0 + kTimeout - absl::Seconds(1), kTimeout).empty());
  clients.Attach(Uid(7), kT0 + absl::Seconds(5));  // renewed
  EXPECT_TRUE(clients.TakeExpired(kT0 + kTimeout + absl::Seconds(1), kTimeout).empty());
  auto expired = clients.TakeExpired(kT0 + absl::Seconds(15), kTimeout);
  ASSERT_EQ(expired.size(), 1u);
  EXPECT_EQ(expired[0].ref.id, a.id);
  EXPECT_EQ(expired[0].name, "uid:7");
  // Forgotten: the same caller is a fresh client now.
  EXPECT_NE(clients.Attach(Uid(7), kT0 + absl::Seconds(16)).id, a.id);
}

TEST(ClientRegistryTest, AnOpenStreamKeepsTheLeaseUntilItCloses) {
  ClientRegistry clients({});
  const ClientRef a = clients.Attach(Uid(7), kT0);
  clients.StreamOpened(a.id);
  EXPECT_TRUE(clients.TakeExpired(kT0 + absl::Hours(1), kTimeout).empty());
  clients.StreamClosed(a.id, kT0 + absl::Hours(1));
  EXPECT_TRUE(clients.TakeExpired(kT0 + absl::Hours(1) + absl::Seconds(9), kTimeout).empty());
  EXPECT_EQ(clients.TakeExpired(kT0 + absl::Hours(1) + kTimeout, kTimeout).size(), 1u);
}

TEST(ClientRegistryTest, AConnectionKeepsTheLeaseUntilItEnds) {
  ClientRegistry clients({});
  clients.Attach(Uid(7, "", /*connection=*/42), kT0);
  EXPECT_TRUE(clients.TakeExpired(kT0 + absl::Hours(1), kTimeout).empty());
  clients.ConnectionClosed(/*connection=*/41, kT0 + absl::Hours(1));  // another one
  EXPECT_TRUE(clients.TakeExpired(kT0 + absl::Hours(2), kTimeout).empty());
  clients.ConnectionClosed(42, kT0 + absl::Hours(2));
  EXPECT_TRUE(clients.TakeExpired(kT0 + absl::Hours(2) + absl::Seconds(1), kTimeout).empty());
  EXPECT_EQ(clients.TakeExpired(kT0 + absl::Hours(2) + kTimeout, kTimeout).size(), 1u);
}

}  // namespace
}  // namespace attnd
