// Helpers of the prefill GPU tests: a random ragged batch over a shared, shuffled pool with its
// fp64 reference, a runner that owns the plan and workspace the way a backend would, and the
// comparison of an output with the reference.
#ifndef ATTND_TESTS_GPU_PREFILL_TEST_UTIL_H_
#define ATTND_TESTS_GPU_PREFILL_TEST_UTIL_H_

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/prefill_plan.h"
#include "tests/gpu/gpu_test_util.h"

namespace attnd::kernels::testing {

struct Req {
  int32_t q_len, kv_len;
};

// A random ragged batch over a shared pool with shuffled pages.
struct PrefillProblem {
  DecodeProblemSpec spec;
  KvCacheShape shape;
  AttentionOptions opts;
  std::vector<Req> reqs;
  std::vector<int32_t> qo_indptr, kv_len, kv_indptr, indices;
  std::vector<uint16_t> pool, q;
  std::vector<KvScales> scales;
  int64_t q_sh = 0, q_sn = 0;

  void Build(const DecodeProblemSpec& s, const std::vector<Req>& r, uint64_t seed) {
    spec = s;
    reqs = r;
    std::mt19937_64 rng(seed);
    qo_indptr.assign(1, 0);
    kv_len.clear();
    for (const Req& x : reqs) {
      qo_indptr.push_back(qo_indptr.back() + x.q_len);
      kv_len.push_back(x.kv_len);
    }
    RandomPagedKv kv;
    kv.Build(s, kv_len, /*extra_pages=*/3, rng);
    shape = kv.shape;
    opts = kv.opts;
    kv_indptr = std::move(kv.indptr);
    indices = std::move(kv.indices);
    pool = std::move(kv.pool);
    scales = std::move(kv.scales);
    q_sh = s.head_dim + s.q_pad;
    q_sn = s.qo_heads * q_sh;
    q.resize(std::max<int64_t>(1, qo_indptr.back()) * q_sn);
    RandomFill16(&q, s.dtype, 1.0f, rng());
  }
  int batch() const { return static_cast<int>(reqs.size()); }
  int total_q() const { return qo_indptr.back(); }

  // fp64 reference of request b: out [q_len][qo_heads][head_dim], lse [q_len][qo_heads].
  void Reference(int b, std::vector<double>* out, std::vector<double>* lse) const {
    const int64_t H = spec.qo_heads, D = spec.head_dim;
    const int64_t n = reqs[b].q_len;
    std::vector<uint16_t> qb(n * H * D);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < H; ++h) {
        std::memcpy(&qb[(i * H + h) * D], &q[(qo_indptr[b] + i) * q_sn + h * q_sh], D * 2);
      }
    }
    SequenceView seq;
    seq.page_table = indices.data() + kv_indptr[b];
    seq.kv_len = reqs[b].kv_len;
    seq.num_queries = n;
    ReferencePagedAttention(pool.data(), shape, spec.layer, seq, opts, qb.data(), out, lse,
                            scales[spec.layer]);
  }
};

struct PrefillRunner {
  PrefillPlanConfig cfg;
  PrefillPlanLayout layout;
  std::vector<int32_t> plan_host;
  DeviceBuffer<int32_t> plan, indices;
  DeviceBuffer<uint16_t> pool, q, out;
  DeviceBuffer<float> lse, partial_out, partial_lse;
  // fp8 pools, as the CUDA backend serves them: the batch's pages dequantized into a staging
  // pool of one layer, read through identity page ids.
  DeviceBuffer<float> scales;
  DeviceBuffer<uint16_t> staged;
  DeviceBuffer<int32_t> identity;
  KvCacheShape staged_shape;
  int grid_y = 0;
  cuda::PrefillKernel kernel = cuda::PrefillKernel::kAuto;
  // The Hopper kernel's work counters, passed as the server passes them (a persistent grid).
  DeviceBuffer<int32_t> counters;

