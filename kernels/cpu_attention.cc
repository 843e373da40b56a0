// fp32 CPU append and paged attention, and the storage dtype conversions they use.
//
// The attention reads a sequence's KV once per tile of queries (usually once per call: a decode
// step is one tile), a chunk of keys at a time for all kv heads together, in address order. Each
// chunk is converted to float once and reused by every query of the tile and every query head of
// each GQA group. The softmax is online (running max and denominator per query head, updated
// once per chunk), so the KV is read in a single pass whatever the sequence length.
#include "kernels/cpu_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace attnd::kernels {
namespace {

// ---------------------------------------------------------------------------------------------
// Scalar conversions. Bit manipulation rather than compiler intrinsics so that the result does
// not depend on the host's F16C support or the floating-point rounding mode.

uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Rounds `value >> shift` to nearest, ties to even. 1 <= shift <= 31.
uint32_t ShiftRightRne(uint32_t value, int shift) {
  const uint32_t kept = value >> shift;
  const uint32_t rest = value & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  return kept + ((rest > half || (rest == half && (kept & 1))) ? 1 : 0);
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ff;
  if (exp == 0x1f) return BitsFloat(sign | 0x7f800000 | (mant << 13));  // inf, nan (payload kept)
  if (exp != 0) return BitsFloat(sign | ((exp + 112) << 23) | (mant << 13));
  // Zero or subnormal: mant * 2^-24, exact in float since mant < 2^10.
  const float magnitude = static_cast<float>(mant) * 0x1p-24f;
  return sign ? -magnitude : magnitude;
}

uint16_t FloatToHalf(float f) {
  const uint32_t x = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
  const uint32_t abs = x & 0x7fffffff;
  if (abs > 0x7f800000) {
    // NaN: keep it quiet and keep the top payload bits.
    return static_cast<uint16_t>(sign | 0x7e00 | ((abs >> 13) & 0x3ff));
  }
  // 65520 (0x477ff000) is the midpoint between the largest half, 65504, and 2^16; the tie goes to
  // the even neighbour 2^16, which does not exist, so it and everything above become infinity.
  if (abs >= 0x477ff000) return static_cast<uint16_t>(sign | 0x7c00);
  const uint32_t exp = abs >> 23;
  if (exp >= 113) {
    // Normal half. Rebias the exponent, round away 13 mantissa bits; a carry out of the mantissa
    // correctly bumps the exponent.
    const uint32_t rebased = abs - (112u << 23);
    return static_cast<uint16_t>(sign | ShiftRightRne(rebased, 13));
  }
  // Below 2^-24 / 2 the value rounds to zero (2^-25 exactly is a tie that goes to even zero, which
  // the general path below also handles; exponents under 102 would shift by more than 24).
  if (exp < 102) return sign;
  // Subnormal half (or the smallest normal after rounding up): units of 2^-24.
  // value = significand * 2^(exp - 150), so units = significand >> (126 - exp).
  const uint32_t significand = (abs & 0x7fffff) | 0x800000;
  return static_cast<uint16_t>(sign | ShiftRightRne(significand, static_cast<int>(126 - exp)));
}

// fp32 moves go through memcpy so NaN payloads (even signalling ones) pass through bit-exact.
float LoadF32(const void* base, int64_t index) {
  float f;
  std::memcpy(&f, static_cast<const float*>(base) + index, sizeof(f));
  return f;
}

void StoreF32(void* base, int64_t index, float value) {
  std::memcpy(static_cast<float*>(base) + index, &value, sizeof(value));
}

float Bf16ToFloat(uint16_t b) { return BitsFloat(static_cast<uint32_t>(b) << 16); }

uint16_t FloatToBf16(float f) {
  const uint32_t x = FloatBits(f);
  if ((x & 0x7fffffff) > 0x7f800000) return static_cast<uint16_t>((x >> 16) | 0x0040);  // quiet NaN
  // Round to nearest even on the low 16 bits; overflow carries into the exponent and ends at inf.
  return static_cast<uint16_t>((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

// ---------------------------------------------------------------------------------------------
// Four-float vectors through the GCC/Clang vector extension: SSE2 on baseline x86-64, NEON on
// Arm, wider instructions when the build targets them. One portable source, no intrinsics; the
// plain loops below would not be vectorised at -O2 (float reductions may not be reordered, and
// the cheap cost model skips loops that need alias checks).

using V4f = float __attribute__((vector_size(16)));
using V4u = uint32_t __attribute__((vector_size(16)));
using V4i = int32_t __attribute__((vector_size(16)));
using V4h = uint16_t __attribute__((vector_size(8)));

V4f LoadV(const float* p) {
  V4f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

void StoreV(float* p, V4f v) { std::memcpy(p, &v, sizeof(v)); }

V4f Broadcast(float f) { return V4f{f, f, f, f}; }

float HorizontalSum(V4f v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// Four 16-bit patterns zero-extended to 32 bits.
V4u Widen(const uint16_t* p) {
  V4h h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, V4u);
}

// Vector form of HalfToFloat: normals by rebiasing the exponent, exponent 31 (inf/nan) by moving
// it to 255, subnormals through an exact int->float conversion (no float denormal arithmetic,
// which is slow on some cores and wrong under flush-to-zero).
V4f HalfToFloat4(V4u x) {
  const V4u sign = (x & 0x8000u) << 16;
  const V4u exp = x & 0x7c00u;
  const V4u shifted = (x & 0x7fffu) << 13;
  const V4u normal = shifted + (112u << 23);
  const V4u special = shifted + (224u << 23);
  const V4f sub = __builtin_convertvector(reinterpret_cast<V4i>(x & 0x3ffu), V4f) * 0x1p-24f;
  const V4u magnitude =
      exp == 0u ? reinterpret_cast<V4u>(sub) : (exp == 0x7c00u ? special : normal);
  return reinterpret_cast<V4f>(magnitude | sign);
}

// ---------------------------------------------------------------------------------------------
// Dtype traits: the attention loops are templated on these so there is no per-element switch.

struct F32 {
  using Storage = float;
  static float Load(Storage s) { return s; }
  static Storage Store(float f) { return f; }
  static V4f Load4(const Storage* p) { return LoadV(p); }
};
struct F16 {
  using Storage = uint16_t;
  static float Load(Storage s) { return HalfToFloat(s); }
  static Storage Store(float f) { return FloatToHalf(f); }
  static V4f Load4(const Storage* p) { return HalfToFloat4(Widen(p)); }
};
struct BF16 {
  using Storage = uint16_t;
  static float Load(Storage s) { return Bf16ToFloat(s); }
  static Storage Store(float f) { return FloatToBf16(f); }
  static V4f Load4(const Storage* p) { return reinterpret_cast<V4f>(Widen(p) << 16); }
};

template <typename T>
void LoadRow(const typename T::Storage* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) StoreV(dst + i, T::Load4(src + i));
  for (; i < n; ++i) dst[i] = T::Load(src[i]);
}

template <typename T>
void StoreRow(const float* src, int64_t n, typename T::Storage* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = T::Store(src[i]);
}

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
};

// Online softmax state of one (query, query head) row.
struct RowState {
  float max = -std::numeric_limits<float>::infinity();
  float denom = 0.0f;
};

// Scratch of one call, kept per thread so that serving many small sequences does not allocate on
// every call. Rows are ordered (kv head of the call, query of the tile, head in group); K and V
// chunks are [kv head of the call][key][head_dim].
struct Scratch {
  std::vector<float> q, acc, k, v, logits;
  std::vector<RowState> state;

  void Reserve(const Problem& p) {
    const int64_t rows = p.heads * p.tile_queries * p.group;
    const int64_t d = p.shape.head_dim;
    q.resize(rows * d);
    acc.resize(rows * d);
    k.resize(p.heads * p.chunk * d);
    v.resize(p.heads * p.chunk * d);
    logits.resize(p.chunk);
    state.resize(rows);
  }
};

// Visible key range [lo, hi) of the query at `pos`.
void VisibleRange(const Problem& p, int64_t pos, int64_t* lo, int64_t* hi) {
  *hi = std::min(pos + 1, p.seq.kv_len);
  *lo = p.opts.window_left >= 0 ? std::max<int64_t>(0, pos - p.opts.window_left) : 0;
}

// Reads keys [begin, end) of the heads (K when kv == 0, V when 1) into dst as float,
// dst[head][key - begin][d], p.chunk keys per head.
template <typename T>
void GatherChunk(const Problem& p, int kv, int64_t begin, int64_t end, float* dst) {
  const auto* pool = static_cast<const typename T::Storage*>(p.pool);
  const int64_t d = p.shape.head_dim;
  const int64_t ps = p.shape.page_size;
  for (int64_t pos = begin; pos < end;) {
    const int64_t page = p.seq.page_table[pos / ps];
    const int64_t slot = pos % ps;
    // The positions of this page within the chunk.
    const int64_t run = std::min(end - pos, ps - slot);
    for (int64_t h = 0; h < p.heads; ++h) {
      const auto* src = pool + p.shape.Offset(p.layer, page, kv, slot, p.kv_begin + h);
      float* out = dst + (h * p.chunk + (pos - begin)) * d;
      if (p.shape.layout == KvLayout::kHND) {
        LoadRow<T>(src, run * d, out);  // the run is contiguous
        continue;
      }
      const int64_t token_stride = p.shape.num_kv_heads * d;
      for (int64_t j = 0; j < run; ++j) LoadRow<T>(src + j * token_stride, d, out + j * d);
    }
    pos += run;
  }
}

// Folds `count` keys (K and V rows starting at k and v) into one row's online softmax state and
// accumulator.
void UpdateRow(const Problem& p, const float* qrow, const float* k, const float* v, int64_t count,
               float* logits, RowState* st, float* acc) {
  const int64_t d = p.shape.head_dim;
  const float cap = p.opts.logits_soft_cap;
  DotRows(qrow, k, count, d, logits);
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
  AccumulateWeighted(logits, v, count, d, acc);
}

// Row index in the scratch of (head of the call, query of the tile, head in group).
int64_t RowIndex(const Problem& p, int64_t h, int64_t qt, int64_t gh) {
  return (h * p.tile_queries + qt) * p.group + gh;
}

// Computes the output rows of queries [q_begin, q_end) for every query head of the heads.
// s.q holds the queries scaled by sm_scale.
template <typename T>
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
    GatherChunk<T>(p, 0, c0, c1, s.k.data());
    GatherChunk<T>(p, 1, c0, c1, s.v.data());
    for (int64_t qi = q_begin; qi < q_end; ++qi) {
      int64_t vlo, vhi;
      VisibleRange(p, p.first_pos + qi, &vlo, &vhi);
      vlo = std::max(vlo, c0);
      vhi = std::min(vhi, c1);
      if (vlo >= vhi) continue;
      for (int64_t h = 0; h < p.heads; ++h) {
        const int64_t first_key = (h * p.chunk + (vlo - c0)) * d;
        for (int64_t gh = 0; gh < p.group; ++gh) {
          const int64_t row = RowIndex(p, h, qi - q_begin, gh);
          UpdateRow(p, s.q.data() + row * d, s.k.data() + first_key, s.v.data() + first_key,
                    vhi - vlo, s.logits.data(), &s.state[row], s.acc.data() + row * d);
        }
      }
    }
  }
}

// Copies queries [q_begin, q_end) of the heads' query heads into the scratch, scaled by sm_scale.
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
      ScaleRow(p.opts.sm_scale, run, dst);
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
        ScaleRow(st.denom > 0.0f ? 1.0f / st.denom : 0.0f, d, arow);
        StoreRow<T>(arow, d, o + (qi * qo + qo_head) * d);
        if (lse != nullptr) {
          lse[qi * qo + qo_head] = st.denom > 0.0f ? st.max + std::log(st.denom)
                                                   : -std::numeric_limits<float>::infinity();
        }
      }
    }
  }
}

