// What the server costs on top of its kernels: one Decode step (one layer, batch 64, 4096
// context, bf16, 32 qo / 8 kv heads, head_dim 128) through a real attnd over its Unix socket —
// unary and Stream, synchronous and asynchronous (CUDA IPC events) — against the same backend
// code called in this process (no gRPC), and an empty gRPC call, all in one run. Also the host
// time to launch one Decode: graph replay against eager launches. Tensors live in this
// process's device memory, shared with attnd through CUDA IPC.
//
// Every path starts from the same lengths (4095 tokens, rolled back every kLengthWindow steps),
// so the GPU work per call is the same in process and through attnd. For each attnd path it
// also prints where the time went inside attnd (p50 of each stage of
// attnd_request_stage_seconds over that path's calls, read from /metrics before and after),
// and what is left outside attnd: the client's p50 minus attnd's own p50 (gRPC's reads and
// writes, thread wake-ups, the client library).
//
//   server_bench [--attnd PATH] [--calls N] [--server_flag --flag=value ...]
//   (attnd from ATTND_BINARY or the build)
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/tensor.h"
#include "server/config/config.h"
#include "server/cuda/cuda_platform.h"
#include "server/platform/backend.h"
#include "server/platform/platform.h"
#include "testing/server_process.h"
#include "testing/stage_metrics.h"

