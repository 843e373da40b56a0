// GPU tests of batch decode: against the fp64 reference over a sweep of shapes and options,
// bitwise batch invariance and graph replay in deterministic mode, and a graph captured on short
// sequences replayed on long ones. Skipped without a CUDA device.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "tests/gpu/gpu_test_util.h"

namespace attnd::kernels::testing {
namespace {

struct ErrorStats {
  double rel = 0;      // ||out - ref|| / ||ref||
  double lse_max = 0;  // max |lse - ref|
  bool finite = true;
};

// Compares every request's output and lse with the reference.
ErrorStats Check(const DecodeProblem& p, const std::vector<uint16_t>& out,
                 const std::vector<float>& lse) {
  ErrorStats st;
  double num = 0, den = 0;
  const int64_t H = p.spec.qo_heads, D = p.spec.head_dim;
  for (int b = 0; b < p.batch(); ++b) {
    std::vector<double> ref, ref_lse;
    p.Reference(b, &ref, &ref_lse);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t d = 0; d < D; ++d) {
        const double x = LoadAsFloat(out.data(), b * p.q_sb + h * p.q_sh + d, p.spec.dtype);
        if (!std::isfinite(x)) st.finite = false;
        const double r = p.lens[b] == 0 ? 0.0 : ref[h * D + d];
        num += (x - r) * (x - r);
        den += r * r;
      }
      const double l = lse[b * H + h];
      if (p.lens[b] == 0) {
        if (!(std::isinf(l) && l < 0)) st.finite = false;
      } else {
        if (!std::isfinite(l)) st.finite = false;
        st.lse_max = std::max(st.lse_max, std::fabs(l - ref_lse[h]));
      }
    }
  }
  st.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return st;
}

// Uploads p, poisons the outputs, runs the decode with r's plan on the default stream and
// compares with the reference; `out`, when given, receives the output.
ErrorStats RunAndCheck(const DecodeProblem& p, const DecodeRunner& r,
                       std::vector<uint16_t>* out = nullptr) {
  DeviceProblem d;
  d.Upload(p);
  d.Poison();
  const absl::Status launched = cuda::LaunchBatchDecode(d.Args(p, r), nullptr);
  EXPECT_TRUE(launched.ok()) << launched;
  const cudaError_t synced = cudaDeviceSynchronize();
  EXPECT_EQ(synced, cudaSuccess) << cudaGetErrorString(synced);
  std::vector<uint16_t> got = d.out.Download();
  const ErrorStats st = Check(p, got, d.lse.Download());
  if (out != nullptr) *out = std::move(got);
  return st;
}

double Tolerance(DType t) { return t == DType::kBFloat16 ? 1e-2 : 2e-3; }

struct Case {
  std::string name;
  DecodeProblemSpec spec;
  std::vector<int32_t> lens;
  bool deterministic = false;
};

std::vector<int32_t> DefaultLens(int64_t ps) {
  return {1, static_cast<int32_t>(ps), static_cast<int32_t>(ps) + 1,
          static_cast<int32_t>(std::max<int64_t>(ps - 1, 2)), 100, 1000, 4097, 63, 65};
}

