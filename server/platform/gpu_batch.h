// The host-side arrays a GPU launch reads for one data batch: the CSR page table, each
// request's length after the append, ragged query offsets, and the pool slot of every new
// token. Plain C++ so CI tests it; the CUDA backend plans from these and copies them to the
// device.
#ifndef ATTND_SERVER_PLATFORM_GPU_BATCH_H_
#define ATTND_SERVER_PLATFORM_GPU_BATCH_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"
#include "server/platform/backend.h"

namespace attnd {

struct GpuBatch {
  std::vector<int32_t> qo_indptr;     // [batch + 1]: new-token rows of each request
  std::vector<int32_t> kv_indptr;     // [batch + 1]: offsets into kv_indices
  std::vector<int32_t> kv_indices;    // pages of [0, kv_len) of each request, in order
  std::vector<int32_t> kv_len;        // [batch]: start + num_new
  std::vector<int64_t> slot_mapping;  // [total new]: page * page_size + slot of each new token
  bool all_single_token = true;       // every request brings exactly one token (decode)
};

// With `indices_out` / `slots_out`, the page ids / new-token slots go there instead of into
// batch->kv_indices / batch->slot_mapping (which stay empty): the CUDA graph path writes them
// straight into its pinned argument block, saving a copy of every page id per call. With
// `skip_indices` the page ids are written nowhere (the caller still holds them).
void BuildGpuBatch(absl::Span<const BatchEntry> entries, int64_t page_size, GpuBatch* batch,
                   int32_t* indices_out = nullptr, int64_t* slots_out = nullptr,
                   bool skip_indices = false);

// What a plan is made from, known before any page is reserved: the qo_indptr, kv_indptr and
// kv_len BuildGpuBatch writes for entries with these starts and new-token counts, followed by
// `padded_size - starts.size()` empty entries (no queries, keys or pages: the padding of a
// graph's batch bucket). kv_indices and slot_mapping are left empty; all_single_token speaks
// of the real entries only.
void BuildBatchShape(absl::Span<const int64_t> starts, absl::Span<const int64_t> num_new,
                     int64_t page_size, size_t padded_size, GpuBatch* shape);

}  // namespace attnd

#endif  // ATTND_SERVER_PLATFORM_GPU_BATCH_H_
