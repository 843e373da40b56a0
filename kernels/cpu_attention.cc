// fp32 CPU append and paged attention (the dtype conversions they use are in cpu_convert.h).
//
// The attention reads a sequence's KV once per tile of queries (usually once per call: a decode
// step is one tile), a chunk of keys at a time for all kv heads together, in address order. Each
// chunk is converted to float once and reused by every query of the tile and every query head of
// each GQA group. The softmax is online (running max and denominator per query head, updated
// once per chunk), so the KV is read in a single pass whatever the sequence length.
//
// fp8 pools are read as their codes; the scales are applied where they cost least. Per-layer
// scales fold into the queries' factor and the output's normalisation (once per call);
// per-token scales multiply each key's logit (K) and each key's softmax weight (V) after the
// weight has entered the denominator, which is a sum of the unscaled probabilities.
#include "kernels/cpu_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu_convert.h"

namespace attnd::kernels {
namespace {

using cpu_convert::BF16;
using cpu_convert::Broadcast;
using cpu_convert::F16;
using cpu_convert::F32;
using cpu_convert::Fp8;
using cpu_convert::HorizontalSum;
using cpu_convert::LoadRow;
using cpu_convert::LoadV;
using cpu_convert::StoreRow;
using cpu_convert::StoreV;
using cpu_convert::V4f;

// ---------------------------------------------------------------------------------------------
// Vector arithmetic.

void ScaleRow(float s, int64_t n, float* x) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) StoreV(x + i, LoadV(x + i) * s);
  for (; i < n; ++i) x[i] *= s;
}

float Dot(const float* a, const float* b, int64_t n) {
  V4f s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    s0 += LoadV(a + i) * LoadV(b + i);
    s1 += LoadV(a + i + 4) * LoadV(b + i + 4);
  }
  float sum = HorizontalSum(s0 + s1);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// out[j] = q . k[j] for `count` key rows of length d, d apart. Four keys per pass: four
// independent accumulation chains, and each load of q serves four keys.
void DotRows(const float* q, const float* k, int64_t count, int64_t d, float* out) {
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    const float* k0 = k + j * d;
    const float* k1 = k0 + d;
    const float* k2 = k1 + d;
    const float* k3 = k2 + d;
    V4f s0 = {}, s1 = {}, s2 = {}, s3 = {};
    int64_t x = 0;
    for (; x + 4 <= d; x += 4) {
      const V4f qv = LoadV(q + x);
      s0 += qv * LoadV(k0 + x);
      s1 += qv * LoadV(k1 + x);
      s2 += qv * LoadV(k2 + x);
      s3 += qv * LoadV(k3 + x);
    }
    float r[4] = {HorizontalSum(s0), HorizontalSum(s1), HorizontalSum(s2), HorizontalSum(s3)};
    for (; x < d; ++x) {
      r[0] += q[x] * k0[x];
      r[1] += q[x] * k1[x];
      r[2] += q[x] * k2[x];
      r[3] += q[x] * k3[x];
    }
    std::memcpy(out + j, r, sizeof(r));
  }
  for (; j < count; ++j) out[j] = Dot(q, k + j * d, d);
}

// acc += sum_j w[j] * v[j] over `count` value rows of length d, d apart. The accumulator slice
// stays in registers while all rows stream past it.
void AccumulateWeighted(const float* w, const float* v, int64_t count, int64_t d, float* acc) {
  int64_t x = 0;
  for (; x + 16 <= d; x += 16) {
    V4f a0 = LoadV(acc + x), a1 = LoadV(acc + x + 4), a2 = LoadV(acc + x + 8),
        a3 = LoadV(acc + x + 12);
    for (int64_t j = 0; j < count; ++j) {
      const float* vj = v + j * d + x;
      const V4f wj = Broadcast(w[j]);
      a0 += wj * LoadV(vj);
      a1 += wj * LoadV(vj + 4);
      a2 += wj * LoadV(vj + 8);
      a3 += wj * LoadV(vj + 12);
    }
    StoreV(acc + x, a0);
    StoreV(acc + x + 4, a1);
    StoreV(acc + x + 8, a2);
    StoreV(acc + x + 12, a3);
  }
  for (; x < d; ++x) {
    float a = acc[x];
    for (int64_t j = 0; j < count; ++j) a += w[j] * v[j * d + x];
    acc[x] = a;
  }
}

