// Benchmark of attnd's CUDA batch prefill. Measures in the same run the device's mma.sync bf16
// ceiling (independent m16n8k16 MMAs from registers, the instruction the kernel uses), then
// times each case through CUDA graph replays over several copies of the inputs (separate page
// sets and query buffers, > L2 together), median of 30 replays. FLOPs count 4 * d * heads per
// visible (query, key) pair. Writes CSV rows with --csv (bench/peers.py --prefill reads them).
//
//   prefill_bench [--csv FILE] [--quick] [--only TEXT] [--mixed] [--waves]
// --quick: the prompts through the default kernel only (no portable, fp8 or mixed rows);
// --waves: also noncausal cases of 33 requests, whose units fill 132 SMs' slots exactly (4
// requests leave the last round half full): the kernel's rate without the tail, and at 4096
// keys with half the units per key (what each unit's start and end cost); and 4 requests of
// 1920 keys, whole tiles of 96, 128 and 160 keys (2048 is whole tiles of 128 only);
// --only: the prompt cases whose name contains TEXT (experiments and ncu).
// --mixed: the mixed rows only (with --only, those whose name contains TEXT).
#include <cuda_runtime.h>

#include <cuda_bf16.h>

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
#include "kernels/prefill_plan.h"

using namespace attnd::kernels;
using attnd::bench::FillRandom;
using attnd::bench::Median;
using attnd::bench::TimeGraph;
using attnd::bench::ValueOrExit;

namespace {

// 8 independent accumulators per warp, kIters rounds: the mma.sync issue ceiling.
constexpr int kMmaIters = 4096;
__global__ void MmaPeak(float* sink, uint32_t seed) {
  uint32_t a[4] = {seed, seed ^ 1u, seed ^ 2u, seed ^ 3u};
  uint32_t b0 = seed * 3u, b1 = seed * 5u;
  float d[8][4] = {};
  for (int i = 0; i < kMmaIters; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
          "{%8,%9}, {%0,%1,%2,%3};\n"
          : "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
  }
  float s = 0.f;
  for (int j = 0; j < 8; ++j) s += d[j][0] + d[j][1] + d[j][2] + d[j][3];
  if (s == 1.2345f) sink[0] = s;
}

struct Req {
  int q_len, kv_len;
};

// One batch on the device in `copies` copies (own pages and queries each), with its plan.
struct Batch {
  std::vector<Req> reqs;
  int qo = 32, kv = 8, d = 128, page = 16;
  bool causal = true;
  int copies = 1;
  KvCacheShape sh;
  void* pool = nullptr;
  int32_t* indices = nullptr;
  uint16_t *q = nullptr, *out = nullptr;
  float* lse = nullptr;
  int64_t pages = 0, total_q = 0;
  std::vector<int32_t> qo_indptr, kv_len, kv_indptr;
  double flops = 0, kv_bytes = 0;

  void Build(cudaStream_t s, std::mt19937& rng) {
    qo_indptr.assign(1, 0);
    kv_indptr.assign(1, 0);
    for (const Req& r : reqs) {
      qo_indptr.push_back(qo_indptr.back() + r.q_len);
      kv_indptr.push_back(kv_indptr.back() + (r.kv_len + page - 1) / page);
      kv_len.push_back(r.kv_len);
      double pairs = causal ? r.q_len * (r.kv_len - r.q_len) + 0.5 * r.q_len * (r.q_len + 1.0)
                            : double(r.q_len) * r.kv_len;
      flops += 4.0 * d * qo * pairs;
      kv_bytes += double(r.kv_len) * kv * d * 4;
    }
    pages = kv_indptr.back();
    total_q = qo_indptr.back();
    const double per_copy = kv_bytes + total_q * qo * d * 4.0;
    copies = std::max(1, static_cast<int>(std::ceil(300e6 / per_copy)));
    sh.num_layers = 1;
    sh.page_size = page;
    sh.num_kv_heads = kv;
    sh.head_dim = d;
    sh.dtype = DType::kBFloat16;
    sh.num_pages = pages * copies;
    CK(cudaMalloc(&pool, sh.TotalBytes()));
    FillRandom<<<4096, 256, 0, s>>>(static_cast<uint16_t*>(pool), sh.TotalElems(), rng(), true);
    std::vector<int32_t> perm(sh.num_pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    CK(cudaMalloc(&indices, perm.size() * 4));
    CK(cudaMemcpy(indices, perm.data(), perm.size() * 4, cudaMemcpyHostToDevice));
    const size_t qn = size_t(total_q) * qo * d * copies;
    CK(cudaMalloc(&q, qn * 2));
    CK(cudaMalloc(&out, qn * 2));
    CK(cudaMalloc(&lse, size_t(total_q) * qo * copies * 4));
    FillRandom<<<1024, 256, 0, s>>>(q, qn, rng(), true);
    CK(cudaDeviceSynchronize());
  }
  void Free() {
    cudaFree(pool);
    cudaFree(indices);
    cudaFree(q);
    cudaFree(out);
    cudaFree(lse);
  }
};

// A planned prefill launch over a batch.
struct PrefillRun {
  PrefillPlanLayout layout;
  std::vector<int32_t> plan;
  int32_t* d_plan = nullptr;
  float *po = nullptr, *pl = nullptr;
  int* counters = nullptr;
  cuda::PrefillArgs a;