std::vector<Case> Cases() {
  std::vector<Case> cs;
  auto add = [&](std::string name, auto mutate, bool det = false) {
    Case c;
    c.name = std::move(name);
    mutate(c.spec);
    c.lens = DefaultLens(c.spec.page_size);
    c.deterministic = det;
    cs.push_back(c);
  };
  add("bf16_d128_g4_p16_nhd", [](DecodeProblemSpec&) {});
  add("fp16_d128_g4_p16_nhd", [](DecodeProblemSpec& s) { s.dtype = DType::kFloat16; });
  add("bf16_d64", [](DecodeProblemSpec& s) { s.head_dim = 64; });
  add("fp16_d64_hnd", [](DecodeProblemSpec& s) { s.head_dim = 64; s.dtype = DType::kFloat16; s.layout = KvLayout::kHND; });
  add("bf16_d256", [](DecodeProblemSpec& s) { s.head_dim = 256; s.qo_heads = 8; s.kv_heads = 2; });
  add("fp16_d256_hnd", [](DecodeProblemSpec& s) { s.head_dim = 256; s.dtype = DType::kFloat16; s.qo_heads = 8; s.kv_heads = 2; s.layout = KvLayout::kHND; });
  add("bf16_hnd", [](DecodeProblemSpec& s) { s.layout = KvLayout::kHND; });
  add("bf16_page1", [](DecodeProblemSpec& s) { s.page_size = 1; });
  add("bf16_page64_hnd", [](DecodeProblemSpec& s) { s.page_size = 64; s.layout = KvLayout::kHND; });
  add("fp16_page3", [](DecodeProblemSpec& s) { s.page_size = 3; s.dtype = DType::kFloat16; });
  add("bf16_page17", [](DecodeProblemSpec& s) { s.page_size = 17; });
  add("bf16_group1", [](DecodeProblemSpec& s) { s.qo_heads = 8; });
  add("bf16_group8", [](DecodeProblemSpec& s) { s.qo_heads = 64; });
  add("fp16_group5", [](DecodeProblemSpec& s) { s.qo_heads = 10; s.kv_heads = 2; s.dtype = DType::kFloat16; });
  add("bf16_group32_mqa", [](DecodeProblemSpec& s) { s.qo_heads = 32; s.kv_heads = 1; });
  add("bf16_group24", [](DecodeProblemSpec& s) { s.qo_heads = 48; s.kv_heads = 2; });
  // Groups of up to 8 run the key-rows layout, larger ones the query-rows layout: both per dtype.
  add("bf16_d256_group16", [](DecodeProblemSpec& s) { s.head_dim = 256; s.qo_heads = 32; s.kv_heads = 2; });
  add("fp8_bf16_group12", [](DecodeProblemSpec& s) { s.fp8 = true; s.qo_heads = 24; s.kv_heads = 2; });
  add("fp8_fp16_group1", [](DecodeProblemSpec& s) { s.fp8 = true; s.qo_heads = 8; s.dtype = DType::kFloat16; });
  add("fp8pt_bf16_d64_group16", [](DecodeProblemSpec& s) { s.fp8 = s.token_scales = true; s.head_dim = 64; s.qo_heads = 32; s.kv_heads = 2; });
  add("bf16_softcap", [](DecodeProblemSpec& s) { s.soft_cap = 5.0f; });
  add("fp16_softcap_window", [](DecodeProblemSpec& s) { s.soft_cap = 30.0f; s.window_left = 100; s.dtype = DType::kFloat16; });
  add("bf16_window0", [](DecodeProblemSpec& s) { s.window_left = 0; });
  add("bf16_window700_hnd", [](DecodeProblemSpec& s) { s.window_left = 700; s.layout = KvLayout::kHND; });
  add("bf16_strided_q", [](DecodeProblemSpec& s) { s.q_pad = 8; });
  add("bf16_det", [](DecodeProblemSpec&) {}, true);
  add("fp16_d64_det_window", [](DecodeProblemSpec& s) { s.head_dim = 64; s.dtype = DType::kFloat16; s.window_left = 300; }, true);
  // fp8 e4m3 pools: against the reference on the dequantized pool (scale * fp8).
  add("fp8_bf16_d128", [](DecodeProblemSpec& s) { s.fp8 = true; });
  add("fp8_fp16_d128_hnd", [](DecodeProblemSpec& s) { s.fp8 = true; s.dtype = DType::kFloat16; s.layout = KvLayout::kHND; });
  add("fp8_bf16_d64", [](DecodeProblemSpec& s) { s.fp8 = true; s.head_dim = 64; });
  add("fp8_fp16_d64_hnd_page3", [](DecodeProblemSpec& s) { s.fp8 = true; s.head_dim = 64; s.dtype = DType::kFloat16; s.layout = KvLayout::kHND; s.page_size = 3; });
  add("fp8_bf16_d256", [](DecodeProblemSpec& s) { s.fp8 = true; s.head_dim = 256; s.qo_heads = 8; s.kv_heads = 2; });
  add("fp8_bf16_group8_softcap", [](DecodeProblemSpec& s) { s.fp8 = true; s.qo_heads = 64; s.soft_cap = 5.0f; });
  add("fp8_bf16_page1_window", [](DecodeProblemSpec& s) { s.fp8 = true; s.page_size = 1; s.window_left = 300; });
  add("fp8_bf16_group5_strided", [](DecodeProblemSpec& s) { s.fp8 = true; s.qo_heads = 10; s.kv_heads = 2; s.q_pad = 8; });
  add("fp8_bf16_det", [](DecodeProblemSpec& s) { s.fp8 = true; }, true);
  // Per-(token, head) scales: each key's K scale on its logit, its V scale on its weight.
  add("fp8pt_bf16_d128", [](DecodeProblemSpec& s) { s.fp8 = s.token_scales = true; });
  add("fp8pt_fp16_d128_hnd", [](DecodeProblemSpec& s) { s.fp8 = s.token_scales = true; s.dtype = DType::kFloat16; s.layout = KvLayout::kHND; });
  add("fp8pt_bf16_d64_page3", [](DecodeProblemSpec& s) { s.fp8 = s.token_scales = true; s.head_dim = 64; s.page_size = 3; });
  add("fp8pt_bf16_d256", [](DecodeProblemSpec& s) { s.fp8 = s.token_scales = true; s.head_dim = 256; s.qo_heads = 8; s.kv_heads = 2; });
  add("fp8pt_bf16_group8_softcap", [](DecodeProblemSpec& s) { s.fp8 = s.token_scales = true; s.qo_heads = 64; s.soft_cap = 5.0f; });
  add("fp8pt_bf16_page1_window", [](DecodeProblemSpec& s) { s.fp8 = s.token_scales = true; s.page_size = 1; s.window_left = 300; });
  add("fp8pt_bf16_det", [](DecodeProblemSpec& s) { s.fp8 = s.token_scales = true; }, true);
  // Head pairs: a head_dim-64 NHD pool with an even number of kv heads and groups of up to 4
  // runs two heads a CTA (bf16_d64, fp8_bf16_d64, fp8pt_bf16_d64_page3 and the d64 window cases
  // above too); odd kv heads, larger groups and HND keep one head a CTA.
  add("bf16_d64_group1_pairs", [](DecodeProblemSpec& s) { s.head_dim = 64; s.qo_heads = 8; });
  add("fp8_fp16_d64_group2_page3_pairs", [](DecodeProblemSpec& s) { s.fp8 = true; s.dtype = DType::kFloat16; s.head_dim = 64; s.qo_heads = 16; s.page_size = 3; });
  add("bf16_d64_softcap_strided_q_pairs", [](DecodeProblemSpec& s) { s.head_dim = 64; s.soft_cap = 5.0f; s.q_pad = 8; });
  add("fp8_bf16_d64_det_pairs", [](DecodeProblemSpec& s) { s.fp8 = true; s.head_dim = 64; }, true);
  add("bf16_d64_odd_kv_heads", [](DecodeProblemSpec& s) { s.head_dim = 64; s.qo_heads = 12; s.kv_heads = 3; });
  add("fp8_bf16_d64_group8", [](DecodeProblemSpec& s) { s.fp8 = true; s.head_dim = 64; s.qo_heads = 64; });
  // Per-token scales in pairs: each query column scales its keys and values by its own head's.
  add("fp8pt_bf16_d64_group1_pairs", [](DecodeProblemSpec& s) { s.fp8 = s.token_scales = true; s.head_dim = 64; s.qo_heads = 8; });
  add("fp8pt_fp16_d64_group2_page3_pairs", [](DecodeProblemSpec& s) { s.fp8 = s.token_scales = true; s.dtype = DType::kFloat16; s.head_dim = 64; s.qo_heads = 16; s.page_size = 3; });
  add("fp8pt_bf16_d64_softcap_window_pairs", [](DecodeProblemSpec& s) { s.fp8 = s.token_scales = true; s.head_dim = 64; s.soft_cap = 5.0f; s.window_left = 300; });
  add("fp8pt_bf16_d64_det_pairs", [](DecodeProblemSpec& s) { s.fp8 = s.token_scales = true; s.head_dim = 64; }, true);
  // NaN in the slots past each sequence's end on its last page (a reused page's stale values).
  add("bf16_nan_past_end", [](DecodeProblemSpec& s) { s.nan_past_end = true; });
  add("fp16_d64_hnd_page3_nan_past_end", [](DecodeProblemSpec& s) { s.head_dim = 64; s.dtype = DType::kFloat16; s.layout = KvLayout::kHND; s.page_size = 3; s.nan_past_end = true; });
  add("bf16_d64_pairs_nan_past_end", [](DecodeProblemSpec& s) { s.head_dim = 64; s.nan_past_end = true; });
  add("fp8_bf16_nan_past_end", [](DecodeProblemSpec& s) { s.fp8 = true; s.nan_past_end = true; });
  add("fp8pt_bf16_d64_nan_past_end", [](DecodeProblemSpec& s) { s.fp8 = s.token_scales = true; s.head_dim = 64; s.nan_past_end = true; });
  add("fp8_bf16_det_nan_past_end", [](DecodeProblemSpec& s) { s.fp8 = true; s.nan_past_end = true; }, true);
  return cs;
}

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

class DecodeVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(DecodeVsReference, MatchesFp64) {
  SKIP_WITHOUT_GPU();
  const Case& c = GetParam();
  for (int trial = 0; trial < 2; ++trial) {  // fresh random inputs each time
    DecodeProblem p;
    std::vector<int32_t> lens = c.lens;
    if (trial == 1) std::reverse(lens.begin(), lens.end());
    p.Build(c.spec, lens, std::random_device{}());
    DecodeRunner r;
    r.Init(c.spec, p.batch(), 8192, c.deterministic, 512);
    r.Plan(p.lens, p.indptr);
    const ErrorStats st = RunAndCheck(p, r);
    EXPECT_TRUE(st.finite) << c.name;
    EXPECT_LT(st.rel, Tolerance(c.spec.dtype)) << c.name << " trial " << trial;
    EXPECT_LT(st.lse_max, 2e-3) << c.name;
    std::printf("[ %-24s ] rel err %.3e  lse err %.3e  chunk %d items %d\n", c.name.c_str(),
                st.rel, st.lse_max, r.plan_host[1], r.plan_host[0]);
  }
}

INSTANTIATE_TEST_SUITE_P(Sweep, DecodeVsReference, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

TEST(Decode, LongSequence32k) {
  SKIP_WITHOUT_GPU();
  DecodeProblemSpec s;
  s.kv_heads = 2;
  s.qo_heads = 8;
  DecodeProblem p;
  p.Build(s, {32768, 32771}, std::random_device{}());
  for (int det = 0; det < 2; ++det) {
    DecodeRunner r;
    r.Init(s, 2, 40000, det != 0);
    r.Plan(p.lens, p.indptr);
    const ErrorStats st = RunAndCheck(p, r);
    EXPECT_TRUE(st.finite);
    EXPECT_LT(st.rel, 1e-2);
    EXPECT_LT(st.lse_max, 2e-3);
  }
}

// Deterministic plans with small chunks on the fewest columns (one per request): every column
// runs many items one after another (of one tile up to many, and the empty item of a request
// with no keys), each restarting the CTA's pipeline and query rows; the merge kernel then joins
// each split request's items. Both layouts (key rows, query rows with q in registers or read
// from shared memory), fp8 with either scales.
TEST(Decode, ColumnsThatRunManyItemsMatchTheReference) {
  SKIP_WITHOUT_GPU();
  std::vector<std::pair<std::string, DecodeProblemSpec>> specs;
  auto add = [&](std::string name, auto mutate) {
    DecodeProblemSpec s;
    mutate(s);
    specs.emplace_back(std::move(name), s);
  };
  add("bf16_d128_g4", [](DecodeProblemSpec&) {});
  add("fp16_d64_g16_page3", [](DecodeProblemSpec& s) { s.dtype = DType::kFloat16; s.head_dim = 64; s.qo_heads = 32; s.kv_heads = 2; s.page_size = 3; });
  add("bf16_d256_g16", [](DecodeProblemSpec& s) { s.head_dim = 256; s.qo_heads = 32; s.kv_heads = 2; });
  add("fp8_bf16_d128", [](DecodeProblemSpec& s) { s.fp8 = true; });
  add("fp8_bf16_d64_window", [](DecodeProblemSpec& s) { s.fp8 = true; s.head_dim = 64; s.window_left = 700; });
  add("fp8pt_bf16_d128_g12", [](DecodeProblemSpec& s) { s.fp8 = s.token_scales = true; s.qo_heads = 24; s.kv_heads = 2; });
  add("fp8pt_bf16_d256", [](DecodeProblemSpec& s) { s.fp8 = s.token_scales = true; s.head_dim = 256; s.qo_heads = 8; s.kv_heads = 2; });
  for (const auto& [name, spec] : specs) {
    for (int chunk : {1, 200}) {  // rounded up to whole tiles: items of one tile, or of a few
      DecodeProblem p;
      p.Build(spec, {0, 1, 300, 4097, 16, 0, 1000, 65, 2500}, std::random_device{}());
      DecodeRunner r;
      r.Init(spec, p.batch(), 8192, /*deterministic=*/true, chunk);
      r.grid_x = p.batch();
      r.Plan(p.lens, p.indptr);
      ASSERT_GT(r.plan_host[0], r.grid_x) << name;  // columns that run several items
      const ErrorStats st = RunAndCheck(p, r);
      EXPECT_TRUE(st.finite) << name << " chunk " << chunk;
      EXPECT_LT(st.rel, Tolerance(spec.dtype)) << name << " chunk " << chunk;
      EXPECT_LT(st.lse_max, 2e-3) << name << " chunk " << chunk;
    }
  }
}

TEST(Decode, PaddedEntriesGiveZeroAndMinusInfinity) {
  SKIP_WITHOUT_GPU();
  DecodeProblemSpec s;
  DecodeProblem p;
  p.Build(s, {0, 37, 0, 0, 1, 0}, std::random_device{}());
  DecodeRunner r;
  r.Init(s, 8, 4096, false);
  r.Plan(p.lens, p.indptr);
  std::vector<uint16_t> out;
  const ErrorStats st = RunAndCheck(p, r, &out);
  EXPECT_TRUE(st.finite);
  EXPECT_LT(st.rel, 1e-2);
  for (int64_t i = 0; i < p.q_sb; ++i) EXPECT_EQ(out[i], 0) << i;  // request 0 is padding
}

// Runs the decode for `p` in deterministic mode; returns out and lse of all requests.
void RunDecode(const DecodeProblem& p, bool det, bool graph, std::vector<uint16_t>* out,
               std::vector<float>* lse, int bucket = 0) {
  DecodeRunner r;
  r.Init(p.spec, std::max(bucket, p.batch()), 40000, det, 512);
  r.Plan(p.lens, p.indptr);
  DeviceProblem d;
  d.Upload(p);
  d.Poison();
  cudaStream_t stream;
  ATTND_CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  if (graph) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    ATTND_CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    ATTND_STATUS_OK(cuda::LaunchBatchDecode(d.Args(p, r), stream));
    ATTND_CUDA_OK(cudaStreamEndCapture(stream, &g));
    ATTND_CUDA_OK(cudaGraphInstantiate(&ge, g, 0));
    ATTND_CUDA_OK(cudaGraphLaunch(ge, stream));
    ATTND_CUDA_OK(cudaStreamSynchronize(stream));
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
  } else {
    ATTND_STATUS_OK(cuda::LaunchBatchDecode(d.Args(p, r), stream));
    ATTND_CUDA_OK(cudaStreamSynchronize(stream));
  }
  cudaStreamDestroy(stream);
  *out = d.out.Download();
  *lse = d.lse.Download();
}