// ---------------------------------------------------------------------------------------------
// Attention.

// Loop structure. A call covers kv heads [kv_begin, kv_end) ("the heads"). Queries go in tiles;
// for each tile the visible keys are read once, a chunk at a time, for all the heads together:
// that reads the pool in address order in both layouts (in NHD a token's heads are adjacent, in
// HND a page's slots of one head are). Each chunk is converted to float once and then used by
// every query of the tile and every query head of each kv head's GQA group.

// Float K+V scratch per chunk; sized to stay in a typical 1-2 MiB L2 with the accumulators.
constexpr int64_t kChunkBytes = 256 << 10;
constexpr int64_t kMaxChunk = 64;
constexpr int64_t kMinChunk = 8;
// Query-head rows per kv head per tile: enough to amortise converting the KV chunk, few enough
// that the accumulators stay in cache.
constexpr int64_t kRowsPerKvHead = 32;

// Everything the work needs, fixed for one call.
struct Problem {
  const void* pool;
  KvCacheShape shape;
  int64_t layer;
  SequenceView seq;
  AttentionOptions opts;
  int64_t group;      // query heads per kv head
  int64_t first_pos;  // position of query 0
  int64_t kv_begin;   // the heads: [kv_begin, kv_begin + heads)
  int64_t heads;
  int64_t chunk;         // keys converted per step
  int64_t tile_queries;  // queries per tile
  // The scales of a kFp8E4M3 pool, folded where they cost nothing: K's into the factor the
  // queries are multiplied by anyway (logit = sm_scale * q . (k_scale * fp8)), V's into the
  // softmax normalisation of the output. 1 for other pools, so the model-dtype path is unchanged.
  float q_scale;    // sm_scale * k_scale
  float out_scale;  // v_scale
  // kFp8E4M3PerToken: each key's K and V scales are gathered with its codes and applied per key.
  bool token_scales;
};

// Online softmax state of one (query, query head) row.
struct RowState {
  float max = -std::numeric_limits<float>::infinity();
  float denom = 0.0f;
};

// Scratch of one call, kept per thread so that serving many small sequences does not allocate on
// every call. Rows are ordered (kv head of the call, query of the tile, head in group); K and V
// chunks are [kv head of the call][key][head_dim], their per-token scales (kFp8E4M3PerToken
// only) [kv head of the call][key].
struct Scratch {
  std::vector<float> q, acc, k, v, logits, k_scale, v_scale;
  std::vector<RowState> state;

  void Reserve(const Problem& p) {
    const int64_t rows = p.heads * p.tile_queries * p.group;
    const int64_t d = p.shape.head_dim;
    q.resize(rows * d);
    acc.resize(rows * d);
    k.resize(p.heads * p.chunk * d);
    v.resize(p.heads * p.chunk * d);
    logits.resize(p.chunk);
    k_scale.resize(p.token_scales ? p.heads * p.chunk : 0);
    v_scale.resize(k_scale.size());
    state.resize(rows);
  }
};

// Visible key range [lo, hi) of the query at `pos`.
void VisibleRange(const Problem& p, int64_t pos, int64_t* lo, int64_t* hi) {
  *hi = std::min(pos + 1, p.seq.kv_len);
  *lo = p.opts.window_left >= 0 ? std::max<int64_t>(0, pos - p.opts.window_left) : 0;
}

