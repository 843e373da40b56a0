// Benchmark of attnd's CUDA append and batch decode. Measures in the same run the device's
// read-bandwidth ceiling (a large read-only reduction) and copy bandwidth (device-to-device
// memcpy, bytes read + written), then times each case through CUDA graph replays over inputs
// larger than L2 (several page sets, cycled), median of many replays.
// Prints a table; with --csv FILE also writes machine-readable rows (bench/peers.py reads them).
//
//   decode_bench [--csv FILE] [--quick] [--only B,L,D]   (--only: the cases of that batch,
//   length and head_dim, e.g. for a profiler)
//   decode_bench --sweep | --layouts   (experiments: grid splits and PDL; KV layouts and pages)
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
using attnd::bench::ValueOrExit;

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
  bool fp8 = false;   // an fp8 e4m3 pool (half the bytes a token)
  bool token_scales = false;  // with fp8: per-(token, head) scales (+8 bytes a token and head)

  KvStorage Storage() const {
    return !fp8 ? KvStorage::kModelDType
                : token_scales ? KvStorage::kFp8E4M3PerToken : KvStorage::kFp8E4M3;
  }
  const char* Fp8Tag() const { return !fp8 ? "" : token_scales ? " fp8/token" : " fp8"; }
};

struct Row {
  std::string kind, name;
  double us, gbs, pct;
};

// The CSV rows bench/peers.py reads (nothing without --csv).
class Csv {
 public:
  explicit Csv(const char* path) : f_(path != nullptr ? std::fopen(path, "w") : nullptr) {
    if (f_ != nullptr) std::fprintf(f_, "kind,name,us,gbs,pct\n");
  }
  ~Csv() {
    if (f_ != nullptr) std::fclose(f_);
  }
  void Emit(const Row& r) {
    if (f_ == nullptr) return;
    std::fprintf(f_, "%s,%s,%.3f,%.1f,%.2f\n", r.kind.c_str(), r.name.c_str(), r.us, r.gbs, r.pct);
    std::fflush(f_);
  }

 private:
  FILE* f_;
};

struct Ceilings {
  double read_gbs, copy_gbs;  // copy: bytes read + written
};

Ceilings MeasureCeilings(cudaStream_t s) {
  const size_t big = size_t(4) << 30;  // 4 GiB
  void* buf;
  CK(cudaMalloc(&buf, big));
  unsigned* sink;
  CK(cudaMalloc(&sink, 4));
  FillRandom<<<4096, 256, 0, s>>>(static_cast<uint16_t*>(buf), big / 2, 1, true);
  const float read_ms = TimeGraph(s, 1, [&] {
    ReadReduce<<<1024, 512, 0, s>>>(static_cast<const uint4*>(buf), big / 16, sink);
  }, 20);
  const double read_gbs = big / read_ms / 1e6;
  const float copy_ms = TimeGraph(s, 1, [&] {
    CK(cudaMemcpyAsync(static_cast<char*>(buf) + big / 2, buf, big / 2,
                       cudaMemcpyDeviceToDevice, s));
  }, 20);
  const double copy_gbs = big / copy_ms / 1e6;  // read + write
  CK(cudaFree(buf));
  return {read_gbs, copy_gbs};
}

std::vector<DecodeCase> Cases(bool quick, bool sweep, bool layouts, bool append_only) {
  std::vector<DecodeCase> cases = {
      {1, 4096, 32, 8, 128, 16},   {16, 4096, 32, 8, 128, 16},  {64, 4096, 32, 8, 128, 16},
      {128, 2048, 32, 8, 128, 16}, {256, 1024, 32, 8, 128, 16}, {32, 32768, 32, 8, 128, 16},
      {64, 4096, 32, 8, 64, 16},   {64, 4096, 32, 8, 256, 16},  {64, 4096, 8, 8, 128, 16},
      {64, 4096, 64, 8, 128, 16},
  };
  // The fp8 twins of the cases fp8 KV is for (issue: >= 1.8x bf16's tokens/s at B >= 16,
  // L >= 2048), and of the head_dim 64 / 256 ones.
  for (const DecodeCase& c : std::vector<DecodeCase>(cases)) {
    if (c.batch >= 16 && c.len >= 2048) {
      DecodeCase f = c;
      f.fp8 = true;
      cases.push_back(f);
      f.token_scales = true;
      cases.push_back(f);
    }
  }
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
  if (layouts) {  // experiments: how the KV layout and page size move the streaming rate
    cases.clear();
    for (int d : {64, 128}) {
      for (bool fp8 : {false, true}) {
        for (KvLayout l : {KvLayout::kNHD, KvLayout::kHND}) {
          DecodeCase c{d == 64 ? 64 : 16, 4096, 32, 8, d, 16, l};
          c.fp8 = fp8;
          cases.push_back(c);
        }
        DecodeCase c{d == 64 ? 64 : 16, 4096, 32, 8, d, 64};
        c.fp8 = fp8;
        cases.push_back(c);
        if (d == 128) {  // one item a request: no merge, but one CTA per SM
          c = DecodeCase{16, 4096, 32, 8, d, 16, KvLayout::kNHD, 1, 4096};
          c.fp8 = fp8;
          cases.push_back(c);
        }
      }
    }
  }
  if (append_only) cases.clear();
  return cases;
}