  void Init(int dev, const Batch& b, bool det,
            cuda::PrefillKernel kernel = cuda::PrefillKernel::kAuto) {
    PrefillPlanConfig cfg = ValueOrExit(
        cuda::MakePrefillPlanConfig(dev, DType::kBFloat16, b.d, b.qo, b.kv, -1, b.causal, kernel),
        "prefill config");
    a.kernel = kernel;
    cfg.deterministic = det;
    cfg.fixed_chunk_tokens = 1024;
    int64_t mk = 0;
    for (const Req& r : b.reqs) mk = std::max<int64_t>(mk, r.kv_len);
    layout = MakePrefillPlanLayout(static_cast<int>(b.reqs.size()), b.total_q, mk, cfg);
    plan.assign(layout.TotalInts(), 0);
    std::string err;
    if (!PlanPrefill(b.qo_indptr.data(), b.kv_len.data(), b.kv_indptr.data(),
                     static_cast<int>(b.reqs.size()), cfg, layout, plan.data(), &err)) {
      std::fprintf(stderr, "plan: %s\n", err.c_str());
      std::exit(1);
    }
    const PrefillWorkspaceSizes w = PrefillWorkspaceFor(layout, b.kv, b.d);
    CK(cudaMalloc(&d_plan, w.plan_bytes));
    CK(cudaMemcpy(d_plan, plan.data(), w.plan_bytes, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&po, std::max<int64_t>(4, w.partial_out_bytes)));
    CK(cudaMalloc(&pl, std::max<int64_t>(4, w.partial_lse_bytes)));
    a.kv.pool = b.pool;
    a.kv.shape = b.sh;
    a.opts.num_qo_heads = b.qo;
    a.opts.sm_scale = 1.f / std::sqrt(float(b.d));
    a.causal = b.causal;
    a.q_stride_n = int64_t(b.qo) * b.d;
    a.q_stride_h = b.d;
    a.out_stride_n = a.q_stride_n;
    a.out_stride_h = b.d;
    a.ws.plan = d_plan;
    a.ws.layout = layout;
    a.ws.grid_y = std::max(1, std::min(plan[0], 65535));
    // Experiments: fewer CTA columns, each looping over items y, y + grid_y, ...
    if (const char* gy = std::getenv("ATTND_BENCH_PREFILL_GRID_Y")) {
      a.ws.grid_y = std::max(1, std::min(a.ws.grid_y, std::atoi(gy)));
    }
    a.ws.partial_out = po;
    a.ws.partial_lse = pl;
    // As the server runs it: the Hopper kernel's persistent grid. ATTND_BENCH_PREFILL_STATIC=1:
    // a CTA per (item, kv head) instead (experiments).
    CK(cudaMalloc(&counters, w.counter_bytes));
    CK(cudaMemset(counters, 0, w.counter_bytes));
    const char* static_grid = std::getenv("ATTND_BENCH_PREFILL_STATIC");
    if (static_grid == nullptr || std::atoi(static_grid) == 0) a.ws.work_counters = counters;
    a.may_merge = plan[1] > 0;
    // As the server decides it: the kernel without ping-pong for batches of narrow items.
    a.wide_items = false;
    for (const Req& r : b.reqs)
      a.wide_items = a.wide_items || int64_t(r.q_len) * (b.qo / b.kv) > kPrefillDecodeRows;
    CK(cudaDeviceSynchronize());
  }
  void Launch(const Batch& b, int copy, cudaStream_t s) {
    a.kv_indices = b.indices + size_t(copy) * b.pages;
    a.q = b.q + size_t(copy) * b.total_q * b.qo * b.d;
    a.out = b.out + size_t(copy) * b.total_q * b.qo * b.d;
    a.lse = b.lse + size_t(copy) * b.total_q * b.qo;
    CK_OK(cuda::LaunchBatchPrefill(a, s));
  }
  void Free() {
    cudaFree(d_plan);
    cudaFree(po);
    cudaFree(pl);
    cudaFree(counters);
  }
};

// Batch decode over a batch of q_len-1 requests (the two-launch baseline of the mixed case).
struct DecodeRun {
  DecodePlanLayout layout;
  int32_t* d_plan = nullptr;
  float *po = nullptr, *pl = nullptr;
  int* counters = nullptr;
  cuda::DecodeArgs a;
  void Init(int dev, const Batch& b) {
    KvCacheShape shape;
    shape.head_dim = b.d;
    shape.num_kv_heads = b.kv;
    const DecodePlanConfig cfg =
        ValueOrExit(cuda::MakeDecodePlanConfig(dev, shape, b.qo, -1), "decode config");
    const int batch = static_cast<int>(b.reqs.size());
    int64_t mk = 0;
    for (const Req& r : b.reqs) mk = std::max<int64_t>(mk, r.kv_len);
    layout = MakeDecodePlanLayout(batch, mk, cfg);
    const int grid_x = DecodeGridX(batch, cfg);
    std::vector<int32_t> plan(layout.TotalInts());
    std::string err;
    int64_t used;
    if (!PlanDecode(b.kv_len.data(), b.kv_indptr.data(), batch, grid_x, cfg, layout, plan.data(),
                    &used, &err)) {
      std::fprintf(stderr, "decode plan: %s\n", err.c_str());
      std::exit(1);
    }
    const DecodeWorkspaceSizes w = DecodeWorkspaceFor(layout, cfg, b.qo, b.d);
    CK(cudaMalloc(&d_plan, w.plan_bytes));
    CK(cudaMemcpy(d_plan, plan.data(), w.plan_bytes, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&po, w.partial_out_bytes));
    CK(cudaMalloc(&pl, w.partial_lse_bytes));
    CK(cudaMalloc(&counters, w.counter_bytes));
    CK(cudaMemset(counters, 0, w.counter_bytes));
    a.kv.pool = b.pool;
    a.kv.shape = b.sh;
    a.opts.num_qo_heads = b.qo;
    a.opts.sm_scale = 1.f / std::sqrt(float(b.d));
    a.batch = batch;
    a.q_stride_b = int64_t(b.qo) * b.d;
    a.q_stride_h = b.d;
    a.out_stride_b = a.q_stride_b;
    a.out_stride_h = b.d;
    a.ws = {d_plan, layout, grid_x, po, pl, counters, cfg.kv_head_blocks};
    CK(cudaDeviceSynchronize());
  }
  void Launch(const Batch& b, int copy, cudaStream_t s) {
    a.kv_indices = b.indices + size_t(copy) * b.pages;
    a.q = b.q + size_t(copy) * b.total_q * b.qo * b.d;
    a.out = b.out + size_t(copy) * b.total_q * b.qo * b.d;
    a.lse = b.lse + size_t(copy) * b.total_q * b.qo;
    CK_OK(cuda::LaunchBatchDecode(a, s));
  }
  void Free() {
    cudaFree(d_plan);
    cudaFree(po);
    cudaFree(pl);
    cudaFree(counters);
  }
};

// Prints each result and, with --csv, writes it as a row bench/peers.py --prefill reads.
class Emitter {
 public:
  explicit Emitter(const char* csv_path)
      : csv_(csv_path != nullptr ? std::fopen(csv_path, "w") : nullptr) {
    if (csv_ != nullptr) std::fprintf(csv_, "kind,name,us,tflops,items,merges\n");
  }
  ~Emitter() {
    if (csv_ != nullptr) std::fclose(csv_);
  }
  void operator()(const char* kind, const std::string& name, double us, double tf, int items,
                  int merges) {
    std::printf("%-8s %-44s %10.2f us %7.1f TFLOP/s  (items %d, merges %d)\n", kind,
                name.c_str(), us, tf, items, merges);
    if (csv_ != nullptr) {
      std::fprintf(csv_, "%s,%s,%.3f,%.2f,%d,%d\n", kind, name.c_str(), us, tf, items, merges);
      std::fflush(csv_);
    }
  }

