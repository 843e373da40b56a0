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
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <utility>
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
constexpr int kPipelined = 8;  // calls per round in the pipelined runs

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

// Median and p99 of the samples.
Stats Percentiles(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  return {us[us.size() / 2], us[std::min(us.size() - 1, us.size() * 99 / 100)]};
}

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
  return Percentiles(std::move(us));
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
  return Percentiles(std::move(us));
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

struct Options {
  int calls = 300;
  std::vector<std::string> extra_flags;  // --server_flag values, passed on to attnd
};

Options ParseOptions(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--calls") o.calls = std::atoi(argv[++i]);
    if (std::string(argv[i]) == "--server_flag") o.extra_flags.push_back(argv[++i]);
    if (std::string(argv[i]) == "--attnd") setenv("ATTND_BINARY", argv[++i], 1);
  }
  return o;
}

struct InProcessStats {
  Stats graph, graph_pipelined, eager;
  // Host time to enqueue one Decode: page ids rewritten; page tables as the call before.
  Stats launch_graph, launch_eager, launch_graph_same, launch_eager_same;
};

// Host time to enqueue one Decode: with a signal event the backend returns once enqueued.
// Launch-only time: measured around the enqueue (plan and launch), outside the wait.
// Graph and eager calls alternate, so that both see the same machine moments ({graph, eager}
// returned); 5x the calls of the other rows (host enqueue times are a few microseconds and
// noisy). table_epoch: 0 says "page tables unknown" (the graph path rewrites every page id); a
// fixed value says they are the ones of the call before, as for every layer after the first of
// a step (and 15 of 16 steps at page size 16) through attnd, whose pool tracks changes.
std::pair<Stats, Stats> LaunchOnly(InProcess& graph, InProcess& eager, const Buffers& b,
                                   cudaEvent_t done, int calls, uint64_t table_epoch) {
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
  return {Percentiles(std::move(us[0])), Percentiles(std::move(us[1]))};
}

// The backend called in this process: graph replay (alone, pipelined), eager, launch times.
InProcessStats MeasureInProcess(const Buffers& b, int calls) {
  InProcessStats s;
  cudaEvent_t done;
  CK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  InProcess graph(true, b), eager(false, b);
  graph.ResetLengths();
  s.graph = Time(calls, [&] { OK(graph.Run(graph.Step(b))); });
  // The same graph replays pipelined: each call returns once enqueued (a signal event), the
  // GPU runs them back to back; per-call time in the steady state a layer loop sees.
  graph.ResetLengths();
  s.graph_pipelined = TimePipelined(calls / kPipelined, kPipelined, [&] {
    Call c = graph.Step(b);
    c.work.append.sync.signal = done;
    OK(graph.Run(c));
  }, [&] { CK(cudaEventSynchronize(done)); });
  eager.ResetLengths();
  s.eager = Time(calls, [&] { OK(eager.Run(eager.Step(b))); });
  std::tie(s.launch_graph, s.launch_eager) = LaunchOnly(graph, eager, b, done, calls, 0);
  std::tie(s.launch_graph_same, s.launch_eager_same) = LaunchOnly(graph, eager, b, done, calls, 1);
  graph.backend.reset();
  eager.backend.reset();
  return s;
}

// attnd with region "bench", events "ready" (the client's) and "written" (attnd's), and kBatch
// sequences of kContext - 1 tokens.
struct Attnd {
  std::unique_ptr<testing::ServerProcess> server;
  std::unique_ptr<client::Client> client;  // reset before the server stops
  cudaEvent_t ready, written;
  cudaStream_t stream;  // the client's
  std::unique_ptr<client::DataStream> data_stream;  // closed by RunAttndPaths; freed last
};