  void Init(const PrefillProblem& p, bool det, int fixed_chunk = 512, int64_t max_total_q = 0,
            int64_t max_kv = 0, int max_batch = 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    absl::StatusOr<PrefillPlanConfig> made =
        cuda::MakePrefillPlanConfig(dev, p.spec.dtype, p.spec.head_dim, p.spec.qo_heads,
                                    p.spec.kv_heads, p.spec.window_left, true, kernel);
    ASSERT_TRUE(made.ok()) << made.status();
    cfg = *made;
    cfg.deterministic = det;
    cfg.fixed_chunk_tokens = fixed_chunk;
    int64_t mk = max_kv;
    for (const Req& r : p.reqs) mk = std::max<int64_t>(mk, r.kv_len);
    layout = MakePrefillPlanLayout(std::max(max_batch, p.batch()),
                                   std::max<int64_t>(max_total_q, p.total_q()), mk, cfg);
    const PrefillWorkspaceSizes w = PrefillWorkspaceFor(layout, p.spec.kv_heads, p.spec.head_dim);
    plan_host.assign(w.plan_bytes / 4, 0);
    plan.Resize(w.plan_bytes / 4);
    partial_out.Resize(std::max<int64_t>(1, w.partial_out_bytes / 4));
    partial_lse.Resize(std::max<int64_t>(1, w.partial_lse_bytes / 4));
    counters.Resize(w.counter_bytes / 4);
    counters.Fill(0);
  }
  void Upload(const PrefillProblem& p) {
    pool.Resize(p.pool.size());
    pool.Upload(p.pool);
    q.Resize(p.q.size());
    q.Upload(p.q);
    out.Resize(p.q.size());
    lse.Resize(std::max<int64_t>(1, p.total_q()) * p.spec.qo_heads);
    indices.Resize(p.indices.size());
    indices.Upload(p.indices);
    if (p.spec.fp8) Stage(p);
  }
  void Stage(const PrefillProblem& p) {
    std::vector<float> flat;
    for (const KvScales& sc : p.scales) flat.insert(flat.end(), {sc.k, sc.v});
    scales.Upload(flat);
    const int64_t n = static_cast<int64_t>(p.indices.size());
    staged.Resize(n * p.shape.PageElems());
    std::vector<int32_t> ids(n);
    std::iota(ids.begin(), ids.end(), 0);
    identity.Upload(ids);
    cuda::DequantizePagesArgs a;
    a.kv = {pool.get(), p.shape, p.spec.layer, nullptr, scales.get()};
    a.pages = indices.get();
    a.num_pages = n;
    a.dst = staged.get();
    ATTND_STATUS_OK(cuda::LaunchDequantizePages(a, nullptr));
    ATTND_CUDA_OK(cudaDeviceSynchronize());
    staged_shape = p.shape;
    staged_shape.num_layers = 1;
    staged_shape.num_pages = n;
    staged_shape.storage = KvStorage::kModelDType;
  }
  void Plan(const PrefillProblem& p) {
    std::string err;
    ASSERT_TRUE(PlanPrefill(p.qo_indptr.data(), p.kv_len.data(), p.kv_indptr.data(), p.batch(),
                            cfg, layout, plan_host.data(), &err))
        << err;
    ATTND_CUDA_OK(cudaMemcpy(plan.get(), plan_host.data(), plan_host.size() * 4,
                             cudaMemcpyHostToDevice));
    ATTND_CUDA_OK(cudaDeviceSynchronize());
    grid_y = std::max(1, plan_host[0]);
  }
  void Poison() {
    out.Fill(0xff);
    lse.Fill(0xff);
  }
  cuda::PrefillArgs Args(const PrefillProblem& p) const {
    cuda::PrefillArgs a;
    a.kv.pool = pool.get();
    a.kv.shape = p.shape;
    a.kv.layer = p.spec.layer;
    a.opts = p.opts;
    a.causal = true;
    a.q = q.get();
    a.q_stride_n = p.q_sn;
    a.q_stride_h = p.q_sh;
    a.out = out.get();
    a.out_stride_n = p.q_sn;
    a.out_stride_h = p.q_sh;
    a.lse = lse.get();
    a.kv_indices = indices.get();
    if (p.spec.fp8) {
      a.kv = {staged.get(), staged_shape, 0};
      a.kv_indices = identity.get();
    }
    a.ws.plan = plan.get();
    a.ws.layout = layout;
    a.ws.grid_y = grid_y;
    a.ws.partial_out = partial_out.get();
    a.ws.partial_lse = partial_lse.get();
    a.ws.work_counters = counters.get();
    a.kernel = kernel;
    return a;
  }
};

struct Stats {
  double rel = 0, lse_max = 0;
  bool finite = true;
};

inline Stats Check(const PrefillProblem& p, const std::vector<uint16_t>& out,
            const std::vector<float>& lse) {
  Stats st;
  double num = 0, den = 0;
  const int64_t H = p.spec.qo_heads, D = p.spec.head_dim;
  for (int b = 0; b < p.batch(); ++b) {
    if (p.reqs[b].q_len == 0) continue;
    std::vector<double> ref, ref_lse;
    p.Reference(b, &ref, &ref_lse);
    for (int64_t i = 0; i < p.reqs[b].q_len; ++i) {
      const int64_t n = p.qo_indptr[b] + i;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t d = 0; d < D; ++d) {
          const double x = LoadAsFloat(out.data(), n * p.q_sn + h * p.q_sh + d, p.spec.dtype);
          if (!std::isfinite(x)) st.finite = false;
          const double r = ref[(i * H + h) * D + d];
          num += (x - r) * (x - r);
          den += r * r;
        }
        const double l = lse[n * H + h];
        if (!std::isfinite(l)) st.finite = false;
        st.lse_max = std::max(st.lse_max, std::fabs(l - ref_lse[i * H + h]));
      }
    }
  }
  st.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return st;
}

}  // namespace attnd::kernels::testing

#endif  // ATTND_TESTS_GPU_PREFILL_TEST_UTIL_H_