 private:
  FILE* csv_;
};

// The same batch over an fp8 pool, as the CUDA backend serves it: each launch first
// dequantizes the batch's pages into a bf16 staging pool (LaunchDequantizePages), then runs
// the prefill there through identity page ids. Returns the time per launch in ms.
float TimeFp8Prefill(int dev, const Batch& b, bool det, cudaStream_t s) {
  KvCacheShape fp8 = b.sh;
  fp8.storage = KvStorage::kFp8E4M3;
  void* pool;
  float* scales;
  uint16_t* staged;
  int32_t* identity;
  CK(cudaMalloc(&pool, fp8.TotalBytes()));
  FillRandom<<<4096, 256, 0, s>>>(static_cast<uint16_t*>(pool), fp8.TotalBytes() / 2, 11, true);
  const float ones[2] = {1.f, 1.f};
  CK(cudaMalloc(&scales, sizeof ones));
  CK(cudaMemcpy(scales, ones, sizeof ones, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&staged, size_t(b.pages) * b.sh.PageElems() * 2));
  std::vector<int32_t> ids(b.pages);
  std::iota(ids.begin(), ids.end(), 0);
  CK(cudaMalloc(&identity, ids.size() * 4));
  CK(cudaMemcpy(identity, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
  PrefillRun r;
  r.Init(dev, b, det);
  r.a.kv.pool = staged;
  r.a.kv.shape.num_pages = b.pages;
  cuda::DequantizePagesArgs stage;
  stage.kv = {pool, fp8, 0, nullptr, scales};
  stage.num_pages = b.pages;
  stage.dst = staged;
  CK(cudaDeviceSynchronize());
  const int per = std::max(b.copies, 4);
  const float ms = TimeGraph(s, per, [&] {
    for (int i = 0; i < per; ++i) {
      const size_t copy = i % b.copies;
      stage.pages = b.indices + copy * b.pages;
      CK_OK(cuda::LaunchDequantizePages(stage, s));
      r.a.kv_indices = identity;
      r.a.q = b.q + copy * b.total_q * b.qo * b.d;
      r.a.out = b.out + copy * b.total_q * b.qo * b.d;
      r.a.lse = b.lse + copy * b.total_q * b.qo;
      CK_OK(cuda::LaunchBatchPrefill(r.a, s));
    }
  });
  r.Free();
  CK(cudaFree(pool));
  CK(cudaFree(scales));
  CK(cudaFree(staged));
  CK(cudaFree(identity));
  return ms;
}

// Long prompts, each through the kernel attnd picks (Hopper's where it can: "prefill") and the
// portable mma.sync kernel ("portable").
struct PromptOptions {
  bool quick = false;
  bool waves = false;
  const char* only = nullptr;
};

void BenchPrompts(int dev, cudaStream_t s, std::mt19937& rng, Emitter& emit,
                  const PromptOptions& opt) {
  struct Case {
    std::string name;
    std::vector<Req> reqs;
    int d;
    bool causal;
    bool det;
  };
  std::vector<Case> cases;
  cases.push_back({"causal B1 S4096 d128", {{4096, 4096}}, 128, true, false});
  cases.push_back({"causal B1 S8192 d128", {{8192, 8192}}, 128, true, false});
  cases.push_back({"noncausal B4 S2048 d128",
                   {{2048, 2048}, {2048, 2048}, {2048, 2048}, {2048, 2048}}, 128, false, false});
  cases.push_back({"causal B1 S4096 d64", {{4096, 4096}}, 64, true, false});
  cases.push_back({"causal B1 S4096 d128 det", {{4096, 4096}}, 128, true, true});
  if (opt.waves) {
    cases.push_back({"noncausal B33 S2048 d128", std::vector<Req>(33, Req{2048, 2048}), 128, false,
                     false});
    cases.push_back({"noncausal B33 S4096 d128", std::vector<Req>(33, Req{4096, 4096}), 128, false,
                     false});
    cases.push_back({"noncausal B4 S1920 d128", std::vector<Req>(4, Req{1920, 1920}), 128, false,
                     false});
  }
  std::printf("hopper prefill kernel: d128 %s, d64 %s\n",
              cuda::HopperPrefillAvailable(dev, 128) ? "yes" : "no",
              cuda::HopperPrefillAvailable(dev, 64) ? "yes" : "no");
  for (Case& c : cases) {
    if (opt.only != nullptr && c.name.find(opt.only) == std::string::npos) continue;
    Batch b;
    b.reqs = c.reqs;
    b.d = c.d;
    b.causal = c.causal;
    b.Build(s, rng);
    for (cuda::PrefillKernel k : {cuda::PrefillKernel::kAuto, cuda::PrefillKernel::kPortable}) {
      if (opt.quick && k != cuda::PrefillKernel::kAuto) continue;
      PrefillRun r;
      r.Init(dev, b, c.det, k);
      const int per = std::max(b.copies, 4);
      const float ms = TimeGraph(s, per, [&] {
        for (int i = 0; i < per; ++i) r.Launch(b, i % b.copies, s);
      });
      emit(k == cuda::PrefillKernel::kAuto ? "prefill" : "portable", c.name, ms * 1e3,
           b.flops / ms / 1e9, r.plan[0], r.plan[1]);
      if (k == cuda::PrefillKernel::kAuto && !opt.quick) {
        const float fp8_ms = TimeFp8Prefill(dev, b, c.det, s);
        emit("fp8_kv", c.name, fp8_ms * 1e3, b.flops / fp8_ms / 1e9, r.plan[0], r.plan[1]);
        std::printf("         fp8 KV (staged): %.3fx the bf16 prefill's time\n", fp8_ms / ms);
      }
      r.Free();
    }
    b.Free();
  }
}

// Mixed: one 2048-token chunk at 4096 context + 128 decodes at 4096 context, one launch vs
// two launches (our prefill for the chunk, our batch decode for the decodes). `only`: the rows
// whose name contains it (the others are not run: ncu then sees only those launches).
void BenchMixed(int dev, bool det, const char* only, cudaStream_t s, std::mt19937& rng,
                Emitter& emit) {
  Batch mixed, chunk, decodes;
  mixed.reqs.push_back({2048, 4096});
  for (int i = 0; i < 128; ++i) mixed.reqs.push_back({1, 4096});
  chunk.reqs = {{2048, 4096}};
  for (int i = 0; i < 128; ++i) decodes.reqs.push_back({1, 4096});
  mixed.Build(s, rng);
  chunk.Build(s, rng);
  decodes.Build(s, rng);
  PrefillRun rm, rc, rd;
  rm.Init(dev, mixed, det);
  rc.Init(dev, chunk, det);
  rd.Init(dev, decodes, det);
  DecodeRun dd;
  dd.Init(dev, decodes);
  dd.a.deterministic = false;
  const int per = 4;
  const std::string tag = det ? " det" : "";
  const auto row = [&](const std::string& name, const Batch& b, const PrefillRun* r,
                       const auto& launch) {
    if (only != nullptr && (name + tag).find(only) == std::string::npos) return;
    const float ms = TimeGraph(s, per, [&] {
      for (int i = 0; i < per; ++i) launch(i);
    });
    emit("mixed", name + tag, ms * 1e3, b.flops / ms / 1e9, r ? r->plan[0] : 0,
         r ? r->plan[1] : 0);
  };
  row("one launch", mixed, &rm, [&](int i) { rm.Launch(mixed, i % mixed.copies, s); });
  row("two launches prefill+decode", mixed, &rc, [&](int i) {
    rc.Launch(chunk, i % chunk.copies, s);
    dd.Launch(decodes, i % decodes.copies, s);
  });
  row("chunk alone", chunk, &rc, [&](int i) { rc.Launch(chunk, i % chunk.copies, s); });
  row("128 decodes alone (decode kernel)", decodes, nullptr,
      [&](int i) { dd.Launch(decodes, i % decodes.copies, s); });
  row("128 decodes alone (prefill kernel)", decodes, &rd,
      [&](int i) { rd.Launch(decodes, i % decodes.copies, s); });
  rm.Free();
  rc.Free();
  rd.Free();
  dd.Free();
  mixed.Free();
  chunk.Free();
  decodes.Free();
}

}  // namespace

int main(int argc, char** argv) {
  const char* csv_path = nullptr;
  PromptOptions opt;
  bool mixed_only = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--csv") && i + 1 < argc) csv_path = argv[++i];
    if (!std::strcmp(argv[i], "--quick")) opt.quick = true;
    if (!std::strcmp(argv[i], "--only") && i + 1 < argc) opt.only = argv[++i];
    if (!std::strcmp(argv[i], "--mixed")) mixed_only = true;
    if (!std::strcmp(argv[i], "--waves")) opt.waves = true;
  }
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  int dev = 0;
  CK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  Emitter emit(csv_path);

  float* sink;
  CK(cudaMalloc(&sink, 4));
  const int mma_blocks = prop.multiProcessorCount * 8;
  const float mma_ms = TimeGraph(s, 1, [&] { MmaPeak<<<mma_blocks, 128, 0, s>>>(sink, 7); }, 10);
  const double mma_tf = double(mma_blocks) * 4 * kMmaIters * 8 * 4096.0 / mma_ms / 1e9;
  emit("ceiling", "mma.sync bf16", mma_ms * 1e3, mma_tf, 0, 0);

  std::mt19937 rng(5);
  if (!mixed_only) BenchPrompts(dev, s, rng, emit, opt);
  if (opt.quick || (opt.only != nullptr && !mixed_only)) return 0;
  for (int det = 0; det < 2; ++det) BenchMixed(dev, det != 0, opt.only, s, rng, emit);
  CK(cudaGetLastError());
  return 0;
}