TEST(DecodeDeterminism, AloneVsBatchOf256AndGraphVsEager) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(std::random_device{}());
  for (int64_t ps : {16, 5, 7}) {
    DecodeProblemSpec s;
    s.page_size = ps;
    s.fp8 = ps != 16;  // the fp8 kernels: page 5, and page 7 with per-token scales
    s.token_scales = ps == 7;
    s.kv_heads = 2;
    s.qo_heads = 8;
    std::vector<int32_t> lens(256);
    for (auto& l : lens) l = 1 + static_cast<int32_t>(rng() % 6000);
    const int target = 77;
    lens[target] = 5003;
    DecodeProblem big;
    big.Build(s, lens, rng());
    // The same request alone: same pages (the pool is shared), same q row.
    DecodeProblem one = big;
    one.lens = {lens[target]};
    one.indptr = {0, big.indptr[target + 1] - big.indptr[target]};
    one.indices.assign(big.indices.begin() + big.indptr[target],
                       big.indices.begin() + big.indptr[target + 1]);
    one.q.assign(big.q.begin() + target * big.q_sb, big.q.begin() + (target + 1) * big.q_sb);

    std::vector<uint16_t> out_big, out_one, out_graph, out_pad;
    std::vector<float> lse_big, lse_one, lse_graph, lse_pad;
    RunDecode(big, true, false, &out_big, &lse_big);
    RunDecode(one, true, false, &out_one, &lse_one);
    RunDecode(one, true, true, &out_graph, &lse_graph, 16);  // a graph for bucket 16
    const int64_t row = big.q_sb, H = s.qo_heads;
    EXPECT_EQ(0, std::memcmp(out_big.data() + target * row, out_one.data(), row * 2));
    EXPECT_EQ(0, std::memcmp(lse_big.data() + target * H, lse_one.data(), H * 4));
    EXPECT_EQ(0, std::memcmp(out_graph.data(), out_one.data(), row * 2));
    EXPECT_EQ(0, std::memcmp(lse_graph.data(), lse_one.data(), H * 4));
    // And it is right.
    const ErrorStats st = Check(one, out_one, lse_one);
    EXPECT_LT(st.rel, 1e-2);
    // Non-deterministic mode: graph and eager agree bitwise for the same plan.
    std::vector<uint16_t> nd_eager, nd_graph;
    std::vector<float> nl_eager, nl_graph;
    RunDecode(big, false, false, &nd_eager, &nl_eager);
    RunDecode(big, false, true, &nd_graph, &nl_graph);
    EXPECT_EQ(nd_eager, nd_graph);
    EXPECT_EQ(0, std::memcmp(nl_eager.data(), nl_graph.data(), nl_eager.size() * 4));
  }
}