// Reads keys [begin, end) of the heads (K when kv == 0, V when 1) into dst as float,
// dst[head][key - begin][d], p.chunk keys per head; with per-token scales, their scales into
// scales[head][key - begin].
template <typename Kv>
void GatherChunk(const Problem& p, int kv, int64_t begin, int64_t end, float* dst,
                 float* scales) {
  const auto* pool = static_cast<const typename Kv::Storage*>(p.pool);
  const int64_t d = p.shape.head_dim;
  const int64_t ps = p.shape.page_size;
  for (int64_t pos = begin; pos < end;) {
    const int64_t page = p.seq.page_table[pos / ps];
    const int64_t slot = pos % ps;
    // The positions of this page within the chunk.
    const int64_t run = std::min(end - pos, ps - slot);
    for (int64_t h = 0; h < p.heads; ++h) {
      if (p.token_scales) {  // a head's slots are adjacent among the scales, in both layouts
        const uint8_t* at = static_cast<const uint8_t*>(p.pool) + p.shape.ScalesByteOffset() +
                            4 * p.shape.ScaleOffset(p.layer, page, kv, slot, p.kv_begin + h);
        std::memcpy(scales + h * p.chunk + (pos - begin), at, run * sizeof(float));
      }
      const auto* src = pool + p.shape.Offset(p.layer, page, kv, slot, p.kv_begin + h);
      float* out = dst + (h * p.chunk + (pos - begin)) * d;
      if (p.shape.layout == KvLayout::kHND) {
        LoadRow<Kv>(src, run * d, out);  // the run is contiguous
        continue;
      }
      const int64_t token_stride = p.shape.num_kv_heads * d;
      for (int64_t j = 0; j < run; ++j) LoadRow<Kv>(src + j * token_stride, d, out + j * d);
    }
    pos += run;
  }
}

// Folds `count` keys (K and V rows starting at k and v) into one row's online softmax state and
// accumulator. k_scale and v_scale are the keys' per-token scales, null for other pools.
void UpdateRow(const Problem& p, const float* qrow, const float* k, const float* v,
               const float* k_scale, const float* v_scale, int64_t count, float* logits,
               RowState* st, float* acc) {
  const int64_t d = p.shape.head_dim;
  const float cap = p.opts.logits_soft_cap;
  DotRows(qrow, k, count, d, logits);
  // logit = sm_scale * q . (k_scale * fp8) = k_scale * (q_scaled . fp8), before the soft cap.
  if (k_scale != nullptr) {
    for (int64_t j = 0; j < count; ++j) logits[j] *= k_scale[j];
  }
  float chunk_max = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < count; ++j) {
    if (cap > 0.0f) logits[j] = cap * std::tanh(logits[j] / cap);
    chunk_max = std::max(chunk_max, logits[j]);
  }
  if (chunk_max > st->max) {
    // Rescale what was accumulated under the old maximum (a no-op on the first chunk: both 0).
    const float r = std::exp(st->max - chunk_max);
    st->denom *= r;
    ScaleRow(r, d, acc);
    st->max = chunk_max;
  }
  float denom = 0.0f;
  for (int64_t j = 0; j < count; ++j) {
    logits[j] = std::exp(logits[j] - st->max);
    denom += logits[j];
  }
  st->denom += denom;
  // w * (v_scale * fp8) = (w * v_scale) * fp8: the weights, now counted in the denominator,
  // carry each key's V scale into the accumulator.
  if (v_scale != nullptr) {
    for (int64_t j = 0; j < count; ++j) logits[j] *= v_scale[j];
  }
  AccumulateWeighted(logits, v, count, d, acc);
}

// Row index in the scratch of (head of the call, query of the tile, head in group).
int64_t RowIndex(const Problem& p, int64_t h, int64_t qt, int64_t gh) {
  return (h * p.tile_queries + qt) * p.group + gh;
}

