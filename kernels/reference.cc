// fp64 reference of paged attention. It is written to be obviously right rather than fast, and
// to share as little as possible with CpuPagedAttention: it first gathers the sequence into dense
// arrays (so paging bugs and attention bugs are separated), then does the textbook two-pass
// softmax per query and head in double.
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu_attention.h"

namespace attnd::kernels {
namespace {

// Dense copy of one layer of one sequence: [kv_len][num_kv_heads][head_dim] for K and for V, the
// values the pool stands for: an fp8 pool's codes times the layer's scales (kFp8E4M3) or times
// the row's own scales (kFp8E4M3PerToken), exact in double.
struct DenseKv {
  std::vector<double> k;
  std::vector<double> v;
};

DenseKv Gather(const void* pool, const KvCacheShape& shape, int64_t layer, const SequenceView& seq,
               KvScales scales) {
  const DType stored = shape.StorageDType();
  const bool layer_scales = shape.storage == KvStorage::kFp8E4M3;
  const int64_t heads = shape.num_kv_heads;
  const int64_t d = shape.head_dim;
  DenseKv kv;
  kv.k.resize(seq.kv_len * heads * d);
  kv.v.resize(seq.kv_len * heads * d);
  for (int64_t pos = 0; pos < seq.kv_len; ++pos) {
    const int64_t page = seq.page_table[pos / shape.page_size];
    const int64_t slot = pos % shape.page_size;
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t k_at = shape.Offset(layer, page, 0, slot, h);
      const int64_t v_at = shape.Offset(layer, page, 1, slot, h);
      double k_scale = layer_scales ? scales.k : 1.0;
      double v_scale = layer_scales ? scales.v : 1.0;
      if (shape.TokenScales()) {
        k_scale = LoadTokenScale(pool, shape, layer, page, 0, slot, h);
        v_scale = LoadTokenScale(pool, shape, layer, page, 1, slot, h);
      }
      for (int64_t i = 0; i < d; ++i) {
        kv.k[(pos * heads + h) * d + i] = k_scale * LoadAsFloat(pool, k_at + i, stored);
        kv.v[(pos * heads + h) * d + i] = v_scale * LoadAsFloat(pool, v_at + i, stored);
      }
    }
  }
  return kv;
}

bool Visible(const AttentionOptions& opts, int64_t query_pos, int64_t key_pos) {
  if (key_pos > query_pos) return false;
  return opts.window_left < 0 || query_pos - key_pos <= opts.window_left;
}

}  // namespace

void ReferencePagedAttention(const void* pool, const KvCacheShape& shape, int64_t layer,
                             const SequenceView& seq, const AttentionOptions& opts, const void* q,
                             std::vector<double>* out, std::vector<double>* lse, KvScales scales) {
  const int64_t qo = opts.num_qo_heads;
  const int64_t kv_heads = shape.num_kv_heads;
  const int64_t group = qo / kv_heads;
  const int64_t d = shape.head_dim;
  const int64_t n = seq.num_queries;
  const double scale = opts.sm_scale;
  const double cap = opts.logits_soft_cap;

  out->assign(n * qo * d, 0.0);
  if (lse != nullptr) lse->assign(n * qo, 0.0);
  if (n <= 0) return;
  const DenseKv kv = Gather(pool, shape, layer, seq, scales);

  std::vector<double> logits(seq.kv_len);
  std::vector<double> query(d);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t query_pos = seq.kv_len - n + i;
    for (int64_t h = 0; h < qo; ++h) {
      const int64_t kvh = h / group;
      for (int64_t x = 0; x < d; ++x) query[x] = LoadAsFloat(q, (i * qo + h) * d + x, shape.dtype);
      // Pass 1: logits of the visible keys and their maximum.
      double max = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < seq.kv_len; ++j) {
        if (!Visible(opts, query_pos, j)) continue;
        double dot = 0.0;
        for (int64_t x = 0; x < d; ++x) {
          dot += query[x] * kv.k[(j * kv_heads + kvh) * d + x];
        }
        double logit = scale * dot;
        if (cap > 0.0) logit = cap * std::tanh(logit / cap);
        logits[j] = logit;
        if (logit > max) max = logit;
      }
      // Pass 2: unnormalised weights, their sum, and the weighted sum of V.
      double sum = 0.0;
      double* o = out->data() + (i * qo + h) * d;
      for (int64_t j = 0; j < seq.kv_len; ++j) {
        if (!Visible(opts, query_pos, j)) continue;
        const double w = std::exp(logits[j] - max);
        sum += w;
        for (int64_t x = 0; x < d; ++x) o[x] += w * kv.v[(j * kv_heads + kvh) * d + x];
      }
      // No visible key: zero output and lse = -inf, as CpuPagedAttention defines it.
      if (sum > 0.0) {
        for (int64_t x = 0; x < d; ++x) o[x] /= sum;
      }
      if (lse != nullptr) {
        (*lse)[i * qo + h] =
            sum > 0.0 ? max + std::log(sum) : -std::numeric_limits<double>::infinity();
      }
    }
  }
}

}  // namespace attnd::kernels