Attnd StartAttnd(const std::vector<std::string>& extra_flags, const Buffers& b) {
  std::vector<std::string> flags = {
      "--backend=cuda", "--devices=0", "--num_layers=1", absl::StrCat("--num_qo_heads=", kQo),
      absl::StrCat("--num_kv_heads=", kKv), absl::StrCat("--head_dim=", kDim), "--dtype=bf16",
      absl::StrCat("--page_size=", kPage),
      absl::StrCat("--pages_per_device=", kBatch * kPagesPerSeq + 64),
      absl::StrCat("--max_seq_len=", kContext + 1024), "--metrics_port=auto"};
  flags.insert(flags.end(), extra_flags.begin(), extra_flags.end());
  Attnd a;
  auto server = testing::ServerProcess::Start(flags);
  OK(server.status());
  a.server = *std::move(server);
  auto c = client::Client::Connect(a.server->unix_target());
  OK(c.status());
  a.client = *std::move(c);
  client::Client& cl = *a.client;
  cudaIpcMemHandle_t mem;
  CK(cudaIpcGetMemHandle(&mem, b.base));
  OK(cl.RegisterCudaRegion("bench", std::string(reinterpret_cast<char*>(&mem), sizeof(mem)), 0, b.bytes));
  CK(cudaEventCreateWithFlags(&a.ready, cudaEventInterprocess | cudaEventDisableTiming));
  CK(cudaEventCreateWithFlags(&a.written, cudaEventInterprocess | cudaEventDisableTiming));
  for (auto [name, ev] : {std::pair{"ready", a.ready}, std::pair{"written", a.written}}) {
    cudaIpcEventHandle_t h;
    CK(cudaIpcGetEventHandle(&h, ev));
    OK(cl.RegisterCudaEvent(name, std::string(reinterpret_cast<char*>(&h), sizeof(h)), 0));
  }
  for (int64_t s = 0; s < kBatch; ++s) {
    OK(cl.CreateSequence(0, static_cast<uint64_t>(s)).status());
    v1::AppendRequest ap;
    ap.set_layer(0);
    auto* item = ap.add_items();
    item->set_seq_id(static_cast<uint64_t>(s));
    item->set_num_new_tokens(kContext - 1);
    *ap.mutable_k_new() = client::MakeTensorRef("bench", b.fill_k, v1::DTYPE_BFLOAT16, {kContext - 1, kKv, kDim});
    *ap.mutable_v_new() = client::MakeTensorRef("bench", b.fill_v, v1::DTYPE_BFLOAT16, {kContext - 1, kKv, kDim});
    OK(cl.Append(ap).status());
  }
  CK(cudaStreamCreateWithFlags(&a.stream, cudaStreamNonBlocking));
  return a;
}

// One Decode step of every sequence in region "bench": no events, both (async), one of them;
// and requests attnd turns down without GPU work, before the device worker (no items) and on
// it (an unknown sequence): their round trips are gRPC's alone, then gRPC's plus the hand-off.
struct Requests {
  v1::AttentionRequest sync, async, wait_only, signal_only, no_items, unknown_seq;
};

Requests MakeRequests(const Buffers& b) {
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
  Requests r{req, req, req, req, req, req};
  r.async.mutable_sync()->set_wait_event("ready");
  r.async.mutable_sync()->set_signal_event("written");
  r.wait_only.mutable_sync()->set_wait_event("ready");
  r.signal_only.mutable_sync()->set_signal_event("written");
  r.no_items.clear_items();
  r.unknown_seq.mutable_items(0)->set_seq_id(kBatch + 1000);
  return r;
}

// One path through attnd: the client's times, and what attnd's stages recorded over its calls.
struct AttndPath {
  // What the first table compares its p50 with (nothing: calls that do no GPU work).
  enum class Baseline { kNone, kGraph, kGraphPipelined };
  const char* name;
  const char* rpc;  // whose stages it records
  Baseline baseline;
  Stats stats;
  testing::StageHistograms stages;
};

// Times paths through attnd. Every path that decodes starts at kContext - 1 tokens and rolls
// back every kLengthWindow steps, as the in-process runs do (untimed).
struct PathRunner {
  client::Client& cl;
  int metrics_port, calls;
  cudaEvent_t written;  // attnd's: the pipelined paths wait on it once per round
  std::vector<AttndPath> paths{};
  int64_t steps = 0;

  void ResetLengths() {
    for (int64_t s = 0; s < kBatch; ++s)
      OK(cl.TruncateSequence(0, static_cast<uint64_t>(s), kContext - 1).status());
    steps = 0;
  }
  // time() measures the path; its stages are what /metrics gained meanwhile.
  void Add(const char* name, const char* rpc, AttndPath::Baseline baseline,
           const std::function<Stats()>& time) {
    if (baseline != AttndPath::Baseline::kNone) ResetLengths();
    auto before = testing::ReadStageHistograms(metrics_port);
    OK(before.status());
    const Stats st = time();
    auto after = testing::ReadStageHistograms(metrics_port);
    OK(after.status());
    paths.push_back({name, rpc, baseline, st, testing::Subtract(*after, *before)});
  }
  void Run(const char* name, const char* rpc, bool decodes, const std::function<void()>& fn) {
    const std::function<void()> maybe_truncate = [this] {
      if (steps == kLengthWindow) ResetLengths();
      ++steps;
    };
    Add(name, rpc, decodes ? AttndPath::Baseline::kGraph : AttndPath::Baseline::kNone,
        [&] { return Time(calls, fn, decodes ? maybe_truncate : [] {}); });
  }
  // Rounds of kPipelined calls issued back to back, then a wait for `written`; time per call.
  void RunPipelined(const char* name, const std::function<void()>& call) {
    Add(name, "Stream.Decode", AttndPath::Baseline::kGraphPipelined, [&] {
      return TimePipelined(calls / kPipelined, kPipelined, call,
                           [&] { CK(cudaEventSynchronize(written)); });
    });
  }
};