// Computes the output rows of queries [q_begin, q_end) for every query head of the heads.
// s.q holds the queries scaled by q_scale; the accumulators are left unnormalised.
template <typename Kv>
void AttendTile(const Problem& p, int64_t q_begin, int64_t q_end, Scratch& s) {
  const int64_t d = p.shape.head_dim;
  std::fill(s.acc.begin(), s.acc.end(), 0.0f);
  std::fill(s.state.begin(), s.state.end(), RowState{});

  // Union of the tile's visible ranges: the first query starts earliest, the last ends latest.
  int64_t lo, hi, unused;
  VisibleRange(p, p.first_pos + q_begin, &lo, &unused);
  VisibleRange(p, p.first_pos + q_end - 1, &unused, &hi);

  for (int64_t c0 = lo; c0 < hi; c0 += p.chunk) {
    const int64_t c1 = std::min(hi, c0 + p.chunk);
    GatherChunk<Kv>(p, 0, c0, c1, s.k.data(), s.k_scale.data());
    GatherChunk<Kv>(p, 1, c0, c1, s.v.data(), s.v_scale.data());
    for (int64_t qi = q_begin; qi < q_end; ++qi) {
      int64_t vlo, vhi;
      VisibleRange(p, p.first_pos + qi, &vlo, &vhi);
      vlo = std::max(vlo, c0);
      vhi = std::min(vhi, c1);
      if (vlo >= vhi) continue;
      for (int64_t h = 0; h < p.heads; ++h) {
        const int64_t first_key = (h * p.chunk + (vlo - c0)) * d;
        const float* k_scale =
            p.token_scales ? s.k_scale.data() + h * p.chunk + (vlo - c0) : nullptr;
        const float* v_scale =
            p.token_scales ? s.v_scale.data() + h * p.chunk + (vlo - c0) : nullptr;
        for (int64_t gh = 0; gh < p.group; ++gh) {
          const int64_t row = RowIndex(p, h, qi - q_begin, gh);
          UpdateRow(p, s.q.data() + row * d, s.k.data() + first_key, s.v.data() + first_key,
                    k_scale, v_scale, vhi - vlo, s.logits.data(), &s.state[row],
                    s.acc.data() + row * d);
        }
      }
    }
  }
}

// Copies queries [q_begin, q_end) of the heads' query heads into the scratch, scaled by q_scale.
// A kv head's group of query heads is adjacent in q ([query][qo_head][d]): one run of g * d.
template <typename T>
void LoadTileQueries(const Problem& p, const void* q, int64_t q_begin, int64_t q_end, Scratch& s) {
  const auto* qs = static_cast<const typename T::Storage*>(q);
  const int64_t d = p.shape.head_dim;
  const int64_t run = p.group * d;
  for (int64_t qi = q_begin; qi < q_end; ++qi) {
    for (int64_t h = 0; h < p.heads; ++h) {
      float* dst = s.q.data() + RowIndex(p, h, qi - q_begin, 0) * d;
      LoadRow<T>(qs + (qi * p.opts.num_qo_heads + (p.kv_begin + h) * p.group) * d, run, dst);
      ScaleRow(p.q_scale, run, dst);
    }
  }
}

// Writes a finished tile. A row that saw no key (only possible when num_queries > kv_len) gets
// zeros and lse = -inf: the softmax over an empty set has denominator 0.
template <typename T>
void StoreTile(const Problem& p, int64_t q_begin, int64_t q_end, Scratch& s, void* out,
               float* lse) {
  const int64_t d = p.shape.head_dim;
  const int64_t qo = p.opts.num_qo_heads;
  auto* o = static_cast<typename T::Storage*>(out);
  for (int64_t qi = q_begin; qi < q_end; ++qi) {
    for (int64_t h = 0; h < p.heads; ++h) {
      for (int64_t gh = 0; gh < p.group; ++gh) {
        const int64_t row = RowIndex(p, h, qi - q_begin, gh);
        const int64_t qo_head = (p.kv_begin + h) * p.group + gh;
        const RowState& st = s.state[row];
        float* arow = s.acc.data() + row * d;
        ScaleRow(st.denom > 0.0f ? p.out_scale / st.denom : 0.0f, d, arow);
        StoreRow<T>(arow, d, o + (qi * qo + qo_head) * d);
        if (lse != nullptr) {
          lse[qi * qo + qo_head] = st.denom > 0.0f ? st.max + std::log(st.denom)
                                                   : -std::numeric_limits<float>::infinity();
        }
      }
    }
  }
}

