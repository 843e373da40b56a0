// Benchmark of attnd's CUDA append and batch decode. Measures in the same run the device's
// read-bandwidth ceiling (a large read-only reduction) and copy bandwidth (device-to-device
// memcpy, bytes read + written), then times each case through CUDA graph replays over inputs
// larger than L2 (several page sets, cycled), median of many replays.
// Prints a table; with --csv FILE also writes machine-readable rows (bench/peers.py reads them).
//
//   decode_bench [--csv FILE] [--quick]
#include <cuda_runtime.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_util.cuh"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/decode_plan.h"

using namespace attnd::kernels;
using attnd::bench::FillRandom;
using attnd::bench::Median;
using attnd::bench::TimeGraph;

namespace {

__global__ void ReadReduce(const uint4* p, size_t n, unsigned* out) {
  // Four independent 16-byte loads in flight per thread per step; n a multiple of 4 * grid.
  unsigned acc = 0;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i + 3 * stride < n;
       i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = __ldcs(p + i + k * stride);
#pragma unroll
    for (int k = 0; k < 4; ++k) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
  }
  if (acc == 0x12345678u) out[0] = acc;  // keeps the loads alive
}

struct DecodeCase {
  int batch, len, qo, kv, d, page;
  KvLayout layout = KvLayout::kNHD;
  int waves = 1;      // grid columns x waves (experiments: smaller splits); 0: 1 CTA/SM
  int min_chunk = 0;  // planner's min_chunk_tokens override (experiments)
  bool pdl = true;    // DecodeArgs::overlap_previous
};

struct Row {
  std::string kind, name;
  double us, gbs, pct;
};

}  // namespace