void ExpectCode(absl::Status s, absl::StatusCode code) {
  if (s.code() != code) {
    std::fprintf(stderr, "expected %s, got %s\n", absl::StatusCodeToString(code).c_str(),
                 s.ToString().c_str());
    std::exit(1);
  }
}

// Every path through attnd, in the order the tables print them.
std::vector<AttndPath> RunAttndPaths(Attnd& a, const Buffers& b, int calls) {
  const Requests r = MakeRequests(b);
  client::Client& cl = *a.client;
  PathRunner run{cl, a.server->metrics_port(), calls, a.written};
  run.Run("attnd unary, sync", "Decode", true, [&] { OK(cl.Decode(r.sync).status()); });
  auto stream_or = cl.OpenStream();
  OK(stream_or.status());
  a.data_stream = *std::move(stream_or);
  client::DataStream& ds = *a.data_stream;
  run.Run("attnd Stream, sync", "Stream.Decode", true, [&] { OK(ds.Decode(r.sync).status()); });
  run.Run("attnd Stream, refused before the worker (no GPU work)", "Stream.Decode", false,
          [&] { ExpectCode(ds.Decode(r.no_items).status(), absl::StatusCode::kInvalidArgument); });
  run.Run("attnd Stream, refused on the worker (no GPU work)", "Stream.Decode", false,
          [&] { ExpectCode(ds.Decode(r.unknown_seq).status(), absl::StatusCode::kNotFound); });
  // The client's stream waits on attnd's event (what an orchestrator does), or the client's
  // host waits on it (no cross-process wait queued on the GPU).
  auto async = [&](bool use_stream, bool host_waits) {
    CK(cudaEventRecord(a.ready, a.stream));
    OK(use_stream ? ds.Decode(r.async).status() : cl.Decode(r.async).status());
    if (host_waits) {
      CK(cudaEventSynchronize(a.written));
    } else {
      CK(cudaStreamWaitEvent(a.stream, a.written, 0));
      CK(cudaStreamSynchronize(a.stream));
    }
  };
  run.Run("attnd unary, async (IPC events)", "Decode", true, [&] { async(false, false); });
  run.Run("attnd Stream, async (IPC events)", "Stream.Decode", true, [&] { async(true, false); });
  run.Run("attnd Stream, async, host waits on the event", "Stream.Decode", true,
          [&] { async(true, true); });
  // Which half of the async path costs: only the wait event (attnd's stream waits on the
  // client's event, then attnd replies once the outputs are written), or only the signal event
  // (attnd replies once enqueued; the client's host waits on attnd's event).
  run.Run("attnd Stream, wait event only", "Stream.Decode", true, [&] {
    CK(cudaEventRecord(a.ready, a.stream));
    OK(ds.Decode(r.wait_only).status());
  });
  run.Run("attnd Stream, signal event only (host waits)", "Stream.Decode", true, [&] {
    OK(ds.Decode(r.signal_only).status());
    CK(cudaEventSynchronize(a.written));
  });
  // Pipelined through attnd: each Stream call waits on the client's event and signals attnd's,
  // so attnd replies once its work is enqueued and the next call's round trip overlaps this
  // call's GPU work; the client's host waits once per round of kPipelined calls.
  run.RunPipelined("attnd Stream, async, pipelined (per call)", [&] {
    CK(cudaEventRecord(a.ready, a.stream));
    OK(ds.Decode(r.async).status());
  });
  run.RunPipelined("attnd Stream, signal event only, pipelined (per call)",
                   [&] { OK(ds.Decode(r.signal_only).status()); });
  OK(ds.Close());
  return std::move(run.paths);
}