namespace attnd {
namespace {

constexpr int64_t kBatch = 64, kContext = 4096, kQo = 32, kKv = 8, kDim = 128, kPage = 16;
constexpr int64_t kPagesPerSeq = (kContext + 1024) / kPage;
// Lengths run from kContext - 1 for this many steps, then roll back: the same range for every
// path, inside the pages.
constexpr int64_t kLengthWindow = 900;

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

// Pipelined: rounds of k calls issued back to back (each returns once its work is enqueued),
// then `finish` waits for the GPU; the sample is the round's time over k.
Stats TimePipelined(int rounds, int k, const std::function<void()>& call,
                    const std::function<void()>& finish) {
  std::vector<double> us;
  for (int r = 0; r < rounds + 3; ++r) {
    const auto t0 = Clock::now();
    for (int i = 0; i < k; ++i) call();
    finish();
    if (r >= 3) us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / k);
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

// One Decode call as attnd's worker hands it to the backend: the batch's shape to plan, and
// the work to launch.
struct Call {
  std::vector<int64_t> starts, num_new;
  AttentionWork work;
};

// The backend in this process, made through the same platform as attnd's: the same plan,
// uploads, graph replay and copies.
struct InProcess {
  std::unique_ptr<DevicePlatform> platform;
  std::unique_ptr<DeviceBackend> backend;
  std::vector<std::vector<int32_t>> tables;
  std::vector<int64_t> lengths;

  explicit InProcess(bool graphs, const Buffers& b) {
    const ServerConfig config = ModelConfig(graphs);
    auto made_platform = CreateCudaPlatform(config);
    OK(made_platform.status());
    platform = *std::move(made_platform);
    OK(platform->BindWorkerThread(0));
    auto made = platform->CreateBackend(config, 0);
    OK(made.status());
    backend = *std::move(made);
    for (int64_t s = 0; s < kBatch; ++s) {
      tables.emplace_back();
      for (int64_t p = 0; p < kPagesPerSeq; ++p)
        tables.back().push_back(static_cast<int32_t>(s * kPagesPerSeq + p));
      AppendWork fill{0, {{tables.back(), 0, kContext - 1}}, b.base + b.fill_k, b.base + b.fill_v,
                      {}};
      OK(backend->Append(fill).status());
      lengths.push_back(kContext - 1);
    }
  }

  void ResetLengths() { std::fill(lengths.begin(), lengths.end(), kContext - 1); }

  Call Step(const Buffers& b) {
    Call c;
    AttentionWork& w = c.work;
    w.append.layer = 0;
    for (int64_t s = 0; s < kBatch; ++s) {
      if (lengths[s] >= kContext - 1 + kLengthWindow) lengths[s] = kContext - 1;
      c.starts.push_back(lengths[s]);
      c.num_new.push_back(1);
      w.append.entries.push_back({tables[s], lengths[s]++, 1});
    }
    w.append.k_new = b.base + b.k;
    w.append.v_new = b.base + b.v;
    w.q = b.base + b.q;
    w.out = b.base + b.out;
    return c;
  }

  // Plans once, then launches: the backend's whole host cost of a call.
  absl::Status Run(const Call& c) {
    AttentionBatch batch;
    batch.starts = c.starts;
    batch.num_new = c.num_new;
    batch.deterministic = c.work.deterministic;
    batch.decode = true;
    auto plan = backend->PlanAttention(batch);
    if (!plan.ok()) return plan.status();
    return backend->Attention(c.work, *plan).status();
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
  cudaEvent_t done;
  CK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  InProcess graph(true, b), eager(false, b);
  graph.ResetLengths();
  const Stats in_graph = Time(calls, [&] { OK(graph.Run(graph.Step(b))); });
  // The same graph replays pipelined: each call returns once enqueued (a signal event), the
  // GPU runs them back to back; per-call time in the steady state a layer loop sees.
  constexpr int kPipelined = 8;
  graph.ResetLengths();
  const Stats in_graph_pipelined = TimePipelined(
      calls / kPipelined,
      kPipelined,
      [&] {
        Call c = graph.Step(b);
        c.work.append.sync.signal = done;
        OK(graph.Run(c));
      },
      [&] { CK(cudaEventSynchronize(done)); });
  eager.ResetLengths();
  const Stats in_eager = Time(calls, [&] { OK(eager.Run(eager.Step(b))); });
  // Host time to enqueue one Decode: with a signal event the backend returns once enqueued.
  // Launch-only time: measured around the enqueue (plan and launch), outside the wait.
  // Graph and eager calls alternate, so that both see the same machine moments; 5x the calls
  // of the other rows (host enqueue times are a few microseconds and noisy).
  // table_epoch: 0 says "page tables unknown" (the graph path rewrites every page id); a fixed
  // value says they are the ones of the call before, as for every layer after the first of a
  // step (and 15 of 16 steps at page size 16) through attnd, whose pool tracks changes.
  auto launch_only = [&](uint64_t table_epoch) {
    graph.ResetLengths();
    eager.ResetLengths();
    std::vector<double> us[2];
    for (int i = 0; i < 5 * calls + 20; ++i) {
      for (int k = 0; k < 2; ++k) {
        InProcess& p = k == 0 ? graph : eager;
        Call c = p.Step(b);
        c.work.append.sync.signal = done;
        c.work.append.table_epoch = table_epoch;
        const auto t0 = Clock::now();
        OK(p.Run(c));
        const double t = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
        CK(cudaEventSynchronize(done));
        if (i >= 20) us[k].push_back(t);
      }
    }
    std::array<Stats, 2> out;
    for (int k = 0; k < 2; ++k) {
      std::sort(us[k].begin(), us[k].end());
      out[k] = Stats{us[k][us[k].size() / 2], us[k][us[k].size() * 99 / 100]};
    }
    return out;
  };
  const auto [launch_graph, launch_eager] = launch_only(0);
  const auto [launch_graph_same, launch_eager_same] = launch_only(1);
  graph.backend.reset();
  eager.backend.reset();

  // ---- Through attnd ----
  std::vector<std::string> flags = {
      "--backend=cuda", "--devices=0", "--num_layers=1", absl::StrCat("--num_qo_heads=", kQo),
      absl::StrCat("--num_kv_heads=", kKv), absl::StrCat("--head_dim=", kDim), "--dtype=bf16",
      absl::StrCat("--page_size=", kPage),
      absl::StrCat("--pages_per_device=", kBatch * kPagesPerSeq + 64),
      absl::StrCat("--max_seq_len=", kContext + 1024), "--metrics_port=auto"};
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
  // Requests attnd turns down without GPU work: before the device worker (no items) and on it
  // (an unknown sequence). Their round trips are gRPC's alone, then gRPC's plus the hand-off.
  v1::AttentionRequest no_items = req;
  no_items.clear_items();
  v1::AttentionRequest unknown_seq = req;
  unknown_seq.mutable_items(0)->set_seq_id(kBatch + 1000);
  int64_t steps = 0;
  // Every path starts at kContext - 1 tokens and rolls back every kLengthWindow steps, as the
  // in-process runs do (untimed).
  auto reset_lengths = [&] {
    for (int64_t s = 0; s < kBatch; ++s)
      OK(cl.TruncateSequence(0, static_cast<uint64_t>(s), kContext - 1).status());
    steps = 0;
  };
  auto maybe_truncate = [&] {
    if (steps == kLengthWindow) reset_lengths();
    ++steps;
  };
  const int metrics_port = (*server)->metrics_port();
  auto stage_snapshot = [&] {
    auto snapshot = testing::ReadStageHistograms(metrics_port);
    OK(snapshot.status());
    return *std::move(snapshot);
  };
  struct AttndPath {
    const char* name;
    const char* rpc;  // whose stages it records
    Stats stats;
    testing::StageHistograms stages;
  };
  std::vector<AttndPath> paths;
  auto run_path = [&](const char* name, const char* rpc, const std::function<void()>& fn,
                      bool decodes) {
    if (decodes) reset_lengths();
    const testing::StageHistograms before = stage_snapshot();
    const Stats st = Time(calls, fn, decodes ? std::function<void()>(maybe_truncate) : [] {});
    paths.push_back({name, rpc, st, testing::Subtract(stage_snapshot(), before)});
    return st;
  };
  const Stats empty = Time(calls, [&] { OK(cl.GetServerInfo().status()); });
  const Stats unary = run_path("attnd unary, sync", "Decode", [&] { OK(cl.Decode(req).status()); }, true);
  auto stream_or = cl.OpenStream();
  OK(stream_or.status());
  client::DataStream& ds = **stream_or;
  const Stats streamed =
      run_path("attnd Stream, sync", "Stream.Decode", [&] { OK(ds.Decode(req).status()); }, true);
  auto expect_code = [](absl::Status s, absl::StatusCode code) {
    if (s.code() != code) {
      std::fprintf(stderr, "expected %s, got %s\n", absl::StatusCodeToString(code).c_str(),
                   s.ToString().c_str());
      std::exit(1);
    }
  };
  const Stats rejected_early = run_path(
      "attnd Stream, refused before the worker (no GPU work)", "Stream.Decode",
      [&] { expect_code(ds.Decode(no_items).status(), absl::StatusCode::kInvalidArgument); }, false);
  const Stats rejected_worker = run_path(
      "attnd Stream, refused on the worker (no GPU work)", "Stream.Decode",
      [&] { expect_code(ds.Decode(unknown_seq).status(), absl::StatusCode::kNotFound); }, false);
  // The client's stream waits on attnd's event (what an orchestrator does), or the client's
  // host waits on it (no cross-process wait queued on the GPU).
  auto async_call = [&](bool use_stream, bool host_waits) {
    CK(cudaEventRecord(ready, stream));
    OK(use_stream ? ds.Decode(async_req).status() : cl.Decode(async_req).status());
    if (host_waits) {
      CK(cudaEventSynchronize(written));
    } else {
      CK(cudaStreamWaitEvent(stream, written, 0));
      CK(cudaStreamSynchronize(stream));
    }
  };
  const Stats unary_async = run_path("attnd unary, async (IPC events)", "Decode",
                                     [&] { async_call(false, false); }, true);
  const Stats stream_async = run_path("attnd Stream, async (IPC events)", "Stream.Decode",
                                      [&] { async_call(true, false); }, true);
  const Stats stream_async_host = run_path("attnd Stream, async, host waits on the event",
                                           "Stream.Decode", [&] { async_call(true, true); }, true);
  // Which half of the async path costs: only the wait event (attnd's stream waits on the
  // client's event, then attnd replies once the outputs are written), or only the signal event
  // (attnd replies once enqueued; the client's host waits on attnd's event).
  v1::AttentionRequest wait_only = req, signal_only = req;
  wait_only.mutable_sync()->set_wait_event("ready");
  signal_only.mutable_sync()->set_signal_event("written");
  const Stats wait_only_stats = run_path("attnd Stream, wait event only", "Stream.Decode", [&] {
    CK(cudaEventRecord(ready, stream));
    OK(ds.Decode(wait_only).status());
  }, true);
  const Stats signal_only_stats = run_path("attnd Stream, signal event only (host waits)", "Stream.Decode", [&] {
    OK(ds.Decode(signal_only).status());
    CK(cudaEventSynchronize(written));
  }, true);
  // Pipelined through attnd: each Stream call waits on the client's event and signals attnd's,
  // so attnd replies once its work is enqueued and the next call's round trip overlaps this
  // call's GPU work; the client's host waits once per round of kPipelined calls.
  reset_lengths();
  Stats stream_pipelined;
  {
    const testing::StageHistograms before = stage_snapshot();
    stream_pipelined = TimePipelined(
        calls / kPipelined, kPipelined,
        [&] {
          CK(cudaEventRecord(ready, stream));
          OK(ds.Decode(async_req).status());
        },
        [&] { CK(cudaEventSynchronize(written)); });
    paths.push_back({"attnd Stream, async, pipelined (per call)", "Stream.Decode", stream_pipelined,
                     testing::Subtract(stage_snapshot(), before)});
  }
  reset_lengths();
  Stats stream_pipelined_signal;
  {
    const testing::StageHistograms before = stage_snapshot();
    stream_pipelined_signal = TimePipelined(
        calls / kPipelined, kPipelined, [&] { OK(ds.Decode(signal_only).status()); },
        [&] { CK(cudaEventSynchronize(written)); });
    paths.push_back({"attnd Stream, signal event only, pipelined (per call)", "Stream.Decode",
                     stream_pipelined_signal, testing::Subtract(stage_snapshot(), before)});
  }
  OK(ds.Close());

  std::printf("server_bench on %s: Decode of %lld sequences at %lld tokens, one layer, bf16, "
              "%lld/%lld heads, head_dim %lld; %d calls each, wall-clock µs\n",
              prop.name, (long long)kBatch, (long long)kContext, (long long)kQo, (long long)kKv,
              (long long)kDim, calls);
  std::printf("| path | p50 µs | p99 µs | p50 over in-process (graph) |\n|---|---|---|---|\n");
  // Calls that do no GPU work have nothing to be compared with in process.
  auto row = [&](const char* name, Stats s, bool decodes = true) {
    if (decodes)
      std::printf("| %s | %.1f | %.1f | %+.1f |\n", name, s.p50, s.p99, s.p50 - in_graph.p50);
    else
      std::printf("| %s | %.1f | %.1f | |\n", name, s.p50, s.p99);
  };
  row("in-process backend, graph replay", in_graph);
  row("in-process backend, eager launches", in_eager);
  std::printf("| in-process backend, graph replay, pipelined (per call) | %.1f | %.1f | %+.1f |\n",
              in_graph_pipelined.p50, in_graph_pipelined.p99, in_graph_pipelined.p50 - in_graph.p50);
  row("empty gRPC call (GetServerInfo)", empty, false);
  row("attnd unary, sync", unary);
  row("attnd Stream, sync", streamed);
  row("attnd Stream, refused before the worker (no GPU work)", rejected_early, false);
  row("attnd Stream, refused on the worker (no GPU work)", rejected_worker, false);
  row("attnd unary, async (IPC events)", unary_async);
  row("attnd Stream, async (IPC events)", stream_async);
  row("attnd Stream, async, host waits on the event", stream_async_host);
  row("attnd Stream, wait event only", wait_only_stats);
  row("attnd Stream, signal event only (host waits)", signal_only_stats);
  auto row_pipelined = [&](const char* name, Stats s) {
    std::printf("| %s | %.1f | %.1f | %+.1f over in-process pipelined |\n", name, s.p50, s.p99,
                s.p50 - in_graph_pipelined.p50);
  };
  row_pipelined("attnd Stream, async, pipelined (per call)", stream_pipelined);
  row_pipelined("attnd Stream, signal event only, pipelined (per call)", stream_pipelined_signal);
  std::printf("\nhost time to enqueue one Decode (in-process, returns before the GPU finishes):\n");
  std::printf("| launch | p50 µs | p99 µs |\n|---|---|---|\n");
  std::printf("| graph replay, every page id rewritten | %.1f | %.1f |\n", launch_graph.p50, launch_graph.p99);
  std::printf("| eager (append + decode kernels) | %.1f | %.1f |\n", launch_eager.p50, launch_eager.p99);
  std::printf("| graph replay, page tables as the call before | %.1f | %.1f |\n", launch_graph_same.p50, launch_graph_same.p99);
  std::printf("| eager, same run as the row above | %.1f | %.1f |\n", launch_eager_same.p50, launch_eager_same.p99);
  std::printf("eager / graph host time: %.2fx (page ids rewritten), %.2fx (tables as the call before)\n",
              launch_eager.p50 / launch_graph.p50, launch_eager_same.p50 / launch_graph_same.p50);
  // Inside attnd, per path: the stages' medians (each read off its histogram's buckets, about
  // 19% wide below 1 ms, interpolated). Medians do not add up exactly; "total" is measured.
  std::printf("\nwhere each path's time goes inside attnd (attnd_request_stage_seconds, p50 µs "
              "over the path's calls; outside = client p50 - attnd total p50):\n");
  const char* stage_names[] = {"validate", "queue", "host", "device", "reply", "write", "total"};
  std::printf("| path | client | calls seen |");
  for (const char* st : stage_names) std::printf(" %s |", st);
  std::printf(" outside attnd |\n|---|---|---|");
  for (size_t i = 0; i < std::size(stage_names); ++i) std::printf("---|");
  std::printf("---|\n");
  for (const AttndPath& p : paths) {
    auto find = [&](const char* stage) -> const testing::Histogram* {
      auto it = p.stages.find({p.rpc, stage});
      return it == p.stages.end() ? nullptr : &it->second;
    };
    const testing::Histogram* total = find("total");
    std::printf("| %s | %.1f | %.0f |", p.name, p.stats.p50, total ? total->count : 0.0);
    for (const char* st : stage_names) {
      const testing::Histogram* h = find(st);
      if (h == nullptr) std::printf(" - |");
      else std::printf(" %.1f |", 1e6 * testing::Quantile(*h, 0.5));
    }
    if (total == nullptr) std::printf(" - |\n");
    else std::printf(" %.1f |\n", p.stats.p50 - 1e6 * testing::Quantile(*total, 0.5));
  }
  std::printf("(a path refused before the worker records no stages: gRPC's round trip alone. "
              "\"calls seen\" counts warm-ups too.)\n");
  std::printf("server flags:");
  for (const std::string& f : extra_flags) std::printf(" %s", f.c_str());
  std::printf("%s\n", extra_flags.empty() ? " (defaults)" : "");
  cl.UnregisterRegion("bench").IgnoreError();
  c->reset();  // hang up first: gRPC's shutdown waits for connected clients
  const int rc = (*server)->Terminate();
  std::printf("attnd exit %d\n", rc);
  if (rc != 0) {  // the end of attnd's log says why
    const std::string log = (*server)->Log();
    std::printf("attnd log (last 3000 bytes):\n%s\n",
                log.substr(log.size() > 3000 ? log.size() - 3000 : 0).c_str());
  }
  return 0;
}

}  // namespace
}  // namespace attnd

int main(int argc, char** argv) { return attnd::Main(argc, argv); }