template <typename T>
void Attend(const Problem& p, const void* q, void* out, float* lse) {
  thread_local Scratch s;
  s.Reserve(p);
  for (int64_t q0 = 0; q0 < p.seq.num_queries; q0 += p.tile_queries) {
    const int64_t q1 = std::min(p.seq.num_queries, q0 + p.tile_queries);
    LoadTileQueries<T>(p, q, q0, q1, s);
    AttendTile<T>(p, q0, q1, s);
    StoreTile<T>(p, q0, q1, s, out, lse);
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

}  // namespace

void CpuAppendKv(void* pool, const KvCacheShape& shape, int64_t layer, const int32_t* page_table,
                 int64_t start, int64_t n, const void* k, const void* v, KvScales) {
  if (n <= 0) return;
  // Only the element size matters for a copy.
  if (DTypeSize(shape.dtype) == 4) {
    AppendRows<F32>(pool, shape, layer, page_table, start, n, k, v);
  } else {
    AppendRows<F16>(pool, shape, layer, page_table, start, n, k, v);
  }
}

void CpuPagedAttentionKvHeads(const void* pool, const KvCacheShape& shape, int64_t layer,
                              const SequenceView& seq, const AttentionOptions& opts, const void* q,
                              void* out, float* lse, int64_t kv_head_begin, int64_t kv_head_end,
                              KvScales) {
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
  switch (shape.dtype) {
    case DType::kFloat32:
      Attend<F32>(p, q, out, lse);
      break;
    case DType::kFloat16:
      Attend<F16>(p, q, out, lse);
      break;
    case DType::kBFloat16:
      Attend<BF16>(p, q, out, lse);
      break;
  }
}

void CpuPagedAttention(const void* pool, const KvCacheShape& shape, int64_t layer,
                       const SequenceView& seq, const AttentionOptions& opts, const void* q,
                       void* out, float* lse, KvScales scales) {
  CpuPagedAttentionKvHeads(pool, shape, layer, seq, opts, q, out, lse, 0, shape.num_kv_heads,
                           scales);
}

float LoadAsFloat(const void* base, int64_t index, DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return LoadF32(base, index);
    case DType::kFloat16:
      return HalfToFloat(static_cast<const uint16_t*>(base)[index]);
    case DType::kBFloat16:
      return Bf16ToFloat(static_cast<const uint16_t*>(base)[index]);
  }
  return std::numeric_limits<float>::quiet_NaN();
}

