// The CPU-attention-against-reference cases of the kernels_cpu_attention_test sources: a case's
// parameters, the pool it builds (one random sequence surrounded by NaN), and the check of
// CpuPagedAttention against ReferencePagedAttention within the output dtype's rounding.
#ifndef ATTND_TESTS_UNIT_KERNELS_CPU_ATTENTION_FIXTURE_H_
#define ATTND_TESTS_UNIT_KERNELS_CPU_ATTENTION_FIXTURE_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/cpu_attention.h"
#include "kernels/paged_kv.h"
#include "tests/unit/kernels_cpu_attention_test_util.h"

namespace attnd::kernels::cpu_attention_test_util {

struct Case {
  DType dtype = DType::kBFloat16;  // the model's: q, k, v, out
  // kFp8E4M3: the pool stores fp8 with random per-call scales; kFp8E4M3PerToken: with the
  // scales append computes.
  KvStorage storage = KvStorage::kModelDType;
  KvLayout layout = KvLayout::kNHD;
  int64_t page_size = 16;
  int64_t head_dim = 128;
  int64_t kv_heads = 2;
  int64_t group = 4;
  int64_t kv_len = 100;
  int64_t num_queries = 1;
  float soft_cap = 0.0f;
  int64_t window = -1;
  float sm_scale = 0.0f;  // 0: 1/sqrt(head_dim)
  float stddev = 1.0f;    // of q, k and v

  std::string Name() const {
    std::ostringstream s;
    s << (storage == KvStorage::kFp8E4M3           ? "fp8kv_"
          : storage == KvStorage::kFp8E4M3PerToken ? "fp8tokkv_"
                                                   : "")
      << DTypeName(dtype) << "_"
      << (layout == KvLayout::kNHD ? "NHD" : "HND") << "_ps" << page_size << "_d" << head_dim
      << "_kv" << kv_heads << "_g" << group << "_len" << kv_len << "_q" << num_queries;
    if (soft_cap > 0) s << "_cap" << static_cast<int>(soft_cap);
    if (window >= 0) s << "_win" << window;
    return s.str();
  }
};

inline double Tolerance(DType t) {
  switch (t) {
    case DType::kFloat32:
      return 1e-5;
    case DType::kFloat16:
      return 2e-3;
    case DType::kBFloat16:
      return 1e-2;
    case DType::kFloat8E4M3:  // never an output dtype
      break;
  }
  return 0;
}

// A pool holding one random sequence in layer 1 of 2, surrounded by NaN everywhere else (other
// pages, the unused tail of the last page, the other layer), so reading anything outside the
// sequence shows up as NaN in the output. A kFp8E4M3 pool gets scales drawn from 2^-5 .. 2: with
// stddev-1 inputs nothing saturates, and a kernel that ignores a scale is off by a factor. A
// kFp8E4M3PerToken pool's scales are NaN but for the appended rows', which append computes.
struct Fixture {
  KvCacheShape shape;
  AttentionOptions opts;
  SequenceView seq;
  KvScales scales;
  std::vector<int32_t> table;
  std::vector<uint8_t> pool, q;
  std::vector<uint8_t> k, v;  // what was appended, [kv_len][kv_heads][head_dim] of c.dtype
  int64_t layer = 1;

  Fixture(const Case& c, std::mt19937& rng) {
    shape.num_layers = 2;
    shape.page_size = c.page_size;
    shape.num_kv_heads = c.kv_heads;
    shape.head_dim = c.head_dim;
    shape.layout = c.layout;
    shape.dtype = c.dtype;
    shape.storage = c.storage;
    if (c.storage == KvStorage::kFp8E4M3) {
      std::uniform_real_distribution<float> octave(-5.0f, 1.0f);
      scales = {std::exp2(octave(rng)), std::exp2(octave(rng))};
    }
    const int64_t pages = (c.kv_len + c.page_size - 1) / c.page_size;
    shape.num_pages = pages + 3;
    opts.num_qo_heads = c.kv_heads * c.group;
    opts.sm_scale = c.sm_scale > 0 ? c.sm_scale : 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    opts.logits_soft_cap = c.soft_cap;
    opts.window_left = c.window;
    table = ShuffledPageTable(pages, shape.num_pages, rng);
    pool.resize(shape.TotalBytes());
    PoisonWithNan(pool.data(), shape.TotalElems(), shape.StorageDType());
    // Per-token scales (if any) NaN too: all-ones bytes are a float NaN.
    std::fill(pool.begin() + shape.KvBytes(), pool.end(), uint8_t{0xff});

    const int64_t row = c.kv_heads * c.head_dim;
    k = RandomTensor(c.kv_len * row, c.dtype, c.stddev, rng);
    v = RandomTensor(c.kv_len * row, c.dtype, 1.0f, rng);
    // The cached prefix, then the new tokens, as a Prefill or Decode call appends them.
    const int64_t cached = std::max<int64_t>(0, c.kv_len - c.num_queries);
    const int64_t es = DTypeSize(c.dtype);
    CpuAppendKv(pool.data(), shape, layer, table.data(), 0, cached, k.data(), v.data(), scales);
    CpuAppendKv(pool.data(), shape, layer, table.data(), cached, c.kv_len - cached,
                k.data() + cached * row * es, v.data() + cached * row * es, scales);
    q = RandomTensor(c.num_queries * opts.num_qo_heads * c.head_dim, c.dtype, c.stddev, rng);
    seq.page_table = table.data();
    seq.kv_len = c.kv_len;
    seq.num_queries = c.num_queries;
  }