// Kv: what the pool holds; Io: the model dtype of q and out.
template <typename Kv, typename Io>
void Attend(const Problem& p, const void* q, void* out, float* lse) {
  thread_local Scratch s;
  s.Reserve(p);
  for (int64_t q0 = 0; q0 < p.seq.num_queries; q0 += p.tile_queries) {
    const int64_t q1 = std::min(p.seq.num_queries, q0 + p.tile_queries);
    LoadTileQueries<Io>(p, q, q0, q1, s);
    AttendTile<Kv>(p, q0, q1, s);
    StoreTile<Io>(p, q0, q1, s, out, lse);
  }
}

// A model-dtype pool is read as the model dtype; an fp8 pool (either kind of scales) as fp8
// whatever the model's.
template <typename Io>
void AttendPool(const Problem& p, const void* q, void* out, float* lse) {
  if (p.shape.Fp8()) {
    Attend<Fp8, Io>(p, q, out, lse);
  } else {
    Attend<Io, Io>(p, q, out, lse);
  }
}

template <typename T>
void AppendRows(void* pool, const KvCacheShape& shape, int64_t layer, const int32_t* page_table,
                int64_t start, int64_t n, const void* k, const void* v) {
  auto* dst = static_cast<typename T::Storage*>(pool);
  const auto* src_k = static_cast<const typename T::Storage*>(k);
  const auto* src_v = static_cast<const typename T::Storage*>(v);
  const int64_t d = shape.head_dim;
  const int64_t heads = shape.num_kv_heads;
  const size_t row_bytes = static_cast<size_t>(d) * sizeof(typename T::Storage);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = start + t;
    const int64_t page = page_table[pos / shape.page_size];
    const int64_t slot = pos % shape.page_size;
    const int64_t src = t * heads * d;
    if (shape.layout == KvLayout::kNHD) {
      // All heads of one slot are adjacent in NHD: one copy per token and tensor.
      std::memcpy(dst + shape.Offset(layer, page, 0, slot, 0), src_k + src, row_bytes * heads);
      std::memcpy(dst + shape.Offset(layer, page, 1, slot, 0), src_v + src, row_bytes * heads);
      continue;
    }
    for (int64_t h = 0; h < heads; ++h) {
      std::memcpy(dst + shape.Offset(layer, page, 0, slot, h), src_k + src + h * d, row_bytes);
      std::memcpy(dst + shape.Offset(layer, page, 1, slot, h), src_v + src + h * d, row_bytes);
    }
  }
}

// The append into an fp8 pool: each row of the model dtype Io quantized with its tensor's scale
// (kFp8E4M3), or with its own, which is stored among the pool's scales (kFp8E4M3PerToken).
template <typename Io>
void AppendQuantized(void* pool, const KvCacheShape& shape, int64_t layer,
                     const int32_t* page_table, int64_t start, int64_t n, const void* k,
                     const void* v, KvScales scales) {
  auto* dst = static_cast<uint8_t*>(pool);
  const typename Io::Storage* const src[2] = {static_cast<const typename Io::Storage*>(k),
                                              static_cast<const typename Io::Storage*>(v)};
  const float scale[2] = {scales.k, scales.v};
  const int64_t d = shape.head_dim;
  const int64_t heads = shape.num_kv_heads;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = start + t;
    const int64_t page = page_table[pos / shape.page_size];
    const int64_t slot = pos % shape.page_size;
    for (int kv = 0; kv < 2; ++kv) {
      for (int64_t h = 0; h < heads; ++h) {
        const typename Io::Storage* row = src[kv] + (t * heads + h) * d;
        float row_scale = scale[kv];
        if (shape.TokenScales()) {
          row_scale = cpu_convert::RowScale<Io>(row, d);
          StoreTokenScale(pool, shape, layer, page, kv, slot, h, row_scale);
        }
        cpu_convert::QuantizeRow<Io>(row, d, row_scale,
                                     dst + shape.Offset(layer, page, kv, slot, h));
      }
    }
  }
}