// The device buffers of one decode case: `copies` page sets of the batch's sequences.
struct DecodeInputs {
  KvCacheShape sh;
  int64_t pages_per_seq = 0;
  double kv_bytes = 0;  // K and V of one page set
  int copies = 1;
  void* pool = nullptr;
  int32_t* indices = nullptr;
  uint16_t *q = nullptr, *out = nullptr;
  float* lse = nullptr;
  float* scales = nullptr;  // fp8: [1][2], 1 and 1
  std::vector<int32_t> indptr, lens;

  void Init(const DecodeCase& c, cudaStream_t s, std::mt19937& rng) {
    sh.num_layers = 1;
    sh.page_size = c.page;
    sh.num_kv_heads = c.kv;
    sh.head_dim = c.d;
    sh.layout = c.layout;
    sh.dtype = DType::kBFloat16;
    sh.storage = c.Storage();
    pages_per_seq = (c.len + c.page - 1) / c.page;
    // Bytes read: K and V, and their per-token scales.
    kv_bytes =
        double(c.batch) * c.len * c.kv * 2 * (c.d * sh.ElemBytes() + (c.token_scales ? 4 : 0));
    copies = std::max(1, static_cast<int>(std::ceil(400e6 / kv_bytes)));
    sh.num_pages = pages_per_seq * c.batch * copies;
    CK(cudaMalloc(&pool, sh.TotalBytes()));
    // fp8 pools get the same random 16-bit patterns as bytes (speed does not depend on them).
    FillRandom<<<4096, 256, 0, s>>>(static_cast<uint16_t*>(pool), sh.TotalBytes() / 2, rng(),
                                    true);
    const float ones[2] = {1.f, 1.f};
    CK(cudaMalloc(&scales, sizeof ones));
    CK(cudaMemcpy(scales, ones, sizeof ones, cudaMemcpyHostToDevice));
    std::vector<int32_t> perm(sh.num_pages);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    CK(cudaMalloc(&indices, perm.size() * 4));
    CK(cudaMemcpy(indices, perm.data(), perm.size() * 4, cudaMemcpyHostToDevice));
    indptr.assign(c.batch + 1, 0);
    lens.assign(c.batch, c.len);
    for (int b = 0; b <= c.batch; ++b) indptr[b] = static_cast<int32_t>(b * pages_per_seq);
    const size_t qn = size_t(c.batch) * c.qo * c.d;
    CK(cudaMalloc(&q, qn * 2));
    CK(cudaMalloc(&out, qn * 2));
    CK(cudaMalloc(&lse, size_t(c.batch) * c.qo * 4));
    FillRandom<<<256, 256, 0, s>>>(q, qn, rng(), true);
  }
  void Free() {
    CK(cudaFree(pool));
    CK(cudaFree(indices));
    CK(cudaFree(q));
    CK(cudaFree(out));
    CK(cudaFree(lse));
    CK(cudaFree(scales));
  }
};