  int64_t OutElems() const { return seq.num_queries * opts.num_qo_heads * shape.head_dim; }
};

// ||out - ref|| / ||ref||; NaN anywhere in out makes it NaN, which fails any `<` check.
inline double RelativeError(const void* out, DType dtype, const std::vector<double>& ref) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double o = LoadAsFloat(out, static_cast<int64_t>(i), dtype);
    diff += (o - ref[i]) * (o - ref[i]);
    norm += ref[i] * ref[i];
  }
  return std::sqrt(diff) / std::sqrt(norm);
}

inline void ExpectLseMatches(const std::vector<float>& lse, const std::vector<double>& ref) {
  ASSERT_EQ(lse.size(), ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isinf(ref[i])) {
      EXPECT_EQ(static_cast<double>(lse[i]), ref[i]) << "lse " << i;
    } else {
      EXPECT_NEAR(lse[i], ref[i], 1e-5 * (1 + std::fabs(ref[i]))) << "lse " << i;
    }
  }
}

inline void ExpectMatchesReference(const Case& c) {
  const uint32_t seed = FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " case " + c.Name());
  std::mt19937 rng(seed);
  Fixture f(c, rng);

  std::vector<uint8_t> out(f.OutElems() * DTypeSize(c.dtype));
  PoisonWithNan(out.data(), f.OutElems(), c.dtype);
  std::vector<float> lse(c.num_queries * f.opts.num_qo_heads,
                         std::numeric_limits<float>::quiet_NaN());
  CpuPagedAttention(f.pool.data(), f.shape, f.layer, f.seq, f.opts, f.q.data(), out.data(),
                    lse.data(), f.scales);

  std::vector<double> ref_out, ref_lse;
  ReferencePagedAttention(f.pool.data(), f.shape, f.layer, f.seq, f.opts, f.q.data(), &ref_out,
                          &ref_lse, f.scales);
  EXPECT_LT(RelativeError(out.data(), c.dtype, ref_out), Tolerance(c.dtype));
  ExpectLseMatches(lse, ref_lse);
}

inline void PrintTo(const Case& c, std::ostream* os) { *os << c.Name(); }

inline std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  return info.param.Name();
}

// fp8 pools of `storage` under every model dtype: both layouts, GQA groups, page sizes around
// the lengths, decode and prefill, long sequences, and the soft cap and window.
inline std::vector<Case> Fp8Cases(KvStorage storage) {
  std::vector<Case> cases;
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (KvLayout l : {KvLayout::kNHD, KvLayout::kHND}) {
      Case decode;
      decode.storage = storage;
      decode.dtype = t;
      decode.layout = l;
      cases.push_back(decode);
      Case chunk = decode;
      chunk.page_size = 3;
      chunk.head_dim = 72;
      chunk.group = 1;
      chunk.kv_len = 37;
      chunk.num_queries = 5;
      cases.push_back(chunk);
    }
  }
  for (int64_t ps : {1, 16, 64}) {
    for (int64_t len : {ps, ps + 1, 2 * ps + 1}) {
      Case c;
      c.storage = storage;
      c.dtype = DType::kFloat32;
      c.layout = len % 2 ? KvLayout::kHND : KvLayout::kNHD;
      c.page_size = ps;
      c.head_dim = 64;
      c.group = 8;
      c.kv_len = len;
      c.num_queries = std::min<int64_t>(len, 3);
      cases.push_back(c);
    }
  }
  Case long_decode;
  long_decode.storage = storage;
  long_decode.group = 8;
  long_decode.kv_len = 1037;
  long_decode.layout = KvLayout::kHND;
  cases.push_back(long_decode);
  Case prefill;
  prefill.storage = storage;
  prefill.dtype = DType::kFloat16;
  prefill.kv_len = 200;
  prefill.num_queries = 64;
  prefill.soft_cap = 10.0f;
  prefill.sm_scale = 1.0f;
  prefill.head_dim = 64;
  prefill.window = 50;
  cases.push_back(prefill);
  return cases;
}
}  // namespace attnd::kernels::cpu_attention_test_util

#endif  // ATTND_TESTS_UNIT_KERNELS_CPU_ATTENTION_FIXTURE_H_
