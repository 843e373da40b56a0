// What the server costs on top of its kernels: one Decode step (one layer, batch 64, 4096
// context, bf16, 32 qo / 8 kv heads, head_dim 128) through a real attnd over its Unix socket —
// unary and Stream, synchronous and asynchronous (CUDA IPC events) — against the same backend
// code called in this process (no gRPC), and an empty gRPC call, all in one run. Also the host
// time to launch one Decode: graph replay against eager launches. Tensors live in this
// process's device memory, shared with attnd through CUDA IPC.
//
//   server_bench [--attnd PATH] [--calls N]     (attnd from ATTND_BINARY or the build)
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/tensor.h"
#include "server/backend.h"
#include "server/config.h"
#include "server/cuda_backend.h"
#include "tests/e2e/server_process.h"

namespace attnd {
namespace {

constexpr int64_t kBatch = 64, kContext = 4096, kQo = 32, kKv = 8, kDim = 128, kPage = 16;
constexpr int64_t kPagesPerSeq = (kContext + 1024) / kPage;

#define CK(x)                                                                                \
  do {                                                                                       \
    cudaError_t e_ = (x);                                                                    \
    if (e_ != cudaSuccess) {                                                                 \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)
#define OK(x)                                                                       \
  do {                                                                              \
    absl::Status s_ = (x);                                                          \
    if (!s_.ok()) {                                                                 \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, s_.ToString().c_str()); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

using Clock = std::chrono::steady_clock;

struct Stats {
  double p50, p99;
};

// Median and p99 of `calls` timed runs of fn after 20 warm-ups; `prep` runs untimed before each.
Stats Time(int calls, const std::function<void()>& fn,
           const std::function<void()>& prep = [] {}) {
  for (int i = 0; i < 20; ++i) {
    prep();
    fn();
  }
  std::vector<double> us;
  for (int i = 0; i < calls; ++i) {
    prep();
    const auto t0 = Clock::now();
    fn();
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us[std::min(us.size() - 1, us.size() * 99 / 100)]};
}

ServerConfig ModelConfig(bool graphs) {
  ServerConfig c;
  c.model.num_layers = 1;
  c.model.num_qo_heads = kQo;
  c.model.num_kv_heads = kKv;
  c.model.head_dim = kDim;
  c.model.dtype = kernels::DType::kBFloat16;
  c.model.page_size = kPage;
  c.pages_per_device = kBatch * kPagesPerSeq + 64;
  c.max_seq_len = kContext + 1024;
  c.cuda_graphs = graphs;
  if (!c.Validate().ok()) std::exit(1);
  return c;
}

// Device buffers: q, k, v, out for one step, and K/V for filling the prompts.
struct Buffers {
  uint8_t* base = nullptr;
  uint64_t q = 0, k = 0, v = 0, out = 0, fill_k = 0, fill_v = 0, bytes = 0;
};

Buffers MakeBuffers() {
  Buffers b;
  const uint64_t q_bytes = kBatch * kQo * kDim * 2, kv_bytes = kBatch * kKv * kDim * 2;
  const uint64_t fill = kContext * kKv * kDim * 2;
  b.q = 0;
  b.k = q_bytes;
  b.v = b.k + kv_bytes;
  b.out = b.v + kv_bytes;
  b.fill_k = b.out + q_bytes;
  b.fill_v = b.fill_k + fill;
  b.bytes = b.fill_v + fill;
  CK(cudaMalloc(reinterpret_cast<void**>(&b.base), b.bytes));
  std::vector<uint16_t> host(b.bytes / 2);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (auto& h : host) {
    float f = normal(rng);
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    h = static_cast<uint16_t>(bits >> 16);
  }
  CK(cudaMemcpy(b.base, host.data(), b.bytes, cudaMemcpyHostToDevice));
  return b;
}

// The backend in this process: the same plan, uploads, graph replay and copies as attnd.
struct InProcess {
  std::unique_ptr<DeviceBackend> backend;
  std::vector<std::vector<int32_t>> tables;
  std::vector<int64_t> lengths;

  explicit InProcess(bool graphs, const Buffers& b) {
    auto made = CreateCudaDeviceBackend(ModelConfig(graphs), 0);
    OK(made.status());
    backend = *std::move(made);
    for (int64_t s = 0; s < kBatch; ++s) {
      tables.emplace_back();
      for (int64_t p = 0; p < kPagesPerSeq; ++p) tables.back().push_back(static_cast<int32_t>(s * kPagesPerSeq + p));
      AppendWork fill{0, {{tables.back(), 0, kContext - 1}}, b.base + b.fill_k, b.base + b.fill_v};
      OK(backend->Append(fill));
      lengths.push_back(kContext - 1);
    }
  }

  AttentionWork Step(const Buffers& b) {
    AttentionWork w;
    w.append.layer = 0;
    for (int64_t s = 0; s < kBatch; ++s) {
      if (lengths[s] >= kContext + 900) lengths[s] = kContext - 1;  // stay inside the pages
      w.append.entries.push_back({tables[s], lengths[s]++, 1});
    }
    w.append.k_new = b.base + b.k;
    w.append.v_new = b.base + b.v;
    w.q = b.base + b.q;
    w.out = b.base + b.out;
    w.decode = true;
    return w;
  }
};

int Main(int argc, char** argv) {
  int calls = 300;
  std::vector<std::string> extra_flags;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--calls") calls = std::atoi(argv[++i]);
    if (std::string(argv[i]) == "--server_flag") extra_flags.push_back(argv[++i]);
    if (std::string(argv[i]) == "--attnd") setenv("ATTND_BINARY", argv[++i], 1);
  }
  CK(cudaSetDevice(0));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  Buffers b = MakeBuffers();

  // ---- In process ----
  InProcess graph(true, b), eager(false, b);
  const Stats in_graph = Time(calls, [&] { OK(graph.backend->Attention(graph.Step(b))); });
  const Stats in_eager = Time(calls, [&] { OK(eager.backend->Attention(eager.Step(b))); });
  // Host time to enqueue one Decode: with a signal event the backend returns once enqueued.
  cudaEvent_t done;
  CK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  // Launch-only time: measured around the enqueue, outside the wait.
  auto launch_only = [&](InProcess& p) {
    std::vector<double> us;
    for (int i = 0; i < calls + 20; ++i) {
      AttentionWork w = p.Step(b);
      w.append.sync.signal = done;
      const auto t0 = Clock::now();
      OK(p.backend->Attention(w));
      const double t = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
      CK(cudaEventSynchronize(done));
      if (i >= 20) us.push_back(t);
    }
    std::sort(us.begin(), us.end());
    return Stats{us[us.size() / 2], us[us.size() * 99 / 100]};
  };
  const Stats launch_graph = launch_only(graph), launch_eager = launch_only(eager);
  graph.backend.reset();
  eager.backend.reset();

  // ---- Through attnd ----
  std::vector<std::string> flags = {
      "--backend=cuda", "--devices=0", "--num_layers=1", absl::StrCat("--num_qo_heads=", kQo),
      absl::StrCat("--num_kv_heads=", kKv), absl::StrCat("--head_dim=", kDim), "--dtype=bf16",
      absl::StrCat("--page_size=", kPage),
      absl::StrCat("--pages_per_device=", kBatch * kPagesPerSeq + 64),
      absl::StrCat("--max_seq_len=", kContext + 1024)};
  flags.insert(flags.end(), extra_flags.begin(), extra_flags.end());
  auto server = testing::ServerProcess::Start(flags);
  OK(server.status());
  auto c = client::Client::Connect((*server)->unix_target());
  OK(c.status());
  client::Client& cl = **c;  // reset before the server stops
  cudaIpcMemHandle_t mem;
  CK(cudaIpcGetMemHandle(&mem, b.base));
  OK(cl.RegisterCudaRegion("bench", std::string(reinterpret_cast<char*>(&mem), sizeof(mem)), 0, b.bytes));
  cudaEvent_t ready, written;
  CK(cudaEventCreateWithFlags(&ready, cudaEventInterprocess | cudaEventDisableTiming));
  CK(cudaEventCreateWithFlags(&written, cudaEventInterprocess | cudaEventDisableTiming));
  for (auto [name, ev] : {std::pair{"ready", ready}, std::pair{"written", written}}) {
    cudaIpcEventHandle_t h;
    CK(cudaIpcGetEventHandle(&h, ev));
    OK(cl.RegisterCudaEvent(name, std::string(reinterpret_cast<char*>(&h), sizeof(h)), 0));
  }
  for (int64_t s = 0; s < kBatch; ++s) {
    OK(cl.CreateSequence(0, static_cast<uint64_t>(s)).status());
    v1::AppendRequest a;
    a.set_layer(0);
    auto* item = a.add_items();
    item->set_seq_id(static_cast<uint64_t>(s));
    item->set_num_new_tokens(kContext - 1);
    *a.mutable_k_new() = client::MakeTensorRef("bench", b.fill_k, v1::DTYPE_BFLOAT16, {kContext - 1, kKv, kDim});
    *a.mutable_v_new() = client::MakeTensorRef("bench", b.fill_v, v1::DTYPE_BFLOAT16, {kContext - 1, kKv, kDim});
    OK(cl.Append(a).status());
  }
  v1::AttentionRequest req;
  req.set_layer(0);
  for (int64_t s = 0; s < kBatch; ++s) {
    auto* item = req.add_items();
    item->set_seq_id(static_cast<uint64_t>(s));
    item->set_num_new_tokens(1);
  }
  const uint64_t B = kBatch;
  *req.mutable_q() = client::MakeTensorRef("bench", b.q, v1::DTYPE_BFLOAT16, {B, kQo, kDim});
  *req.mutable_k_new() = client::MakeTensorRef("bench", b.k, v1::DTYPE_BFLOAT16, {B, kKv, kDim});
  *req.mutable_v_new() = client::MakeTensorRef("bench", b.v, v1::DTYPE_BFLOAT16, {B, kKv, kDim});
  *req.mutable_out() = client::MakeTensorRef("bench", b.out, v1::DTYPE_BFLOAT16, {B, kQo, kDim});
  v1::AttentionRequest async_req = req;
  async_req.mutable_sync()->set_wait_event("ready");
  async_req.mutable_sync()->set_signal_event("written");
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int steps = 0;
  // Keep lengths inside the pages: roll every sequence back now and then (not timed apart).
  auto maybe_truncate = [&] {
    if (++steps % 800 != 0) return;
    for (int64_t s = 0; s < kBatch; ++s) OK(cl.TruncateSequence(0, static_cast<uint64_t>(s), kContext - 1).status());
  };
  const Stats empty = Time(calls, [&] { OK(cl.GetServerInfo().status()); });
  const Stats unary = Time(calls, [&] { OK(cl.Decode(req).status()); }, maybe_truncate);
  auto stream_or = cl.OpenStream();
  OK(stream_or.status());
  client::DataStream& ds = **stream_or;
  const Stats streamed = Time(calls, [&] { OK(ds.Decode(req).status()); }, maybe_truncate);
  auto async_call = [&](bool use_stream) {
    CK(cudaEventRecord(ready, stream));
    OK(use_stream ? ds.Decode(async_req).status() : cl.Decode(async_req).status());
    CK(cudaStreamWaitEvent(stream, written, 0));
    CK(cudaStreamSynchronize(stream));
  };
  const Stats unary_async = Time(calls, [&] { async_call(false); }, maybe_truncate);
  const Stats stream_async = Time(calls, [&] { async_call(true); }, maybe_truncate);
  OK(ds.Close());
  // The server's own view: mean time from receiving each call to replying.
  auto stats = cl.GetStats();
  OK(stats.status());

  std::printf("server_bench on %s: Decode of %lld sequences at %lld tokens, one layer, bf16, "
              "%lld/%lld heads, head_dim %lld; %d calls each, wall-clock µs\n",
              prop.name, (long long)kBatch, (long long)kContext, (long long)kQo, (long long)kKv,
              (long long)kDim, calls);
  std::printf("| path | p50 µs | p99 µs | p50 over in-process (graph) |\n|---|---|---|---|\n");
  auto row = [&](const char* name, Stats s) {
    std::printf("| %s | %.1f | %.1f | %+.1f |\n", name, s.p50, s.p99, s.p50 - in_graph.p50);
  };
  row("in-process backend, graph replay", in_graph);
  row("in-process backend, eager launches", in_eager);
  row("empty gRPC call (GetServerInfo)", empty);
  row("attnd unary, sync", unary);
  row("attnd Stream, sync", streamed);
  row("attnd unary, async (IPC events)", unary_async);
  row("attnd Stream, async (IPC events)", stream_async);
  std::printf("\nhost time to enqueue one Decode (in-process, returns before the GPU finishes):\n");
  std::printf("| launch | p50 µs | p99 µs |\n|---|---|---|\n");
  std::printf("| graph replay (copies in, replay, copies out) | %.1f | %.1f |\n", launch_graph.p50, launch_graph.p99);
  std::printf("| eager (append + decode kernels) | %.1f | %.1f |\n", launch_eager.p50, launch_eager.p99);
  std::printf("eager / graph host time: %.2fx\n", launch_eager.p50 / launch_graph.p50);
  std::printf("\nserver-side mean handling time (attnd_request_duration_seconds):\n");
  for (const v1::RpcStats& r : stats->rpcs()) {
    if (r.code() == "OK" && r.count() > 0 && (r.rpc() == "Decode" || r.rpc() == "Stream.Decode" ||
                                               r.rpc() == "GetServerInfo"))
      std::printf("  %-14s %6llu calls, mean %.1f µs\n", r.rpc().c_str(),
                  static_cast<unsigned long long>(r.count()), 1e6 * r.total_seconds() / r.count());
  }
  cl.UnregisterRegion("bench").IgnoreError();
  c->reset();  // hang up first: gRPC's shutdown waits for connected clients
  const int rc = (*server)->Terminate();
  std::printf("attnd exit %d\n", rc);
  return 0;
}

}  // namespace
}  // namespace attnd

int main(int argc, char** argv) { return attnd::Main(argc, argv); }
