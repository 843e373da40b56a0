// Helpers of the GPU tests: device detection, device buffers, random paged KV problems and a
// decode runner that owns the plan and workspace buffers the way a backend would.
#ifndef ATTND_TESTS_GPU_GPU_TEST_UTIL_H_
#define ATTND_TESTS_GPU_GPU_TEST_UTIL_H_

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cpu_attention.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/decode_plan.h"

namespace attnd::kernels::testing {

#define ATTND_CUDA_OK(expr)                                                         \
  do {                                                                              \
    const cudaError_t attnd_err_ = (expr);                                          \
    ASSERT_EQ(attnd_err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(attnd_err_); \
  } while (0)

#define ATTND_STATUS_OK(expr)                                        \
  do {                                                               \
    const ::absl::Status attnd_status_ = (expr);                     \
    ASSERT_TRUE(attnd_status_.ok()) << #expr << ": " << attnd_status_; \
  } while (0)

inline bool HasCudaDevice() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define SKIP_WITHOUT_GPU()                                          \
  do {                                                              \
    if (!::attnd::kernels::testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) { Resize(n); }
  ~DeviceBuffer() { if (p_) cudaFree(p_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void Resize(size_t n) {
    if (p_) cudaFree(p_);
    p_ = nullptr;
    n_ = n;
    if (n > 0 && cudaMalloc(&p_, n * sizeof(T)) != cudaSuccess) p_ = nullptr;
  }
  T* get() const { return static_cast<T*>(p_); }
  size_t size() const { return n_; }
  void Upload(const std::vector<T>& h) {
    if (h.size() > n_) Resize(h.size());
    // A pageable cudaMemcpy may return before its DMA lands; kernels on other streams must not
    // race it.
    cudaMemcpy(p_, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
    cudaDeviceSynchronize();
  }
  std::vector<T> Download() const {
    std::vector<T> h(n_);
    cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
    return h;
  }
  void Fill(uint8_t byte) {
    cudaMemset(p_, byte, n_ * sizeof(T));
    cudaDeviceSynchronize();
  }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
};

// Fast random fill of 16-bit storage: normal-ish values times `scale`.
inline void RandomFill16(std::vector<uint16_t>* v, DType dtype, float scale, uint64_t seed) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < v->size(); ++i) {
    s ^= s << 13; s ^= s >> 7; s ^= s << 17;
    // Sum of 4 uniforms: roughly normal, mean 0, variance 1/3.
    const uint32_t a = static_cast<uint32_t>(s), b = static_cast<uint32_t>(s >> 32);
    const float u = ((a & 0xffff) + (a >> 16) + (b & 0xffff) + (b >> 16)) / 65536.0f - 2.0f;
    StoreFromFloat(v->data(), static_cast<int64_t>(i), dtype, u * 1.7320508f * scale);
  }
}

struct DecodeProblemSpec {
  DType dtype = DType::kBFloat16;
  int64_t head_dim = 128;
  int64_t qo_heads = 32;
  int64_t kv_heads = 8;
  int64_t page_size = 16;
  KvLayout layout = KvLayout::kNHD;
  float soft_cap = 0.f;
  int64_t window_left = -1;
  int64_t num_layers = 2;
  int64_t layer = 1;
  int64_t q_pad = 0;  // extra elements per q/out head row (strided q and out)
  bool fp8 = false;   // an fp8 e4m3 pool with random per-layer scales
  bool token_scales = false;  // with fp8: random per-(token, head) scales instead
  // NaN in every slot past a sequence's end on its last page, as a reused page may hold; a
  // kernel must not let them reach its output (0 x NaN is NaN).
  bool nan_past_end = false;

  KvStorage Storage() const {
    return !fp8 ? KvStorage::kModelDType
                : token_scales ? KvStorage::kFp8E4M3PerToken : KvStorage::kFp8E4M3;
  }
};

// Random e4m3 bytes of roughly normal values times `scale` (no NaN codes: the encoder
// saturates), as the CPU backend would store them.
inline void RandomFillFp8(uint8_t* v, size_t n, float scale, uint64_t seed) {
  std::vector<uint16_t> tmp(n);
  RandomFill16(&tmp, DType::kFloat16, scale, seed);
  for (size_t i = 0; i < n; ++i) {
    StoreFromFloat(v, static_cast<int64_t>(i), DType::kFloat8E4M3,
                   LoadAsFloat(tmp.data(), static_cast<int64_t>(i), DType::kFloat16));
  }
}

// A random pool for requests of `kv_lens` keys (plus `extra_pages` no request owns), their page
// tables drawn from a shuffled page list (CSR: indptr, indices), and the model options.
struct RandomPagedKv {
  KvCacheShape shape;
  AttentionOptions opts;
  std::vector<int32_t> indptr;
  std::vector<int32_t> indices;
  std::vector<uint16_t> pool;  // host copy (fp8 pools: two bytes per element)
  std::vector<KvScales> scales;  // per layer; 1 and 1 unless fp8

  void Build(const DecodeProblemSpec& s, const std::vector<int32_t>& kv_lens, int64_t extra_pages,
             std::mt19937_64& rng) {
    shape.num_layers = s.num_layers;
    shape.page_size = s.page_size;
    shape.num_kv_heads = s.kv_heads;
    shape.head_dim = s.head_dim;
    shape.layout = s.layout;
    shape.dtype = s.dtype;
    int64_t pages = extra_pages;
    for (int32_t l : kv_lens) pages += (l + s.page_size - 1) / s.page_size;
    shape.num_pages = pages;
    std::vector<int32_t> perm(pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    indptr.assign(1, 0);
    indices.clear();
    size_t next = 0;
    for (int32_t l : kv_lens) {
      const int64_t n = (l + s.page_size - 1) / s.page_size;
      for (int64_t i = 0; i < n; ++i) indices.push_back(perm[next++]);
      indptr.push_back(static_cast<int32_t>(indices.size()));
    }
    if (indices.empty()) indices.push_back(0);
    scales.assign(static_cast<size_t>(s.num_layers), KvScales{});
    if (s.fp8) {
      // Codes spread over e4m3's range (up to ~60 of 448), scales that bring K and V back to
      // about unit size: both the codes and the scale factors matter.
      shape.storage = s.Storage();
      std::uniform_real_distribution<float> scale(0.03f, 0.15f);
      if (!s.token_scales) {
        for (KvScales& sc : scales) sc = {scale(rng), scale(rng)};
      }
      pool.resize(static_cast<size_t>(shape.TotalBytes() + 1) / 2);
      auto* bytes = reinterpret_cast<uint8_t*>(pool.data());
      RandomFillFp8(bytes, shape.KvBytes(), 12.0f, rng());
      if (s.token_scales) {
        // Every (token, head) its own scale; one row in 16 ten times larger (an outlier token).
        float* token = reinterpret_cast<float*>(bytes + shape.ScalesByteOffset());
        for (int64_t i = 0; i < shape.num_layers * shape.LayerScales(); ++i)
          token[i] = scale(rng) * (rng() % 16 == 0 ? 10.f : 1.f);
      }
    } else {
      pool.resize(shape.TotalElems());
      RandomFill16(&pool, s.dtype, 1.0f, rng());
    }
    if (s.nan_past_end) PoisonPastEnd(kv_lens);
    opts.num_qo_heads = s.qo_heads;
    opts.sm_scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
    opts.logits_soft_cap = s.soft_cap;
    opts.window_left = s.window_left;
  }

  // NaN (the e4m3 NaN code, and NaN per-token scales, in fp8 pools) in each sequence's slots
  // past its end on its last page.
  void PoisonPastEnd(const std::vector<int32_t>& kv_lens) {
    const uint16_t nan16 = shape.dtype == DType::kFloat16 ? 0x7e00 : 0x7fc0;
    auto* bytes = reinterpret_cast<uint8_t*>(pool.data());
    for (size_t b = 0; b < kv_lens.size(); ++b) {
      const int64_t used = kv_lens[b] % shape.page_size;
      if (used == 0) continue;
      const int64_t page = indices[indptr[b + 1] - 1];
      for (int64_t layer = 0; layer < shape.num_layers; ++layer) {
        for (int kv = 0; kv < 2; ++kv) {
          for (int64_t slot = used; slot < shape.page_size; ++slot) {
            for (int64_t h = 0; h < shape.num_kv_heads; ++h) {
              const int64_t o = shape.Offset(layer, page, kv, slot, h);
              if (shape.Fp8()) {
                std::fill(bytes + o, bytes + o + shape.head_dim, uint8_t{0x7f});
              } else {
                std::fill(pool.begin() + o, pool.begin() + o + shape.head_dim, nan16);
              }
              if (shape.TokenScales()) {
                reinterpret_cast<float*>(bytes + shape.ScalesByteOffset())[shape.ScaleOffset(
                    layer, page, kv, slot, h)] = std::nanf("");
              }
            }
          }
        }
      }
    }
  }
};

// A random batch over a shared pool: page tables drawn from a shuffled page list.
struct DecodeProblem {
  DecodeProblemSpec spec;
  KvCacheShape shape;
  AttentionOptions opts;
  std::vector<int32_t> lens;
  std::vector<int32_t> indptr;
  std::vector<int32_t> indices;
  std::vector<uint16_t> pool;  // host copy
  std::vector<KvScales> scales;
  std::vector<uint16_t> q;     // [batch][qo_heads][head_dim + q_pad]
  int64_t q_sh = 0, q_sb = 0;

  void Build(const DecodeProblemSpec& s, const std::vector<int32_t>& lengths, uint64_t seed,
             int64_t extra_pages = 3) {
    spec = s;
    lens = lengths;
    std::mt19937_64 rng(seed);
    RandomPagedKv kv;
    kv.Build(s, lens, extra_pages, rng);
    shape = kv.shape;
    opts = kv.opts;
    indptr = std::move(kv.indptr);
    indices = std::move(kv.indices);
    pool = std::move(kv.pool);
    scales = std::move(kv.scales);
    q_sh = s.head_dim + s.q_pad;
    q_sb = s.qo_heads * q_sh;
    q.resize(lens.size() * q_sb);
    RandomFill16(&q, s.dtype, 1.0f, rng());
  }

  int batch() const { return static_cast<int>(lens.size()); }

  // fp64 reference for request b: out [qo_heads][head_dim], lse [qo_heads].
  void Reference(int b, std::vector<double>* out, std::vector<double>* lse) const {
    std::vector<uint16_t> qb(spec.qo_heads * spec.head_dim);
    for (int64_t h = 0; h < spec.qo_heads; ++h) {
      std::memcpy(&qb[h * spec.head_dim], &q[b * q_sb + h * q_sh], spec.head_dim * 2);
    }
    SequenceView seq;
    seq.page_table = indices.data() + indptr[b];
    seq.kv_len = lens[b];
    seq.num_queries = 1;
    ReferencePagedAttention(pool.data(), shape, spec.layer, seq, opts, qb.data(), out, lse,
                            scales[spec.layer]);
  }
};

// A device address for tests of argument checks, which never reach the device: 16-byte aligned
// (plus `misalign` bytes).
template <typename T = void>
T* FakeDevicePointer(uintptr_t misalign = 0) {
  return reinterpret_cast<T*>(uintptr_t{1} << 20 | misalign);
}

// Device-side state of one decode configuration, as a backend would hold it per bucket.
struct DecodeRunner {
  DecodePlanConfig cfg;
  DecodePlanLayout layout;
  int grid_x = 0;
  std::vector<int32_t> plan_host;
  DeviceBuffer<int32_t> plan;
  DeviceBuffer<float> partial_out, partial_lse;
  DeviceBuffer<int> counters;

  // max_batch: bucket; max_len: longest sequence the buffers must serve.
  void Init(const DecodeProblemSpec& s, int max_batch, int64_t max_len, bool deterministic,
            int fixed_chunk = 1024) {
    int dev = 0;
    cudaGetDevice(&dev);
    KvCacheShape shape;
    shape.dtype = s.dtype;
    shape.storage = s.Storage();
    shape.head_dim = s.head_dim;
    shape.num_kv_heads = s.kv_heads;
    shape.layout = s.layout;
    absl::StatusOr<DecodePlanConfig> made =
        cuda::MakeDecodePlanConfig(dev, shape, s.qo_heads, s.window_left);
    ASSERT_TRUE(made.ok()) << made.status();
    cfg = *made;
    cfg.deterministic = deterministic;
    cfg.fixed_chunk_tokens = fixed_chunk;
    layout = MakeDecodePlanLayout(max_batch, max_len, cfg);
    grid_x = DecodeGridX(max_batch, cfg);
    const DecodeWorkspaceSizes w = DecodeWorkspaceFor(layout, cfg, s.qo_heads, s.head_dim);
    plan_host.assign(w.plan_bytes / 4, 0);
    plan.Resize(w.plan_bytes / 4);
    partial_out.Resize(w.partial_out_bytes / 4);
    partial_lse.Resize(w.partial_lse_bytes / 4);
    counters.Resize(w.counter_bytes / 4);
    counters.Fill(0);
  }

  // Plans on the host and copies the plan to the device (synchronously).
  void Plan(const std::vector<int32_t>& lens, const std::vector<int32_t>& indptr) {
    int64_t used = 0;
    std::string err;
    ASSERT_TRUE(PlanDecode(lens.data(), indptr.data(), static_cast<int>(lens.size()), grid_x,
                           cfg, layout, plan_host.data(), &used, &err))
        << err;
    ATTND_CUDA_OK(cudaMemcpy(plan.get(), plan_host.data(), used * 4, cudaMemcpyHostToDevice));
    ATTND_CUDA_OK(cudaDeviceSynchronize());
  }

  cuda::DecodeWorkspace Workspace() const {
    cuda::DecodeWorkspace ws;
    ws.plan = plan.get();
    ws.layout = layout;
    ws.grid_x = grid_x;
    ws.partial_out = partial_out.get();
    ws.partial_lse = partial_lse.get();
    ws.counters = counters.get();
    ws.kv_head_blocks = cfg.kv_head_blocks;
    return ws;
  }
};

// Device copies of a problem's tensors.
struct DeviceProblem {
  DeviceBuffer<uint16_t> pool, q, out;
  DeviceBuffer<float> lse, scales;
  DeviceBuffer<int32_t> indptr, indices, lens;

  void Upload(const DecodeProblem& p) {
    std::vector<float> flat;
    for (const KvScales& sc : p.scales) flat.insert(flat.end(), {sc.k, sc.v});
    scales.Upload(flat);
    pool.Resize(p.pool.size());
    pool.Upload(p.pool);
    q.Resize(p.q.size());
    q.Upload(p.q);
    out.Resize(p.q.size());
    lse.Resize(std::max<size_t>(1, p.lens.size() * p.spec.qo_heads));
    indptr.Upload(p.indptr);
    indices.Upload(p.indices);
    lens.Upload(p.lens.empty() ? std::vector<int32_t>{0} : p.lens);
  }
  void Poison() {
    out.Fill(0xff);  // NaN in fp16 and bf16
    lse.Fill(0xff);  // NaN
  }
  cuda::DecodeArgs Args(const DecodeProblem& p, const DecodeRunner& r) const {
    cuda::DecodeArgs a;
    a.kv.pool = pool.get();
    a.kv.shape = p.shape;
    a.kv.layer = p.spec.layer;
    a.kv.scales = scales.get();
    a.opts = p.opts;
    a.batch = p.batch();
    a.q = q.get();
    a.q_stride_b = p.q_sb;
    a.q_stride_h = p.q_sh;
    a.out = out.get();
    a.out_stride_b = p.q_sb;
    a.out_stride_h = p.q_sh;
    a.lse = lse.get();
    a.kv_indices = indices.get();
    a.ws = r.Workspace();
    a.deterministic = r.cfg.deterministic;
    return a;
  }
};

}  // namespace attnd::kernels::testing

#endif  // ATTND_TESTS_GPU_GPU_TEST_UTIL_H_
