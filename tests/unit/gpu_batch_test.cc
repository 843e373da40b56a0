#include "server/platform/gpu_batch.h"

#include <random>

#include "gtest/gtest.h"

namespace attnd {
namespace {

TEST(GpuBatchTest, PageTableSlotsAndOffsetsFollowEachEntry) {
  // Two requests, page size 4: one grows 6 -> 9 across a page boundary, one is new (0 -> 2).
  const std::vector<int32_t> pages_a = {7, 3, 9};
  const std::vector<int32_t> pages_b = {5};
  const std::vector<BatchEntry> entries = {{pages_a, 6, 3}, {pages_b, 0, 2}};
  GpuBatch b;
  BuildGpuBatch(entries, 4, &b);
  EXPECT_EQ(b.qo_indptr, (std::vector<int32_t>{0, 3, 5}));
  EXPECT_EQ(b.kv_len, (std::vector<int32_t>{9, 2}));
  EXPECT_EQ(b.kv_indptr, (std::vector<int32_t>{0, 3, 4}));
  EXPECT_EQ(b.kv_indices, (std::vector<int32_t>{7, 3, 9, 5}));
  // positions 6, 7 in page 3 (slots 2, 3), position 8 in page 9 (slot 0); then page 5 slots 0, 1.
  EXPECT_EQ(b.slot_mapping, (std::vector<int64_t>{3 * 4 + 2, 3 * 4 + 3, 9 * 4 + 0, 5 * 4, 5 * 4 + 1}));
  EXPECT_FALSE(b.all_single_token);
}

TEST(GpuBatchTest, RandomBatchesMatchAPositionByPositionModelInVectorsOrCallerBuffers) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  for (int round = 0; round < 200; ++round) {
    const int64_t page_size = 1 + static_cast<int64_t>(rng() % 64);
    const int n = 1 + static_cast<int>(rng() % 8);
    std::vector<std::vector<int32_t>> tables(n);
    std::vector<BatchEntry> entries;
    for (int i = 0; i < n; ++i) {
      const int64_t start = static_cast<int64_t>(rng() % 300);
      const int64_t num_new = 1 + static_cast<int64_t>(rng() % 50);
      // A page table with spare pages past the length, as a sequence's table may have.
      const int64_t pages = (start + num_new + page_size - 1) / page_size + static_cast<int64_t>(rng() % 3);
      for (int64_t p = 0; p < pages; ++p) tables[i].push_back(static_cast<int32_t>(rng() % 100000));
      entries.push_back({tables[i], start, num_new});
    }
    GpuBatch b;
    BuildGpuBatch(entries, page_size, &b);
    size_t token = 0;
    for (int i = 0; i < n; ++i) {
      const BatchEntry& e = entries[i];
      ASSERT_EQ(b.kv_len[i], e.start + e.num_new);
      ASSERT_EQ(b.qo_indptr[i + 1] - b.qo_indptr[i], e.num_new);
      ASSERT_EQ(b.kv_indptr[i + 1] - b.kv_indptr[i], (b.kv_len[i] + page_size - 1) / page_size);
      for (int64_t pos = 0; pos < b.kv_len[i]; ++pos)
        ASSERT_EQ(b.kv_indices[b.kv_indptr[i] + pos / page_size], tables[i][pos / page_size]);
      for (int64_t pos = e.start; pos < e.start + e.num_new; ++pos, ++token)
        ASSERT_EQ(b.slot_mapping[token], int64_t{tables[i][pos / page_size]} * page_size + pos % page_size);
    }
    ASSERT_EQ(token, b.slot_mapping.size());

    // Into caller buffers (the graph path's pinned block): the same ids and slots, no vectors.
    std::vector<int32_t> ids(b.kv_indices.size() + 1, -7);
    std::vector<int64_t> slots(b.slot_mapping.size() + 1, -7);
    GpuBatch out;
    BuildGpuBatch(entries, page_size, &out, ids.data(), slots.data());
    ASSERT_TRUE(out.kv_indices.empty());
    ASSERT_TRUE(out.slot_mapping.empty());
    ASSERT_EQ(out.kv_indptr, b.kv_indptr);
    ASSERT_EQ(out.kv_len, b.kv_len);
    ASSERT_EQ(out.qo_indptr, b.qo_indptr);
    ASSERT_EQ(std::vector<int32_t>(ids.begin(), ids.end() - 1), b.kv_indices);
    ASSERT_EQ(std::vector<int64_t>(slots.begin(), slots.end() - 1), b.slot_mapping);
    ASSERT_EQ(ids.back(), -7) << "nothing written past the batch's page ids";
    ASSERT_EQ(slots.back(), -7);
  }
}

TEST(GpuBatchTest, ABatchOfSingleTokensIsADecode) {
  const std::vector<int32_t> pages = {1, 2};
  GpuBatch b;
  BuildGpuBatch(std::vector<BatchEntry>{{pages, 16, 1}, {pages, 3, 1}}, 16, &b);
  EXPECT_TRUE(b.all_single_token);
}

// A plan is made from the shape before pages are reserved, and the launch then uses the batch
// built from the page tables: both must agree on every offset and length the plan reads.
TEST(GpuBatchTest, TheShapeBeforeReservingIsTheBatchsShapePlusEmptyPadding) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  GpuBatch shape;  // reused across rounds, as the backend reuses its own
  for (int round = 0; round < 200; ++round) {
    const int64_t page_size = 1 + static_cast<int64_t>(rng() % 64);
    const size_t n = 1 + rng() % 8;
    const size_t padded = n + (rng() % 2 == 0 ? 0 : rng() % 9);
    std::vector<std::vector<int32_t>> tables(n);
    std::vector<BatchEntry> entries;
    std::vector<int64_t> starts, num_new;
    for (size_t i = 0; i < n; ++i) {
      starts.push_back(static_cast<int64_t>(rng() % 300));
      num_new.push_back(round % 3 == 0 ? 1 : 1 + static_cast<int64_t>(rng() % 50));
      const int64_t pages = (starts[i] + num_new[i] + page_size - 1) / page_size;
      tables[i].assign(static_cast<size_t>(pages), 0);
      entries.push_back({tables[i], starts[i], num_new[i]});
    }
    GpuBatch b;
    BuildGpuBatch(entries, page_size, &b);
    BuildBatchShape(starts, num_new, page_size, padded, &shape);
    ASSERT_EQ(shape.kv_len.size(), padded);
    ASSERT_EQ(std::vector<int32_t>(shape.kv_len.begin(), shape.kv_len.begin() + n), b.kv_len);
    ASSERT_EQ(std::vector<int32_t>(shape.kv_indptr.begin(), shape.kv_indptr.begin() + n + 1),
              b.kv_indptr);
    ASSERT_EQ(std::vector<int32_t>(shape.qo_indptr.begin(), shape.qo_indptr.begin() + n + 1),
              b.qo_indptr);
    for (size_t i = n; i < padded; ++i) {
      ASSERT_EQ(shape.kv_len[i], 0) << "padding has no keys";
      ASSERT_EQ(shape.kv_indptr[i + 1], b.kv_indptr.back()) << "padding has no pages";
      ASSERT_EQ(shape.qo_indptr[i + 1], b.qo_indptr.back()) << "padding has no queries";
    }
    ASSERT_EQ(shape.all_single_token, b.all_single_token);
    ASSERT_TRUE(shape.kv_indices.empty());
    ASSERT_TRUE(shape.slot_mapping.empty());
  }
}

}  // namespace
}  // namespace attnd