// A graph captured while every sequence is 16 tokens long, replayed after they grew to 32k:
// only device buffers (lengths, page tables, plan; an fp8 pool's scales) change between
// capture and replay.
TEST(DecodeGraph, CapturedShortReplaysLong) {
  SKIP_WITHOUT_GPU();
  for (int mode = 0; mode < 6; ++mode) {
    const int det = mode & 1;
    DecodeProblemSpec s;
    s.kv_heads = 2;
    s.qo_heads = 8;
    s.fp8 = mode >= 2;
    s.token_scales = mode >= 4;
    const int bucket = 4;
    const int64_t max_len = 32768 + 7;
    DecodeProblem longp;
    longp.Build(s, {32768, 32768 + 7, 32000, 0}, std::random_device{}());  // last: padding
    DecodeProblem shortp = longp;  // same pool and page tables, 16 tokens each
    shortp.lens = {16, 16, 16, 0};  // the padded entry has no pages

    DecodeRunner r;
    r.Init(s, bucket, max_len, det != 0);
    DeviceProblem d;
    d.Upload(longp);
    d.lens.Upload(shortp.lens);
    r.Plan(shortp.lens, shortp.indptr);
    cudaStream_t stream;
    ATTND_CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaGraph_t g;
    cudaGraphExec_t ge;
    ATTND_CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    ATTND_STATUS_OK(cuda::LaunchBatchDecode(d.Args(longp, r), stream));
    ATTND_CUDA_OK(cudaStreamEndCapture(stream, &g));
    ATTND_CUDA_OK(cudaGraphInstantiate(&ge, g, 0));
    // Replay short: correct for the short problem.
    d.Poison();
    ATTND_CUDA_OK(cudaGraphLaunch(ge, stream));
    ATTND_CUDA_OK(cudaStreamSynchronize(stream));
    ErrorStats st = Check(shortp, d.out.Download(), d.lse.Download());
    EXPECT_TRUE(st.finite);
    EXPECT_LT(st.rel, 1e-2);
    // Grow: new lengths and plan in the same device buffers (fp8: new scales too), replay.
    if (s.fp8 && !s.token_scales) {
      for (KvScales& sc : longp.scales) sc = {sc.k * 1.5f, sc.v * 0.75f};
      std::vector<float> flat;
      for (const KvScales& sc : longp.scales) flat.insert(flat.end(), {sc.k, sc.v});
      d.scales.Upload(flat);
    }
    d.lens.Upload(longp.lens);
    r.Plan(longp.lens, longp.indptr);
    d.Poison();
    ATTND_CUDA_OK(cudaGraphLaunch(ge, stream));
    ATTND_CUDA_OK(cudaStreamSynchronize(stream));
    st = Check(longp, d.out.Download(), d.lse.Download());
    EXPECT_TRUE(st.finite) << "det " << det;
    EXPECT_LT(st.rel, 1e-2) << "det " << det;
    EXPECT_LT(st.lse_max, 2e-3) << "det " << det;
    std::printf("graph 16 -> 32k (det %d): rel err %.3e, %d items of %d tokens\n", det, st.rel,
                r.plan_host[0], r.plan_host[1]);
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
    cudaStreamDestroy(stream);
  }
}