// Times one decode case in one mode (det) through graph replays over the case's page sets.
// Returns false (after printing why) when the planner refuses the batch.
bool TimeDecode(const DecodeCase& c, const DecodeInputs& in, int dev, bool det, bool warm_up,
                cudaStream_t s, double read_gbs, Csv& csv) {
  DecodePlanConfig cfg =
      ValueOrExit(cuda::MakeDecodePlanConfig(dev, in.sh, c.qo, -1), "decode config");
  cfg.deterministic = det;
  if (c.waves == 0) cfg.ctas_per_sm = 1; else cfg.ctas_per_sm *= c.waves;
  if (c.min_chunk > 0) cfg.min_chunk_tokens = c.min_chunk;
  // Deterministic mode's chunk (experiments; the rows print the chunk they ran with).
  if (const char* chunk = std::getenv("ATTND_BENCH_DET_CHUNK")) {
    cfg.fixed_chunk_tokens = std::atoi(chunk);
  }
  const DecodePlanLayout layout = MakeDecodePlanLayout(c.batch, c.len, cfg);
  const int grid_x = DecodeGridX(c.batch, cfg);
  std::vector<int32_t> plan(layout.TotalInts());
  std::string err;
  int64_t used;
  if (!PlanDecode(in.lens.data(), in.indptr.data(), c.batch, grid_x, cfg, layout, plan.data(),
                  &used, &err)) {
    std::fprintf(stderr, "plan: %s\n", err.c_str());
    return false;
  }
  const DecodeWorkspaceSizes w = DecodeWorkspaceFor(layout, cfg, c.qo, c.d);
  int32_t* d_plan;
  float *po, *pl;
  int* counters;
  CK(cudaMalloc(&counters, w.counter_bytes));
  CK(cudaMemset(counters, 0, w.counter_bytes));
  CK(cudaMalloc(&d_plan, w.plan_bytes));
  CK(cudaMemcpy(d_plan, plan.data(), w.plan_bytes, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&po, w.partial_out_bytes));
  CK(cudaMalloc(&pl, w.partial_lse_bytes));
  cuda::DecodeArgs a;
  a.kv.pool = in.pool;
  a.kv.shape = in.sh;
  a.kv.scales = in.scales;
  a.opts.num_qo_heads = c.qo;
  a.opts.sm_scale = 1.f / std::sqrt(float(c.d));
  a.batch = c.batch;
  a.q = in.q;
  a.q_stride_b = int64_t(c.qo) * c.d;
  a.q_stride_h = c.d;
  a.out = in.out;
  a.out_stride_b = a.q_stride_b;
  a.out_stride_h = c.d;
  a.lse = in.lse;
  a.ws = {d_plan, layout, grid_x, po, pl, counters, cfg.kv_head_blocks};
  a.deterministic = cfg.deterministic;
  a.overlap_previous = c.pdl;
  CK(cudaDeviceSynchronize());  // pageable copies may still be in flight
  const int per_graph = std::max(in.copies, 10);
  auto body = [&] {
    for (int i = 0; i < per_graph; ++i) {
      // Each copy has its own pages; the plan's page-table offsets are relative to this.
      a.kv_indices = in.indices + size_t(i % in.copies) * in.pages_per_seq * c.batch;
      CK_OK(cuda::LaunchBatchDecode(a, s));
    }
  };
  if (warm_up) TimeGraph(s, per_graph, body);  // clocks, caches
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
  const std::string base = name;  // the bf16 row's name
  std::strncat(name, c.Fp8Tag(), sizeof name - std::strlen(name) - 1);
  const double gbs = in.kv_bytes / ms / 1e6;
  csv.Emit({"decode", name, ms * 1e3, gbs, 100 * gbs / read_gbs});
  std::printf("decode %-36s %9.2f us %7.0f GB/s %5.1f%% of read  (items %d, chunk %d)", name,
              ms * 1e3, gbs, 100 * gbs / read_gbs, plan[0], plan[1]);
  // fp8 rows: tokens/s against the bf16 row of the same case in this run.
  static std::vector<std::pair<std::string, double>> bf16_us;
  if (!c.fp8) bf16_us.push_back({base, ms * 1e3});
  for (const auto& [n, us] : bf16_us) {
    if (c.fp8 && n == base) {
      std::printf("  %.2fx bf16's tokens/s", us / (ms * 1e3));
      csv.Emit({"fp8_vs_bf16", name, ms * 1e3, us / (ms * 1e3), 0});
    }
  }
  std::printf("\n");
  CK(cudaFree(d_plan));
  CK(cudaFree(po));
  CK(cudaFree(pl));
  CK(cudaFree(counters));
  return true;
}