void StoreFromFloat(void* base, int64_t index, DType dtype, float value) {
  switch (dtype) {
    case DType::kFloat32:
      StoreF32(base, index, value);
      return;
    case DType::kFloat16:
      static_cast<uint16_t*>(base)[index] = FloatToHalf(value);
      return;
    case DType::kBFloat16:
      static_cast<uint16_t*>(base)[index] = FloatToBf16(value);
      return;
  }
}

void LoadRowAsFloat(const void* base, int64_t index, int64_t n, DType dtype, float* dst) {
  switch (dtype) {
    case DType::kFloat32:
      LoadRow<F32>(static_cast<const float*>(base) + index, n, dst);
      return;
    case DType::kFloat16:
      LoadRow<F16>(static_cast<const uint16_t*>(base) + index, n, dst);
      return;
    case DType::kBFloat16:
      LoadRow<BF16>(static_cast<const uint16_t*>(base) + index, n, dst);
      return;
  }
}

void StoreRowFromFloat(const float* src, int64_t n, DType dtype, void* base, int64_t index) {
  switch (dtype) {
    case DType::kFloat32:
      StoreRow<F32>(src, n, static_cast<float*>(base) + index);
      return;
    case DType::kFloat16:
      StoreRow<F16>(src, n, static_cast<uint16_t*>(base) + index);
      return;
    case DType::kBFloat16:
      StoreRow<BF16>(src, n, static_cast<uint16_t*>(base) + index);
      return;
  }
}

}  // namespace attnd::kernels