// The server captures one decode graph per batch bucket and serves every layer with it: the
// layer comes from device memory at replay time, not from the captured arguments.
TEST(DecodeGraph, LayerReadFromDeviceMemoryServesEveryLayer) {
  SKIP_WITHOUT_GPU();
  DecodeProblemSpec s;  // 2 layers; the reference reads spec.layer
  s.kv_heads = 2;
  s.qo_heads = 8;
  DecodeProblem p;
  p.Build(s, {300, 17, 1}, std::random_device{}());
  DecodeRunner r;
  r.Init(s, 3, 4096, false);
  DeviceProblem d;
  d.Upload(p);
  r.Plan(p.lens, p.indptr);
  int32_t* layer = nullptr;
  ATTND_CUDA_OK(cudaMalloc(reinterpret_cast<void**>(&layer), sizeof(int32_t)));
  cuda::DecodeArgs a = d.Args(p, r);
  a.kv.layer = 7;  // ignored: out of range on purpose
  a.kv.layer_in_device = layer;
  cudaStream_t stream;
  ATTND_CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  ATTND_CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  ATTND_STATUS_OK(cuda::LaunchBatchDecode(a, stream));
  ATTND_CUDA_OK(cudaStreamEndCapture(stream, &g));
  ATTND_CUDA_OK(cudaGraphInstantiate(&ge, g, 0));
  for (int32_t l : {1, 0, 1}) {
    ATTND_CUDA_OK(cudaMemcpy(layer, &l, sizeof(l), cudaMemcpyHostToDevice));
    d.Poison();
    ATTND_CUDA_OK(cudaGraphLaunch(ge, stream));
    ATTND_CUDA_OK(cudaStreamSynchronize(stream));
    DecodeProblem at = p;
    at.spec.layer = l;
    const ErrorStats st = Check(at, d.out.Download(), d.lse.Download());
    EXPECT_TRUE(st.finite) << "layer " << l;
    EXPECT_LT(st.rel, 1e-2) << "layer " << l;
  }
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  cudaStreamDestroy(stream);
  cudaFree(layer);
}