// Append of n tokens (8 kv heads x 128, page 16) to random slots: 256 sequences of one token
// each, or one sequence of 4096 consecutive slots over shuffled pages.
void TimeAppend(int n, KvStorage storage, cudaStream_t s, double copy_gbs, std::mt19937& rng,
                Csv& csv) {
  KvCacheShape sh;
  sh.storage = storage;
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
  float* scales;
  const float ones[2] = {1.f, 1.f};
  CK(cudaMalloc(&scales, sizeof ones));
  CK(cudaMemcpy(scales, ones, sizeof ones, cudaMemcpyHostToDevice));
  a.kv.pool = pool;
  a.kv.shape = sh;
  a.kv.scales = scales;
  a.k_token_stride = a.v_token_stride = row;
  a.num_tokens = n;
  const float ms = TimeGraph(s, copies * 4, [&] {
    for (int i = 0; i < copies * 4; ++i) {
      const int c = i % copies;
      a.k = k + size_t(c) * n * row;
      a.v = v + size_t(c) * n * row;
      a.slot_mapping = d_slots + size_t(c) * n;
      CK_OK(cuda::LaunchAppendKv(a, s));
    }
  });
  // K and V, read + write (and a scale per token and head written)
  const double bytes = 2.0 * n * (row * (2 + sh.ElemBytes()) + (sh.TokenScales() ? 4 * 8 : 0));
  char name[64];
  std::snprintf(name, sizeof name, "%d tokens%s", n,
                storage == KvStorage::kModelDType ? ""
                : storage == KvStorage::kFp8E4M3  ? " fp8"
                                                  : " fp8/token");
  const double gbs = bytes / ms / 1e6;
  csv.Emit({"append", name, ms * 1e3, gbs, 100 * gbs / copy_gbs});
  std::printf("append %-36s %9.2f us %7.0f GB/s %5.1f%% of copy\n", name, ms * 1e3, gbs,
              100 * gbs / copy_gbs);
  CK(cudaFree(pool));
  CK(cudaFree(k));
  CK(cudaFree(v));
  CK(cudaFree(d_slots));
  CK(cudaFree(scales));
}

}  // namespace

int main(int argc, char** argv) {
  const char* csv_path = nullptr;
  bool quick = false;
  bool append_only = false;
  bool sweep = false, layouts = false;
  int only[3] = {0, 0, 0};
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--only") && i + 1 < argc) {
      std::sscanf(argv[++i], "%d,%d,%d", &only[0], &only[1], &only[2]);
    }
    if (!std::strcmp(argv[i], "--csv") && i + 1 < argc) csv_path = argv[++i];
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    if (!std::strcmp(argv[i], "--append-only")) append_only = true;
    if (!std::strcmp(argv[i], "--sweep")) sweep = true;
    if (!std::strcmp(argv[i], "--layouts")) layouts = true;
  }
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  int dev = 0;
  CK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);

  const Ceilings ceilings = MeasureCeilings(s);
  std::printf("read ceiling %.0f GB/s, copy %.0f GB/s (read+write)\n", ceilings.read_gbs,
              ceilings.copy_gbs);
  Csv csv(csv_path);
  csv.Emit({"ceiling", "read", 0, ceilings.read_gbs, 100});
  csv.Emit({"ceiling", "copy", 0, ceilings.copy_gbs, 100});

  const std::vector<DecodeCase> cases = Cases(quick, sweep, layouts, append_only);
  std::mt19937 rng(5);
  for (const DecodeCase& c : cases) {
    if (only[0] > 0 && (c.batch != only[0] || c.len != only[1] || c.d != only[2])) continue;
    DecodeInputs in;
    in.Init(c, s, rng);
    for (int det = 0; det < (sweep || layouts ? 1 : 2); ++det) {
      const bool warm_up = (&c == &cases.front() || only[0] > 0) && det == 0;
      if (!TimeDecode(c, in, dev, det != 0, warm_up, s, ceilings.read_gbs, csv)) return 1;
    }
    in.Free();
  }
  for (int n : {256, 4096}) {
    for (KvStorage storage :
         {KvStorage::kModelDType, KvStorage::kFp8E4M3, KvStorage::kFp8E4M3PerToken})
      TimeAppend(n, storage, s, ceilings.copy_gbs, rng, csv);
  }
  CK(cudaGetLastError());
  return 0;
}
