// Engine sequence calls: fork, truncate and release, and the regions finished requests hold;
// every output still checked against the dense fp64 reference (see engine_test_fixture.h).
#include "tests/unit/engine_test_fixture.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

namespace attnd::engine_test {
namespace {

// ---- Fork ----

TEST_P(EngineTest, ForkThenDifferentContinuationsInParentAndChildEachMatchTheirOwnHistory) {
  FragmentPool();
  Create(1);
  PrefillAll({{1, 19}});
  const uint64_t free_before = FreePages();
  const v1::SequenceInfo child = Fork(1, 2);
  EXPECT_EQ(FreePages(), free_before);  // a fork takes no page
  EXPECT_EQ(child.layer_lengths(0), 19u);
  EXPECT_EQ(child.num_pages(), static_cast<uint64_t>(PagesFor(19)));
  EXPECT_EQ(child.shared_pages(), child.num_pages());
  // Parent and child both write into their shared partial page in one batch, then diverge.
  for (int step = 0; step < 3; ++step) DecodeAll({1, 2});
  Prefill(0, {{2, 6}});
  Prefill(1, {{2, 6}});
  DecodeAll({2, 1});
  // Only the pages that were full at the fork stay shared.
  EXPECT_EQ(Get(1).shared_pages(), static_cast<uint64_t>(19 / model().page_size));
  EXPECT_EQ(Get(2).shared_pages(), static_cast<uint64_t>(19 / model().page_size));
  ExpectLengths(1, 23, 23);
  ExpectLengths(2, 29, 29);
}

TEST_P(EngineTest, ReleasingTheParentLeavesTheForkIntact) {
  FragmentPool();
  Create(1);
  PrefillAll({{1, 21}});
  Fork(1, 2);
  DecodeAll({1});
  ASSERT_TRUE(Release(1).ok());
  EXPECT_EQ(Get(2).shared_pages(), 0u);
  DecodeAll({2});
  Prefill(0, {{2, 5}});
}

// ---- Truncate ----

TEST_P(EngineTest, TruncateThenDecodeMatchesTheTruncatedHistory) {
  FragmentPool();
  Create(1);
  Create(2);
  PrefillAll({{1, 37}, {2, 9}});
  const uint64_t free_before = FreePages();
  const v1::SequenceInfo info = Truncate(1, 20);
  EXPECT_EQ(info.layer_lengths(0), 20u);
  EXPECT_EQ(info.layer_lengths(1), 20u);
  EXPECT_EQ(info.num_pages(), static_cast<uint64_t>(PagesFor(20)));
  EXPECT_EQ(FreePages(), free_before + (PagesFor(37) - PagesFor(20)));
  for (int step = 0; step < 3; ++step) DecodeAll({2, 1});
  Prefill(0, {{1, 4}});
  Prefill(1, {{1, 4}});
  // Back to a single token, then grow again.
  Truncate(1, 1);
  DecodeAll({1, 2});
  ExpectLengths(1, 2, 2);
}

TEST_P(EngineTest, TruncateOfAForkLeavesTheParentIntact) {
  FragmentPool();
  Create(1);
  PrefillAll({{1, 30}});
  Fork(1, 2);
  Truncate(2, 11);
  DecodeAll({1, 2});
  Prefill(0, {{2, 13}, {1, 2}});
  Prefill(1, {{1, 2}, {2, 13}});
  DecodeAll({2, 1});
}

// ---- Sequences and regions ----

TEST_P(EngineTest, ReleasingEverySequenceReturnsEveryPage) {
  const uint64_t total = FreePages();
  FragmentPool();
  for (uint64_t id = 1; id <= 3; ++id) Create(id);
  PrefillAll({{1, 5}, {2, 40}, {3, 1}});
  Fork(2, 4);
  DecodeAll({4, 2});
  EXPECT_LT(FreePages(), total);
  v1::ListSequencesRequest list_req;
  v1::ListSequencesResponse list;
  ASSERT_TRUE(Await([&](Engine::Done d) { wire_->ListSequences(list_req, &list, std::move(d)); }).ok());
  std::vector<uint64_t> ids;
  for (const v1::SequenceInfo& s : list.sequences()) ids.push_back(s.seq_id());
  for (uint64_t id : ids) ASSERT_TRUE(Release(id).ok()) << id;
  EXPECT_EQ(FreePages(), total);
  v1::ServerInfo info;
  wire_->GetServerInfo(&info);
  EXPECT_EQ(info.devices(0).live_sequences(), 0u);
}

TEST_P(EngineTest, FinishedRequestsHoldNoRegion) {
  Create(1);
  PrefillAll({{1, 3}});
  Decode(0, {1});
  // One more call through the worker, so everything the earlier tasks held is surely gone.
  Get(1);
  v1::ListRegionsResponse regions;
  wire_->ListRegions(&regions);
  ASSERT_EQ(regions.regions_size(), 1);
  EXPECT_EQ(regions.regions(0).name(), kRegion);
  EXPECT_EQ(regions.regions(0).in_flight(), 0u);
  EXPECT_EQ(regions.regions(0).byte_size(), kShmBytes);
  EXPECT_EQ(regions.regions(0).shm_key(), shm_->key());
}

}  // namespace
}  // namespace attnd::engine_test
