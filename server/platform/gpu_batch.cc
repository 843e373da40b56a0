#include "server/platform/gpu_batch.h"

#include <algorithm>

namespace attnd {

void BuildGpuBatch(absl::Span<const BatchEntry> entries, int64_t page_size, GpuBatch* batch,
                   int32_t* indices_out, int64_t* slots_out, bool skip_indices) {
  batch->qo_indptr.assign(1, 0);
  batch->kv_indptr.assign(1, 0);
  batch->kv_indices.clear();
  batch->kv_len.clear();
  batch->slot_mapping.clear();
  batch->all_single_token = true;
  int64_t num_indices = 0, num_slots = 0;
  for (const BatchEntry& e : entries) {
    const int64_t len = e.start + e.num_new;
    const int64_t pages = (len + page_size - 1) / page_size;
    if (skip_indices) {
      // The caller already holds these ids.
    } else if (indices_out != nullptr) {
      std::copy(e.page_table.begin(), e.page_table.begin() + pages, indices_out + num_indices);
    } else {
      batch->kv_indices.insert(batch->kv_indices.end(), e.page_table.begin(),
                               e.page_table.begin() + pages);
    }
    num_indices += pages;
    batch->kv_indptr.push_back(static_cast<int32_t>(num_indices));
    batch->kv_len.push_back(static_cast<int32_t>(len));
    batch->qo_indptr.push_back(batch->qo_indptr.back() + static_cast<int32_t>(e.num_new));
    for (int64_t p = e.start; p < len; ++p) {
      const int64_t slot =
          int64_t{e.page_table[static_cast<size_t>(p / page_size)]} * page_size + p % page_size;
      if (slots_out != nullptr) {
        slots_out[num_slots] = slot;
      } else {
        batch->slot_mapping.push_back(slot);
      }
      ++num_slots;
    }
    batch->all_single_token = batch->all_single_token && e.num_new == 1;
  }
}

void BuildBatchShape(absl::Span<const int64_t> starts, absl::Span<const int64_t> num_new,
                     int64_t page_size, size_t padded_size, GpuBatch* shape) {
  const size_t n = starts.size();
  const size_t size = std::max(n, padded_size);
  shape->qo_indptr.resize(size + 1);
  shape->kv_indptr.resize(size + 1);
  shape->kv_len.resize(size);
  shape->kv_indices.clear();
  shape->slot_mapping.clear();
  shape->qo_indptr[0] = 0;
  shape->kv_indptr[0] = 0;
  bool single = true;
  for (size_t i = 0; i < n; ++i) {
    const int64_t len = starts[i] + num_new[i];
    shape->kv_len[i] = static_cast<int32_t>(len);
    shape->qo_indptr[i + 1] = shape->qo_indptr[i] + static_cast<int32_t>(num_new[i]);
    shape->kv_indptr[i + 1] =
        shape->kv_indptr[i] + static_cast<int32_t>((len + page_size - 1) / page_size);
    single = single && num_new[i] == 1;
  }
  std::fill(shape->kv_len.begin() + n, shape->kv_len.end(), 0);
  std::fill(shape->qo_indptr.begin() + n + 1, shape->qo_indptr.end(), shape->qo_indptr[n]);
  std::fill(shape->kv_indptr.begin() + n + 1, shape->kv_indptr.end(), shape->kv_indptr[n]);
  shape->all_single_token = single;
}

}  // namespace attnd
