// The byte runs a KV pull copies: positions [0, num_tokens) of a head range of some layers,
// from a source pool's pages to a destination pool's pages, as (source offset, destination
// offset, bytes) runs, adjacent runs merged. Plain C++ (no UCX, no device): the transport moves
// the runs; this decides them, so the request count is tested here.
#ifndef ATTND_SERVER_ENGINE_KV_RUNS_H_
#define ATTND_SERVER_ENGINE_KV_RUNS_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/paged_kv.h"
#include "server/platform/page_copy.h"  // PageRun

namespace attnd {

// What a pull copies. The destination's heads are [0, head_end - head_begin) and its layers
// [dst_layer_begin, dst_layer_begin + layer_end - layer_begin).
struct KvPullShape {
  int64_t layer_begin = 0, layer_end = 0;  // source layers
  int64_t dst_layer_begin = 0;
  int64_t head_begin = 0, head_end = 0;    // source kv heads
  int64_t num_tokens = 0;
};

// Checks that the two pools can exchange pages byte for byte (same page size, head dim, dtype,
// storage and layout; the destination holds exactly the pulled heads) and that the shape fits
// both. Messages name the field and both sides' values.
absl::Status CheckPullCompatible(const kernels::KvCacheShape& src,
                                 const kernels::KvCacheShape& dst, const KvPullShape& pull);

// fp8 pools with per-layer scales: the bytes of a pull move raw, so they mean the same on both
// sides only where the destination's scales equal the source's, bitwise. src holds the source's
// scales of layers [src_layer_begin, src_layer_begin + src.size()), which land at
// dst_layer_begin on; dst holds every layer's of the destination's device. FAILED_PRECONDITION naming "k_scale" or "v_scale",
// both layers and both values.
absl::Status CheckPullScales(absl::Span<const kernels::KvScales> src, int64_t src_layer_begin,
                             absl::Span<const kernels::KvScales> dst, int64_t dst_layer_begin);

// The runs, in (layer, page, K/V) order, each contiguous on both sides; a run never crosses a
// token the pull does not copy (the last page's slots past num_tokens stay behind). src_pages
// and dst_pages are the page ids of positions [0, num_tokens), page_size positions each.
// Per-token pools (TokenScales()): after the K/V runs, the pulled heads' scales in the same
// order, from the scales after the pages: one run per (layer, page, K/V) for a full page (its
// heads' scales are [head][slot], so a head range is contiguous), one per head for the last,
// partial page.
absl::StatusOr<std::vector<PageRun>> PlanPullRuns(const kernels::KvCacheShape& src,
                                                  const kernels::KvCacheShape& dst,
                                                  const KvPullShape& pull,
                                                  absl::Span<const int32_t> src_pages,
                                                  absl::Span<const int32_t> dst_pages);

}  // namespace attnd

#endif  // ATTND_SERVER_ENGINE_KV_RUNS_H_
