#include "server/engine/kv_runs.h"

#include <algorithm>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/config/config.h"

namespace attnd {
namespace {

using kernels::KvCacheShape;
using kernels::KvLayout;

const char* LayoutName(KvLayout l) { return l == KvLayout::kNHD ? "NHD" : "HND"; }
// A pool's storage as its --kv_cache_dtype value names it (the model dtype in words).
const char* StorageName(kernels::KvStorage s) {
  return s == kernels::KvStorage::kModelDType ? "the model dtype" : KvCacheDTypeFlagValue(s);
}

bool SameBits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

class RunList {
 public:
  explicit RunList(std::vector<PageRun>* runs) : runs_(runs) {}
  // Appends a run, merged into the last one where both sides continue it.
  void Add(uint64_t src, uint64_t dst, uint64_t bytes) {
    if (!runs_->empty()) {
      PageRun& last = runs_->back();
      if (last.src_offset + last.bytes == src && last.dst_offset + last.bytes == dst) {
        last.bytes += bytes;
        return;
      }
    }
    runs_->push_back({src, dst, bytes});
  }

 private:
  std::vector<PageRun>* runs_;
};

absl::Status CheckPages(absl::Span<const int32_t> pages, int64_t needed, int64_t num_pages,
                        const char* side) {
  if (static_cast<int64_t>(pages.size()) < needed)
    return absl::InvalidArgumentError(absl::StrCat(side, " pages: ", pages.size(), " given, ",
                                                   needed, " needed"));
  for (int64_t i = 0; i < needed; ++i) {
    if (pages[i] < 0 || pages[i] >= num_pages)
      return absl::InvalidArgumentError(absl::StrCat(side, " pages[", i, "]: page ", pages[i],
                                                     " is outside the pool's ", num_pages));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckPullCompatible(const KvCacheShape& src, const KvCacheShape& dst,
                                 const KvPullShape& pull) {
  if (src.page_size != dst.page_size)
    return absl::FailedPreconditionError(absl::StrCat(
        "page_size: the source's pages hold ", src.page_size, " tokens, this server's ",
        dst.page_size, "; pulls between different page sizes are not supported"));
  if (src.head_dim != dst.head_dim)
    return absl::FailedPreconditionError(absl::StrCat("head_dim: the source's is ", src.head_dim,
                                                      ", this server's ", dst.head_dim));
  if (src.dtype != dst.dtype)
    return absl::FailedPreconditionError(
        "dtype: the source's KV dtype differs from this server's; pulls do not convert dtypes");
  if (src.storage != dst.storage)
    return absl::FailedPreconditionError(absl::StrCat(
        "kv_cache_dtype: the source's pool stores ", StorageName(src.storage), ", this server's ",
        StorageName(dst.storage), "; pulls do not convert"));
  if (src.layout != dst.layout)
    return absl::FailedPreconditionError(absl::StrCat(
        "kv_layout: the source's pool is ", LayoutName(src.layout), ", this server's ",
        LayoutName(dst.layout), "; pulls do not convert layouts"));
  if (pull.layer_begin < 0 || pull.layer_begin >= pull.layer_end ||
      pull.layer_end > src.num_layers)
    return absl::InvalidArgumentError(absl::StrCat(
        "layer_begin, layer_end: [", pull.layer_begin, ", ", pull.layer_end,
        ") is not a non-empty range of the source's ", src.num_layers, " layers"));
  if (pull.dst_layer_begin < 0 ||
      pull.dst_layer_begin + (pull.layer_end - pull.layer_begin) > dst.num_layers)
    return absl::InvalidArgumentError(absl::StrCat(
        "dst_layer_begin: ", pull.dst_layer_begin, " + ", pull.layer_end - pull.layer_begin,
        " layers exceeds this server's ", dst.num_layers, " layers"));
  if (pull.head_begin < 0 || pull.head_begin >= pull.head_end ||
      pull.head_end > src.num_kv_heads)
    return absl::InvalidArgumentError(absl::StrCat(
        "head_begin, head_end: [", pull.head_begin, ", ", pull.head_end,
        ") is not a non-empty range of the source's ", src.num_kv_heads, " kv heads"));
  if (pull.head_end - pull.head_begin != dst.num_kv_heads)
    return absl::InvalidArgumentError(absl::StrCat(
        "head_begin, head_end: a pull brings ", pull.head_end - pull.head_begin,
        " kv heads; this server's model has ", dst.num_kv_heads));
  if (pull.num_tokens <= 0)
    return absl::InvalidArgumentError("num_tokens: a pull copies at least one token");
  return absl::OkStatus();
}

absl::Status CheckPullScales(absl::Span<const kernels::KvScales> src, int64_t src_layer_begin,
                             absl::Span<const kernels::KvScales> dst, int64_t dst_layer_begin) {
  if (dst_layer_begin < 0 || dst_layer_begin + static_cast<int64_t>(src.size()) >
                                 static_cast<int64_t>(dst.size()))
    return absl::InvalidArgumentError(absl::StrCat(
        "dst_layer_begin: ", dst_layer_begin, " + ", src.size(), " layers exceeds this server's ",
        dst.size(), " layers"));
  for (size_t i = 0; i < src.size(); ++i) {
    const kernels::KvScales s = src[i];
    const kernels::KvScales d = dst[dst_layer_begin + static_cast<int64_t>(i)];
    const bool k_differs = !SameBits(s.k, d.k);
    if (!k_differs && SameBits(s.v, d.v)) continue;
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: the source's layer %d has %.9g, this server's layer %d has %.9g; fp8 KV moves raw, "
        "so set this server's scales to the source's (SetKvScales) before pulling",
        k_differs ? "k_scale" : "v_scale", src_layer_begin + static_cast<int64_t>(i),
        k_differs ? s.k : s.v, dst_layer_begin + static_cast<int64_t>(i), k_differs ? d.k : d.v));
  }
  return absl::OkStatus();
}

namespace {

// The per-token scales of the pulled heads and tokens: per (layer, page, K/V), the heads' first
// `rows` slots, [head][slot] on both sides (the destination's heads are [0, heads)).
void AddScaleRuns(const KvCacheShape& src, const KvCacheShape& dst, const KvPullShape& pull,
                  absl::Span<const int32_t> src_pages, absl::Span<const int32_t> dst_pages,
                  RunList& list) {
  const int64_t ps = src.page_size;
  const int64_t num_pages = (pull.num_tokens + ps - 1) / ps;
  const int64_t heads = pull.head_end - pull.head_begin;
  const uint64_t src_base = static_cast<uint64_t>(src.ScalesByteOffset());
  const uint64_t dst_base = static_cast<uint64_t>(dst.ScalesByteOffset());
  for (int64_t layer = pull.layer_begin; layer < pull.layer_end; ++layer) {
    const int64_t dst_layer = pull.dst_layer_begin + (layer - pull.layer_begin);
    for (int64_t i = 0; i < num_pages; ++i) {
      const int64_t rows = std::min(ps, pull.num_tokens - i * ps);
      for (int kv = 0; kv < 2; ++kv) {
        const auto s = [&](int64_t head) {
          return src_base + 4 * src.ScaleOffset(layer, src_pages[i], kv, 0, head);
        };
        const auto d = [&](int64_t head) {
          return dst_base + 4 * dst.ScaleOffset(dst_layer, dst_pages[i], kv, 0, head);
        };
        if (rows == ps) {  // a full page: the head range's slots are contiguous
          list.Add(s(pull.head_begin), d(0), 4 * heads * ps);
        } else {  // the last page: each head's first `rows` slots
          for (int64_t h = 0; h < heads; ++h) list.Add(s(pull.head_begin + h), d(h), 4 * rows);
        }
      }
    }
  }
}

}  // namespace

absl::StatusOr<std::vector<PageRun>> PlanPullRuns(const KvCacheShape& src,
                                                  const KvCacheShape& dst,
                                                  const KvPullShape& pull,
                                                  absl::Span<const int32_t> src_pages,
                                                  absl::Span<const int32_t> dst_pages) {
  if (absl::Status s = CheckPullCompatible(src, dst, pull); !s.ok()) return s;
  const int64_t ps = src.page_size;
  const int64_t num_pages = (pull.num_tokens + ps - 1) / ps;
  if (absl::Status s = CheckPages(src_pages, num_pages, src.num_pages, "source"); !s.ok())
    return s;
  if (absl::Status s = CheckPages(dst_pages, num_pages, dst.num_pages, "destination"); !s.ok())
    return s;

  const uint64_t es = static_cast<uint64_t>(src.ElemBytes());
  const int64_t dim = src.head_dim;
  const int64_t heads = pull.head_end - pull.head_begin;
  const bool all_heads = heads == src.num_kv_heads;
  std::vector<PageRun> runs;
  RunList list(&runs);
  for (int64_t layer = pull.layer_begin; layer < pull.layer_end; ++layer) {
    const int64_t dst_layer = pull.dst_layer_begin + (layer - pull.layer_begin);
    for (int64_t i = 0; i < num_pages; ++i) {
      const int64_t rows = std::min(ps, pull.num_tokens - i * ps);
      for (int kv = 0; kv < 2; ++kv) {
        const auto s = [&](int64_t slot, int64_t head) {
          return es * src.Offset(layer, src_pages[i], kv, slot, head);
        };
        const auto d = [&](int64_t slot, int64_t head) {
          return es * dst.Offset(dst_layer, dst_pages[i], kv, slot, head);
        };
        if (src.layout == KvLayout::kNHD) {
          if (all_heads) {  // the block's first `rows` slots are contiguous
            list.Add(s(0, 0), d(0, 0), es * rows * heads * dim);
          } else {  // one run per slot: its heads are contiguous
            for (int64_t slot = 0; slot < rows; ++slot)
              list.Add(s(slot, pull.head_begin), d(slot, 0), es * heads * dim);
          }
        } else if (rows == ps) {  // HND, a full page: the head range is contiguous
          list.Add(s(0, pull.head_begin), d(0, 0), es * heads * ps * dim);
        } else {  // HND, the last page: each head's first `rows` slots
          for (int64_t h = 0; h < heads; ++h)
            list.Add(s(0, pull.head_begin + h), d(0, h), es * rows * dim);
        }
      }
    }
  }
  if (src.TokenScales()) AddScaleRuns(src, dst, pull, src_pages, dst_pages, list);
  return runs;
}

}  // namespace attnd
