// Randomized tests of server/engine/kv_pool.h: the pool driven by random operations and checked
// against a plain model after each one, and the free list checked disjoint from the owned pages.
// Each draws a fresh seed, printed and replayable with ATTND_TEST_SEED.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "server/engine/kv_pool.h"
#include "tests/unit/kv_pool_test_util.h"
#include "tests/unit/unit_test_util.h"

namespace attnd::kv_pool_test_util {
namespace {

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

}  // namespace
}  // namespace attnd::kv_pool_test_util
