// Tests of server/engine/kv_pool.h: the page-table epoch, which changes exactly when some page
// table changes (it lets the CUDA graph path keep page ids it already uploaded).
#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <random>
#include <vector>

#include "server/engine/kv_pool.h"
#include "tests/unit/kv_pool_test_util.h"

namespace attnd::kv_pool_test_util {
namespace {

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
}  // namespace attnd::kv_pool_test_util