int main(int argc, char** argv) {
  const char* csv_path = nullptr;
  bool quick = false;
  bool append_only = false;
  bool sweep = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--csv") && i + 1 < argc) csv_path = argv[++i];
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    if (!std::strcmp(argv[i], "--append-only")) append_only = true;
    if (!std::strcmp(argv[i], "--sweep")) sweep = true;
  }
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  int dev = 0;
  CK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);

  // Ceilings.
  const size_t big = size_t(4) << 30;  // 4 GiB
  void* buf;
  CK(cudaMalloc(&buf, big));
  unsigned* sink;
  CK(cudaMalloc(&sink, 4));
  FillRandom<<<4096, 256, 0, s>>>(static_cast<uint16_t*>(buf), big / 2, 1, true);
  const float read_ms = TimeGraph(s, 1, [&] {
    ReadReduce<<<1024, 512, 0, s>>>(static_cast<const uint4*>(buf),
                                                            big / 16, sink);
  }, 20);
  const double read_gbs = big / read_ms / 1e6;
  const float copy_ms = TimeGraph(s, 1, [&] {
    CK(cudaMemcpyAsync(static_cast<char*>(buf) + big / 2, buf, big / 2,
                       cudaMemcpyDeviceToDevice, s));
  }, 20);
  const double copy_gbs = big / copy_ms / 1e6;  // read + write
  std::printf("read ceiling %.0f GB/s, copy %.0f GB/s (read+write)\n", read_gbs, copy_gbs);
  CK(cudaFree(buf));

  FILE* csv = csv_path != nullptr ? std::fopen(csv_path, "w") : nullptr;
  if (csv != nullptr) std::fprintf(csv, "kind,name,us,gbs,pct\n");
  auto emit = [&](const Row& r) {
    if (csv == nullptr) return;
    std::fprintf(csv, "%s,%s,%.3f,%.1f,%.2f\n", r.kind.c_str(), r.name.c_str(), r.us, r.gbs, r.pct);
    std::fflush(csv);
  };
  emit({"ceiling", "read", 0, read_gbs, 100});
  emit({"ceiling", "copy", 0, copy_gbs, 100});

  std::vector<DecodeCase> cases = {
      {1, 4096, 32, 8, 128, 16},   {16, 4096, 32, 8, 128, 16},  {64, 4096, 32, 8, 128, 16},
      {128, 2048, 32, 8, 128, 16}, {256, 1024, 32, 8, 128, 16}, {32, 32768, 32, 8, 128, 16},
      {64, 4096, 32, 8, 64, 16},   {64, 4096, 32, 8, 256, 16},  {64, 4096, 8, 8, 128, 16},
      {64, 4096, 64, 8, 128, 16},
  };
  if (quick) cases.resize(3);
  if (sweep) {  // experiments, non-deterministic only
    cases.clear();
    for (int mc : {128, 256, 512}) cases.push_back({1, 4096, 32, 8, 128, 16, KvLayout::kNHD, 1, mc});
    for (int bsz : {1, 16, 64}) {
      for (bool pdl : {true, false}) {
        cases.push_back({bsz, 4096, 32, 8, 128, 16, KvLayout::kNHD, 1, 0, pdl});
      }
    }
    cases.push_back({32, 32768, 32, 8, 128, 16, KvLayout::kNHD, 1, 0, true});
    cases.push_back({32, 32768, 32, 8, 128, 16, KvLayout::kNHD, 1, 0, false});
  }
  if (append_only) cases.clear();
  std::mt19937 rng(5);
  for (const DecodeCase& c : cases) {
    KvCacheShape sh;
    sh.num_layers = 1;
    sh.page_size = c.page;
    sh.num_kv_heads = c.kv;
    sh.head_dim = c.d;
    sh.layout = c.layout;
    sh.dtype = DType::kBFloat16;
    const int64_t pages_per_seq = (c.len + c.page - 1) / c.page;
    const double kv_bytes = double(c.batch) * c.len * c.kv * c.d * 2 * 2;
    const int copies = std::max(1, static_cast<int>(std::ceil(400e6 / kv_bytes)));
    sh.num_pages = pages_per_seq * c.batch * copies;
    void* pool;
    CK(cudaMalloc(&pool, sh.TotalBytes()));
    FillRandom<<<4096, 256, 0, s>>>(static_cast<uint16_t*>(pool), sh.TotalElems(), rng(), true);
    std::vector<int32_t> perm(sh.num_pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    int32_t* indices;
    CK(cudaMalloc(&indices, perm.size() * 4));
    CK(cudaMemcpy(indices, perm.data(), perm.size() * 4, cudaMemcpyHostToDevice));
    std::vector<int32_t> indptr(c.batch + 1), lens(c.batch, c.len);
    for (int b = 0; b <= c.batch; ++b) indptr[b] = static_cast<int32_t>(b * pages_per_seq);
    const size_t qn = size_t(c.batch) * c.qo * c.d;
    uint16_t *q, *out;
    float* lse;
    CK(cudaMalloc(&q, qn * 2));
    CK(cudaMalloc(&out, qn * 2));
    CK(cudaMalloc(&lse, size_t(c.batch) * c.qo * 4));
    FillRandom<<<256, 256, 0, s>>>(q, qn, rng(), true);

    for (int det = 0; det < (sweep ? 1 : 2); ++det) {
      DecodePlanConfig cfg;
      CK(cuda::MakeDecodePlanConfig(dev, DType::kBFloat16, c.d, c.qo, c.kv, -1, &cfg));
      cfg.deterministic = det != 0;
      if (c.waves == 0) cfg.ctas_per_sm = 1; else cfg.ctas_per_sm *= c.waves;
      if (c.min_chunk > 0) cfg.min_chunk_tokens = c.min_chunk;
      const DecodePlanLayout layout = MakeDecodePlanLayout(c.batch, c.len, cfg);
      const int grid_x = DecodeGridX(c.batch, cfg);
      std::vector<int32_t> plan(layout.TotalInts());
      std::string err;
      int64_t used;
      if (!PlanDecode(lens.data(), indptr.data(), c.batch, grid_x, cfg, layout, plan.data(),
                      &used, &err)) {
        std::fprintf(stderr, "plan: %s\n", err.c_str());
        return 1;
      }
      int32_t* d_plan;
      float *po, *pl;
      int* counters;
      CK(cudaMalloc(&counters, size_t(c.batch) * cfg.kv_head_blocks * 4));
      CK(cudaMemset(counters, 0, size_t(c.batch) * cfg.kv_head_blocks * 4));
      CK(cudaMalloc(&d_plan, plan.size() * 4));
      CK(cudaMemcpy(d_plan, plan.data(), plan.size() * 4, cudaMemcpyHostToDevice));
      CK(cudaMalloc(&po, layout.max_items * c.qo * c.d * 4));
      CK(cudaMalloc(&pl, layout.max_items * c.qo * 4));
      cuda::DecodeArgs a;
      a.kv.pool = pool;
      a.kv.shape = sh;
      a.opts.num_qo_heads = c.qo;
      a.opts.sm_scale = 1.f / std::sqrt(float(c.d));
      a.batch = c.batch;
      a.q = q;
      a.q_stride_b = int64_t(c.qo) * c.d;
      a.q_stride_h = c.d;
      a.out = out;
      a.out_stride_b = a.q_stride_b;
      a.out_stride_h = c.d;
      a.lse = lse;
      a.ws = {d_plan, layout, grid_x, po, pl, counters};
      a.deterministic = cfg.deterministic;
      a.overlap_previous = c.pdl;
      CK(cudaDeviceSynchronize());  // pageable copies may still be in flight
      const int per_graph = std::max(copies, 10);
      auto body = [&] {
        for (int i = 0; i < per_graph; ++i) {
          // Each copy has its own pages; the plan's page-table offsets are relative to this.
          a.kv_indices = indices + size_t(i % copies) * pages_per_seq * c.batch;
          CK(cuda::LaunchBatchDecode(a, s));
        }
      };
      if (&c == &cases.front() && det == 0) TimeGraph(s, per_graph, body);  // clocks, caches
      const float ms = TimeGraph(s, per_graph, body);
      char name[128];
      std::string tag;
      if (c.layout == KvLayout::kHND) tag += " HND";
      if (c.waves == 0) tag += " 1cta/sm";
      if (c.waves > 1) tag += " x" + std::to_string(c.waves);
      if (c.min_chunk > 0) tag += " minchunk" + std::to_string(c.min_chunk);
      if (!c.pdl) tag += " nopdl";
      std::snprintf(name, sizeof name, "B%d L%d qo%d kv%d d%d p%d%s%s", c.batch, c.len, c.qo,
                    c.kv, c.d, c.page, det ? " det" : "", tag.c_str());
      const double gbs = kv_bytes / ms / 1e6;
      emit({"decode", name, ms * 1e3, gbs, 100 * gbs / read_gbs});
      std::printf("decode %-36s %9.2f us %7.0f GB/s %5.1f%% of read  (items %d, chunk %d)\n",
                  name, ms * 1e3, gbs, 100 * gbs / read_gbs, plan[0], plan[1]);
      CK(cudaFree(d_plan));
      CK(cudaFree(po));
      CK(cudaFree(pl));
      CK(cudaFree(counters));
    }
    CK(cudaFree(pool));
    CK(cudaFree(indices));
    CK(cudaFree(q));
    CK(cudaFree(out));
    CK(cudaFree(lse));
  }

  // Append: 256 x 1 token and 1 x 4096 tokens, 8 kv heads x 128, page 16, random slots.
  for (int n : {256, 4096}) {
    KvCacheShape sh;
    sh.num_layers = 1;
    sh.page_size = 16;
    sh.num_kv_heads = 8;
    sh.head_dim = 128;
    sh.num_pages = 65536;
    void* pool;
    CK(cudaMalloc(&pool, sh.TotalBytes()));
    const int copies = 8;
    const size_t row = 8 * 128;
    uint16_t *k, *v;
    CK(cudaMalloc(&k, copies * n * row * 2));
    CK(cudaMalloc(&v, copies * n * row * 2));
    FillRandom<<<1024, 256, 0, s>>>(k, copies * n * row, 3, true);
    FillRandom<<<1024, 256, 0, s>>>(v, copies * n * row, 4, true);
    std::vector<int64_t> slots(copies * n);
    if (n == 1 * 4096) {  // one sequence: consecutive slots over shuffled pages
      std::vector<int32_t> pages(65536);
      std::iota(pages.begin(), pages.end(), 0);
      std::shuffle(pages.begin(), pages.end(), rng);
      for (int i = 0; i < copies * n; ++i) slots[i] = int64_t(pages[i / 16]) * 16 + i % 16;
    } else {  // 256 sequences, one token each, in distinct pages
      std::vector<int32_t> pages(65536);
      std::iota(pages.begin(), pages.end(), 0);
      std::shuffle(pages.begin(), pages.end(), rng);
      for (int i = 0; i < copies * n; ++i) slots[i] = int64_t(pages[i]) * 16 + (i * 7) % 16;
    }
    int64_t* d_slots;
    CK(cudaMalloc(&d_slots, slots.size() * 8));
    CK(cudaMemcpy(d_slots, slots.data(), slots.size() * 8, cudaMemcpyHostToDevice));
    CK(cudaDeviceSynchronize());  // pageable copies may still be in flight
    cuda::AppendArgs a;
    a.kv.pool = pool;
    a.kv.shape = sh;
    a.k_token_stride = a.v_token_stride = row;
    a.num_tokens = n;
    const float ms = TimeGraph(s, copies * 4, [&] {
      for (int i = 0; i < copies * 4; ++i) {
        const int c = i % copies;
        a.k = k + size_t(c) * n * row;
        a.v = v + size_t(c) * n * row;
        a.slot_mapping = d_slots + size_t(c) * n;
        CK(cuda::LaunchAppendKv(a, s));
      }
    });
    const double bytes = 2.0 * n * row * 2 * 2;  // K and V, read + write
    char name[64];
    std::snprintf(name, sizeof name, "%d tokens", n);
    const double gbs = bytes / ms / 1e6;
    emit({"append", name, ms * 1e3, gbs, 100 * gbs / copy_gbs});
    std::printf("append %-36s %9.2f us %7.0f GB/s %5.1f%% of copy\n", name, ms * 1e3, gbs,
                100 * gbs / copy_gbs);
    CK(cudaFree(pool));
    CK(cudaFree(k));
    CK(cudaFree(v));
    CK(cudaFree(d_slots));
  }
  CK(cudaGetLastError());
  if (csv != nullptr) std::fclose(csv);
  return 0;
}