// Every path's client p50 and p99, and its p50 over the in-process graph replay's.
void PrintCallTable(const cudaDeviceProp& prop, int calls, const InProcessStats& in,
                    Stats empty, const std::vector<AttndPath>& paths) {
  std::printf("server_bench on %s: Decode of %lld sequences at %lld tokens, one layer, bf16, "
              "%lld/%lld heads, head_dim %lld; %d calls each, wall-clock µs\n",
              prop.name, (long long)kBatch, (long long)kContext, (long long)kQo, (long long)kKv,
              (long long)kDim, calls);
  std::printf("| path | p50 µs | p99 µs | p50 over in-process (graph) |\n|---|---|---|---|\n");
  // Calls that do no GPU work have nothing to be compared with in process.
  auto row = [&](const char* name, Stats s, bool decodes = true) {
    if (decodes)
      std::printf("| %s | %.1f | %.1f | %+.1f |\n", name, s.p50, s.p99, s.p50 - in.graph.p50);
    else
      std::printf("| %s | %.1f | %.1f | |\n", name, s.p50, s.p99);
  };
  row("in-process backend, graph replay", in.graph);
  row("in-process backend, eager launches", in.eager);
  row("in-process backend, graph replay, pipelined (per call)", in.graph_pipelined);
  row("empty gRPC call (GetServerInfo)", empty, false);
  for (const AttndPath& p : paths) {
    if (p.baseline == AttndPath::Baseline::kGraphPipelined)
      std::printf("| %s | %.1f | %.1f | %+.1f over in-process pipelined |\n", p.name,
                  p.stats.p50, p.stats.p99, p.stats.p50 - in.graph_pipelined.p50);
    else
      row(p.name, p.stats, p.baseline == AttndPath::Baseline::kGraph);
  }
}

void PrintLaunchTable(const InProcessStats& in) {
  std::printf("\nhost time to enqueue one Decode (in-process, returns before the GPU finishes):\n");
  std::printf("| launch | p50 µs | p99 µs |\n|---|---|---|\n");
  std::printf("| graph replay, every page id rewritten | %.1f | %.1f |\n", in.launch_graph.p50, in.launch_graph.p99);
  std::printf("| eager (append + decode kernels) | %.1f | %.1f |\n", in.launch_eager.p50, in.launch_eager.p99);
  std::printf("| graph replay, page tables as the call before | %.1f | %.1f |\n", in.launch_graph_same.p50, in.launch_graph_same.p99);
  std::printf("| eager, same run as the row above | %.1f | %.1f |\n", in.launch_eager_same.p50, in.launch_eager_same.p99);
  std::printf("eager / graph host time: %.2fx (page ids rewritten), %.2fx (tables as the call before)\n",
              in.launch_eager.p50 / in.launch_graph.p50,
              in.launch_eager_same.p50 / in.launch_graph_same.p50);
}

// Inside attnd, per path: the stages' medians (each read off its histogram's buckets, about
// 19% wide below 1 ms, interpolated). Medians do not add up exactly; "total" is measured.
void PrintStageTable(const std::vector<AttndPath>& paths) {
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
}

int Main(int argc, char** argv) {
  const Options options = ParseOptions(argc, argv);
  CK(cudaSetDevice(0));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const Buffers b = MakeBuffers();
  const InProcessStats in_process = MeasureInProcess(b, options.calls);
  Attnd attnd = StartAttnd(options.extra_flags, b);
  const Stats empty = Time(options.calls, [&] { OK(attnd.client->GetServerInfo().status()); });
  const std::vector<AttndPath> paths = RunAttndPaths(attnd, b, options.calls);
  PrintCallTable(prop, options.calls, in_process, empty, paths);
  PrintLaunchTable(in_process);
  PrintStageTable(paths);
  std::printf("server flags:");
  for (const std::string& f : options.extra_flags) std::printf(" %s", f.c_str());
  std::printf("%s\n", options.extra_flags.empty() ? " (defaults)" : "");
  attnd.client->UnregisterRegion("bench").IgnoreError();
  attnd.client.reset();  // hang up first: gRPC's shutdown waits for connected clients
  const int rc = attnd.server->Terminate();
  std::printf("attnd exit %d\n", rc);
  if (rc != 0) {  // the end of attnd's log says why
    const std::string log = attnd.server->Log();
    std::printf("attnd log (last 3000 bytes):\n%s\n",
                log.substr(log.size() > 3000 ? log.size() - 3000 : 0).c_str());
  }
  return 0;
}

}  // namespace
}  // namespace attnd

int main(int argc, char** argv) { return attnd::Main(argc, argv); }