// Back-to-back launches on one stream share the workspace; each launch starts early (PDL) and
// must not touch partials or counters before the previous one is done. Twenty launches over two
// alternating problems must give the same bits as one launch of each.
TEST(Decode, BackToBackLaunchesDoNotRace) {
  SKIP_WITHOUT_GPU();
  DecodeProblemSpec s;
  DecodeProblem p1, p2;
  p1.Build(s, {4096, 3000, 17}, std::random_device{}());
  p2.Build(s, {2500, 1, 5000}, std::random_device{}());
  DecodeRunner r, r2;  // own plans; r2's launches borrow r's partials and counters below
  r.Init(s, 3, 8192, false);
  r2.Init(s, 3, 8192, false);
  DeviceProblem d1, d2;
  d1.Upload(p1);
  d2.Upload(p2);
  r.Plan(p1.lens, p1.indptr);
  r2.Plan(p2.lens, p2.indptr);
  cudaStream_t stream;
  ATTND_CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  // Reference bits: one launch each.
  ATTND_STATUS_OK(cuda::LaunchBatchDecode(d1.Args(p1, r), stream));
  ATTND_STATUS_OK(cuda::LaunchBatchDecode(d2.Args(p2, r2), stream));
  ATTND_CUDA_OK(cudaStreamSynchronize(stream));
  const auto ref1 = d1.out.Download(), ref2 = d2.out.Download();
  d1.Poison();
  d2.Poison();
  cuda::DecodeArgs a1 = d1.Args(p1, r), a2 = d2.Args(p2, r2);
  a2.ws.partial_out = a1.ws.partial_out;
  a2.ws.partial_lse = a1.ws.partial_lse;
  a2.ws.counters = a1.ws.counters;
  for (int i = 0; i < 10; ++i) {
    ATTND_STATUS_OK(cuda::LaunchBatchDecode(a1, stream));
    ATTND_STATUS_OK(cuda::LaunchBatchDecode(a2, stream));
  }
  ATTND_CUDA_OK(cudaStreamSynchronize(stream));
  EXPECT_EQ(d1.out.Download(), ref1);
  EXPECT_EQ(d2.out.Download(), ref2);
  const ErrorStats st = Check(p2, d2.out.Download(), d2.lse.Download());
  EXPECT_LT(st.rel, 1e-2);
  cudaStreamDestroy(stream);
}