// Calls fn(traits) with the traits of a model dtype. fp8 is never a model dtype (only a pool's):
// no call.
template <typename Fn>
void WithModelDType(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      fn(F32{});
      return;
    case DType::kFloat16:
      fn(F16{});
      return;
    case DType::kBFloat16:
      fn(BF16{});
      return;
    case DType::kFloat8E4M3:
      return;
  }
}

}  // namespace

void CpuAppendKv(void* pool, const KvCacheShape& shape, int64_t layer, const int32_t* page_table,
                 int64_t start, int64_t n, const void* k, const void* v, KvScales scales) {
  if (n <= 0) return;
  if (shape.Fp8()) {
    WithModelDType(shape.dtype, [&](auto io) {
      AppendQuantized<decltype(io)>(pool, shape, layer, page_table, start, n, k, v, scales);
    });
    return;
  }
  // A model-dtype pool: only the element size matters for a copy.
  if (shape.ElemBytes() == 4) {
    AppendRows<F32>(pool, shape, layer, page_table, start, n, k, v);
  } else {
    AppendRows<F16>(pool, shape, layer, page_table, start, n, k, v);
  }
}

void CpuPagedAttentionKvHeads(const void* pool, const KvCacheShape& shape, int64_t layer,
                              const SequenceView& seq, const AttentionOptions& opts, const void* q,
                              void* out, float* lse, int64_t kv_head_begin, int64_t kv_head_end,
                              KvScales scales) {
  if (seq.num_queries <= 0 || kv_head_begin >= kv_head_end) return;
  Problem p;
  p.pool = pool;
  p.shape = shape;
  p.layer = layer;
  p.seq = seq;
  p.opts = opts;
  p.group = opts.num_qo_heads / shape.num_kv_heads;
  p.first_pos = seq.kv_len - seq.num_queries;
  p.kv_begin = kv_head_begin;
  p.heads = kv_head_end - kv_head_begin;
  const int64_t row_floats = 2 * p.heads * shape.head_dim;  // K and V of one key, all the heads
  p.chunk = std::clamp<int64_t>(kChunkBytes / (row_floats * 4), kMinChunk, kMaxChunk);
  p.tile_queries = std::max<int64_t>(1, kRowsPerKvHead / p.group);
  // Only a kFp8E4M3 pool has per-layer scales; the others ignore them (sm_scale * 1 and
  // 1 / denom: a model-dtype pool gets the same bits as ever).
  const bool layer_scales = shape.storage == KvStorage::kFp8E4M3;
  p.q_scale = opts.sm_scale * (layer_scales ? scales.k : 1.0f);
  p.out_scale = layer_scales ? scales.v : 1.0f;
  p.token_scales = shape.TokenScales();
  WithModelDType(shape.dtype, [&](auto io) { AttendPool<decltype(io)>(p, q, out, lse); });
}

void CpuPagedAttention(const void* pool, const KvCacheShape& shape, int64_t layer,
                       const SequenceView& seq, const AttentionOptions& opts, const void* q,
                       void* out, float* lse, KvScales scales) {
  CpuPagedAttentionKvHeads(pool, shape, layer, seq, opts, q, out, lse, 0, shape.num_kv_heads,
                           scales);
}

}  // namespace attnd::kernels
