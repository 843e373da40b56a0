#include "server/gpu_batch.h"

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

}  // namespace attnd