// Arguments that pass every check, for a batch of 0 (which launches nothing): the checks run
// before anything touches the device, so these tests need none.
cuda::DecodeArgs CheckedDecodeArgs() {
  cuda::DecodeArgs a;
  a.kv.pool = FakeDevicePointer();
  a.kv.shape.num_layers = 1;
  a.kv.shape.num_pages = 64;
  a.kv.shape.page_size = 16;
  a.kv.shape.num_kv_heads = 2;
  a.kv.shape.head_dim = 128;
  a.opts.num_qo_heads = 8;
  a.q = a.out = FakeDevicePointer();
  a.q_stride_b = a.out_stride_b = 8 * 128;
  a.q_stride_h = a.out_stride_h = 128;
  a.kv_indices = FakeDevicePointer<int32_t>();
  a.ws.plan = FakeDevicePointer<int32_t>();
  a.ws.layout.max_batch = 4;
  a.ws.layout.max_items = 64;
  a.ws.grid_x = 33;
  a.ws.counters = FakeDevicePointer<int>();
  a.ws.kv_head_blocks = 2;
  return a;
}

TEST(Decode, RejectsBadArgumentsNamingThem) {
  ATTND_STATUS_OK(cuda::LaunchBatchDecode(CheckedDecodeArgs(), nullptr));
  auto rejects = [](void (*mutate)(cuda::DecodeArgs&), const std::string& message) {
    cuda::DecodeArgs a = CheckedDecodeArgs();
    mutate(a);
    const absl::Status s = cuda::LaunchBatchDecode(a, nullptr);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_EQ(s.message(), message);
  };
  rejects([](cuda::DecodeArgs& a) { a.batch = -1; }, "decode: batch -1 is negative");
  rejects([](cuda::DecodeArgs& a) { a.opts.num_qo_heads = 7; },
          "decode: opts.num_qo_heads 7 is not a multiple of num_kv_heads 2");
  rejects([](cuda::DecodeArgs& a) { a.q_stride_h = 3; },
          "decode: q_stride_h 3 is not a multiple of 8");
  rejects([](cuda::DecodeArgs& a) { a.out = FakeDevicePointer(4); },
          "decode: out is not 16-byte aligned");
  rejects([](cuda::DecodeArgs& a) { a.ws.grid_x = 65; },
          "decode: ws.grid_x 65 exceeds ws.layout.max_items 64");
  rejects([](cuda::DecodeArgs& a) { a.ws.layout.max_items = a.ws.grid_x = 70000; },
          "decode: ws.grid_x 70000 exceeds 65535");
  rejects([](cuda::DecodeArgs& a) { a.batch = 5; },
          "decode: batch 5 exceeds ws.layout.max_batch 4");
  rejects([](cuda::DecodeArgs& a) { a.ws.counters = nullptr; },
          "decode: ws.counters is null (the fused merge needs them)");
  // A config made for a head_dim-64 NHD pool (head pairs: 1 CTA for 2 kv heads), used on HND.
  rejects(
      [](cuda::DecodeArgs& a) {
        a.kv.shape.head_dim = 64;
        a.kv.shape.layout = KvLayout::kHND;
        a.q_stride_b = a.out_stride_b = 8 * 64;
        a.q_stride_h = a.out_stride_h = 64;
        a.ws.kv_head_blocks = 1;
      },
      "decode: ws.kv_head_blocks 1 is not the 2 of this pool's kernel (a plan config for "
      "another shape?)");
  cuda::DecodeArgs det = CheckedDecodeArgs();
  det.deterministic = true;
  det.ws.counters = nullptr;
  ATTND_STATUS_OK(cuda::LaunchBatchDecode(det, nullptr));
  const absl::Status s = cuda::LaunchBatchDecode(cuda::DecodeArgs(), nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
}

}  // namespace
}  // namespace attnd::kernels::testing
