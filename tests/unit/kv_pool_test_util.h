// Helpers shared by the kv_pool_test sources (tests of server/engine/kv_pool.h): the pool's
// invariants checked from its public view, a snapshot of everything a failed call must leave as it
// was, small append helpers, and the KvPoolTest fixture (a small pool whose invariants are checked
// when each test ends).
#ifndef ATTND_TESTS_UNIT_KV_POOL_TEST_UTIL_H_
#define ATTND_TESTS_UNIT_KV_POOL_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/str_join.h"
#include "server/engine/kv_pool.h"

namespace attnd::kv_pool_test_util {

using ::testing::AssertionFailure;
using ::testing::AssertionResult;
using ::testing::AssertionSuccess;

inline constexpr int kDevice = 3;

inline int64_t PagesFor(int64_t tokens, int64_t page_size) {
  return (tokens + page_size - 1) / page_size;
}

// The pool's invariants, from its public view:
//  - every page id is in [0, total) and no page table holds a page twice;
//  - a sequence holds exactly the pages its longest layer needs;
//  - owned pages + free pages == total (no page is lost, none is owned and free at once);
//  - SharedPages(seq) counts exactly the pages some other sequence also holds.
inline AssertionResult PoolIsConsistent(const KvPool& pool) {
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
inline AssertionResult FreeListIsDisjointFromOwnedPages(KvPool& pool, int64_t max_seq_len) {
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

inline Snapshot Snap(const KvPool& pool) {
  Snapshot s{pool.free_pages(), {}};
  for (const Sequence* seq : pool.List()) s.sequences[seq->id] = {seq->pages, seq->lengths};
  return s;
}

inline std::vector<int64_t> Lengths(const KvPool& pool, uint64_t id) {
  return pool.Find(id)->lengths;
}
inline std::vector<int32_t> Pages(const KvPool& pool, uint64_t id) { return pool.Find(id)->pages; }

// Appends n tokens to one sequence at one layer and returns the copies (must succeed).
inline std::vector<PageCopy> AppendOk(KvPool& pool, uint64_t id, int64_t layer, int64_t n) {
  std::vector<int64_t> starts;
  const AppendItem item{id, n};
  auto copies = pool.ReserveAppend(layer, {&item, 1}, &starts);
  EXPECT_TRUE(copies.ok()) << copies.status();
  return copies.ok() ? *copies : std::vector<PageCopy>{};
}

// Takes `pages` free pages into filler sequences (ids from 1000 up), each within max_seq_len.
inline void TakePages(KvPool& pool, int64_t pages, int64_t max_seq_len) {
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

}  // namespace attnd::kv_pool_test_util

#endif  // ATTND_TESTS_UNIT_KV_POOL_TEST_UTIL_H_
