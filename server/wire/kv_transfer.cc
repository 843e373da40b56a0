#include "server/wire/kv_transfer.h"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "grpcpp/grpcpp.h"
#include "server/engine/kv_runs.h"
#include "server/wire/convert.h"
#include "server/wire/credentials.h"
#include "spdlog/spdlog.h"

namespace attnd::wire {
namespace {

constexpr size_t kMaxQueuedPulls = 64;
constexpr size_t kGrantBytes = 16;

absl::Status FromGrpc(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

// A source's error, said to be the source's, with its code kept.
absl::Status FromSource(const std::string& source, const char* rpc, const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat("source ", source, ": ", rpc, ": ", s.error_message()));
}

absl::StatusOr<kernels::KvCacheShape> SourceShape(const v1::OpenKvPullResponse& open) {
  const v1::ModelConfig& m = open.model();
  std::optional<kernels::DType> dtype = FromWire(m.dtype());
  std::optional<kernels::KvStorage> storage = FromWire(m.kv_cache_dtype());
  if (!dtype || (m.kv_layout() != v1::KV_LAYOUT_NHD && m.kv_layout() != v1::KV_LAYOUT_HND) ||
      !storage)
    return absl::FailedPreconditionError(
        "source: its pool's dtype, kv_cache_dtype or layout is unknown to this server");
  kernels::KvCacheShape s;
  s.num_layers = m.num_layers();
  s.num_pages = static_cast<int64_t>(open.pool_pages());
  s.page_size = m.page_size();
  s.num_kv_heads = m.num_kv_heads();
  s.head_dim = m.head_dim();
  s.layout = m.kv_layout() == v1::KV_LAYOUT_NHD ? kernels::KvLayout::kNHD : kernels::KvLayout::kHND;
  s.dtype = *dtype;
  s.storage = *storage;  // a per-token pool's scales follow its pages: TotalBytes() counts them
  return s;
}

// fp8 pools with per-layer scales: the source's scales of the pulled layers, which the engine
// compares with this server's (at reserve and again at commit) before it takes the bytes. A
// per-token pool has none: its scales travel with the pages (PlanPullRuns).
absl::Status TakeSourceScales(const v1::OpenKvPullResponse& open,
                              const kernels::KvCacheShape& src, const KvPullShape& shape,
                              KvPullTarget* target) {
  if (src.storage != kernels::KvStorage::kFp8E4M3) return absl::OkStatus();
  auto scales = ScalesFromWire(open.k_scales(), open.v_scales(), src.num_layers);
  if (!scales)
    return absl::FailedPreconditionError(absl::StrCat(
        "source: k_scales, v_scales: ", open.k_scales_size(), " and ", open.v_scales_size(),
        " entries for its fp8 pool of ", src.num_layers, " layers"));
  target->src_layer_begin = shape.layer_begin;
  target->src_scales.assign(scales->begin() + shape.layer_begin,
                            scales->begin() + shape.layer_end);
  return absl::OkStatus();
}

// This boot of this host: two attnd processes with the same id share the machine (and, with
// the same IPC namespace, can map each other's GPU memory).
const std::string& NodeId() {
  static const std::string id = [] {
    std::ifstream f("/proc/sys/kernel/random/boot_id");
    std::string line;
    std::getline(f, line);
    return line;
  }();
  return id;
}

absl::Status CheckPullRequest(const v1::PullKvRequest& req) {
  if (req.source().empty())
    return absl::InvalidArgumentError("source: the source attnd's gRPC target is empty");
  if (req.grant().size() != kGrantBytes)
    return absl::InvalidArgumentError(
        absl::StrCat("grant: ", req.grant().size(), " bytes; a grant is ", kGrantBytes));
  if ((req.layer_begin() != 0 || req.layer_end() != 0) && req.layer_begin() >= req.layer_end())
    return absl::InvalidArgumentError("layer_begin, layer_end: an empty layer range");
  if ((req.head_begin() != 0 || req.head_end() != 0) && req.head_begin() >= req.head_end())
    return absl::InvalidArgumentError("head_begin, head_end: an empty head range");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvTransfer>> KvTransfer::Create(Engine* engine) {
  const ServerConfig& c = engine->config();
  std::string token, ca;
  if (!c.kv_peer_token_file.empty()) {
    auto text = ReadFlagFile("kv_peer_token_file", c.kv_peer_token_file);
    if (!text.ok()) return text.status();
    std::vector<std::string> lines = absl::StrSplit(*text, '\n', absl::SkipWhitespace());
    if (lines.empty())
      return absl::InvalidArgumentError(
          absl::StrCat("--kv_peer_token_file=", c.kv_peer_token_file, ": no token in it"));
    token = std::string(absl::StripAsciiWhitespace(lines[0]));
  }
  if (!c.kv_peer_tls_ca_file.empty()) {
    auto text = ReadFlagFile("kv_peer_tls_ca_file", c.kv_peer_tls_ca_file);
    if (!text.ok()) return text.status();
    ca = *std::move(text);
  }
  auto transfer =
      std::unique_ptr<KvTransfer>(new KvTransfer(engine, std::move(token), std::move(ca)));
  // A server that lets peers pull registers its GPU pools now: that takes most of a second,
  // which the first pull would otherwise wait for. Host pools stay lazy: registering one with
  // an RDMA transport would pin (and so commit) memory the pool has only reserved.
  if (!c.kv_peers.empty()) {
    for (int device : engine->config().devices) {
      auto memory = engine->PoolMemoryOf(static_cast<uint32_t>(device));
      if (!memory.ok() || !memory->device_memory) continue;
      auto t = transfer->TransportFor(static_cast<uint32_t>(device));
      if (!t.ok()) spdlog::warn("kv transfer: {}", std::string(t.status().message()));
    }
  }
  return transfer;
}

KvTransfer::KvTransfer(Engine* engine, std::string token, std::string tls_ca)
    : engine_(engine), token_(std::move(token)), tls_ca_(std::move(tls_ca)) {
  for (int64_t i = 0; i < engine->config().max_concurrent_pulls; ++i)
    threads_.emplace_back([this] { RunPullThread(); });
}

KvTransfer::~KvTransfer() {
  std::deque<QueuedPull> dropped;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    dropped.swap(queue_);
  }
  for (QueuedPull& p : dropped)
    std::move(p.done)(absl::UnavailableError("attnd is shutting down; the pull did not start"));
  for (std::thread& t : threads_) t.join();
  absl::MutexLock lock(&mu_);
  transports_.clear();
}

bool KvTransfer::IsPeer(const std::string& principal) const {
  const std::vector<std::string>& peers = engine_->config().kv_peers;
  return std::find(peers.begin(), peers.end(), principal) != peers.end();
}

absl::StatusOr<UcxTransport*> KvTransfer::TransportFor(uint32_t device) {
  absl::MutexLock lock(&mu_);
  auto it = transports_.find(device);
  if (it != transports_.end()) return it->second.get();
  auto memory = engine_->PoolMemoryOf(device);
  if (!memory.ok()) return memory.status();
  PoolMemory pool{memory->base, static_cast<uint64_t>(memory->bytes), memory->device_memory};
  auto transport = UcxTransport::Create(pool, [this, device] {
    if (absl::Status s = engine_->BindThreadToDevice(device); !s.ok())
      spdlog::error("kv transfer: cannot bind the UCX thread to device {}: {}", device,
                    s.ToString());
  });
  if (!transport.ok())
    return absl::FailedPreconditionError(absl::StrCat(
        "KV transfer is unavailable on device ", device, ": ", transport.status().message()));
  spdlog::info("kv transfer: device={} ucx={} pool_bytes={} registered", device,
               UcxTransport::Version(), pool.bytes);
  UcxTransport* raw = transport->get();
  transports_.emplace(device, *std::move(transport));
  return raw;
}

absl::Status KvTransfer::OpenPull(const v1::OpenKvPullRequest& req,
                                  v1::OpenKvPullResponse* resp) {
  if (req.grant().size() != kGrantBytes)
    return absl::InvalidArgumentError(
        absl::StrCat("grant: ", req.grant().size(), " bytes; a grant is ", kGrantBytes));
  auto source = engine_->OpenKvPull(req.grant(), req.num_tokens(),
                                    absl::Seconds(engine_->config().kv_pull_timeout_s));
  if (!source.ok()) return source.status();
  // Without UCX for this pool (Debian's UCX registers no GPU memory) a same-node destination
  // can still map it; the pull fails only if neither way is offered.
  absl::StatusOr<UcxTransport*> transport = TransportFor(source->device);
  const int64_t pages = (source->num_tokens + source->shape.page_size - 1) / source->shape.page_size;
  resp->set_pull_id(source->pull_id);
  resp->set_num_tokens(static_cast<uint64_t>(source->num_tokens));
  for (int64_t i = 0; i < pages; ++i) resp->add_pages(source->pages[i]);
  v1::ServerInfo info;
  FillServerInfo(engine_->Info(), &info);
  *resp->mutable_model() = info.model();
  resp->set_pool_pages(static_cast<uint64_t>(source->shape.num_pages));
  ScalesToWire(source->scales, resp->mutable_k_scales(), resp->mutable_v_scales());
  if (transport.ok()) {
    resp->set_worker_address((*transport)->worker_address());
    resp->set_rkey((*transport)->pool_rkey());
    resp->set_pool_base((*transport)->pool_base());
    resp->set_ucx_version(UcxTransport::Version());
  }
  if (engine_->config().kv_same_node_ipc) {
    std::string handle;
    {
      absl::MutexLock lock(&mu_);
      auto it = pool_handles_.find(source->device);
      if (it != pool_handles_.end()) handle = it->second;
    }
    if (handle.empty()) {
      absl::StatusOr<std::string> h = engine_->PoolIpcHandle(source->device);
      handle = h.ok() ? *h : std::string(1, '\0');  // "\0": none, do not ask again
      absl::MutexLock lock(&mu_);
      pool_handles_[source->device] = handle;
    }
    if (handle.size() > 1) {
      resp->set_cuda_ipc_handle(handle);
      resp->set_node_id(NodeId());
    }
  }
  if (!transport.ok() && resp->cuda_ipc_handle().empty()) {
    (void)engine_->CloseKvPull(source->pull_id, /*completed=*/false);
    resp->Clear();
    return transport.status();
  }
  return absl::OkStatus();
}

std::shared_ptr<Region> KvTransfer::SameNodePool(const v1::PullKvRequest& req,
                                                 const v1::OpenKvPullResponse& open,
                                                 uint64_t bytes) {
  if (!engine_->config().kv_same_node_ipc || !engine_->cuda() ||
      open.cuda_ipc_handle().empty() || open.node_id() != NodeId())
    return nullptr;
  const std::string key =
      absl::StrCat(req.device(), "|", req.source(), "|", open.cuda_ipc_handle());
  {
    absl::MutexLock lock(&mu_);
    auto it = peer_pools_.find(key);
    if (it != peer_pools_.end()) return it->second;
  }
  absl::StatusOr<std::shared_ptr<Region>> mapped =
      engine_->MapPeerPool(req.device(), open.cuda_ipc_handle(), bytes);
  if (!mapped.ok())
    spdlog::warn("kv transfer: cannot map the pool of {} on device {} ({}); pulls from it use UCX",
                 absl::CHexEscape(req.source()), req.device(), std::string(mapped.status().message()));
  std::shared_ptr<Region> region = mapped.ok() ? *std::move(mapped) : nullptr;
  absl::MutexLock lock(&mu_);
  if (peer_pools_.size() >= 64) peer_pools_.clear();  // sources that came and went
  peer_pools_.emplace(key, region);
  return region;
}

absl::Status KvTransfer::CopyPages(const v1::PullKvRequest& req,
                                   const v1::OpenKvPullResponse& open,
                                   const kernels::KvCacheShape& src,
                                   const kernels::KvCacheShape& dst, const KvPullShape& shape,
                                   absl::Span<const int32_t> src_pages,
                                   absl::Span<const int32_t> dst_pages, absl::Time deadline,
                                   v1::PullKvResponse* resp) {
  const uint64_t src_bytes = static_cast<uint64_t>(src.TotalBytes());
  if (std::shared_ptr<Region> peer = SameNodePool(req, open, src_bytes)) {
    const int64_t pages = (shape.num_tokens + src.page_size - 1) / src.page_size;
    const int64_t layers = shape.layer_end - shape.layer_begin;
    resp->set_path("cuda_ipc");
    // (layer, page, K/V) blocks; a per-token pool's block carries its rows' scales (same warp).
    resp->set_requests(static_cast<uint64_t>(layers * pages * 2));
    // Each (token, head, K/V) row's bytes, and its f32 scale in a per-token pool.
    const int64_t row_bytes = dst.head_dim * dst.ElemBytes() + (dst.TokenScales() ? 4 : 0);
    resp->set_bytes(
        static_cast<uint64_t>(layers * 2 * shape.num_tokens * dst.num_kv_heads * row_bytes));
    PeerPoolPull pull;
    pull.src = peer->base();
    pull.src_shape = src;
    pull.src_pages = src_pages;
    pull.dst_pages = dst_pages;
    pull.layer_begin = shape.layer_begin;
    pull.layer_end = shape.layer_end;
    pull.dst_layer_begin = shape.dst_layer_begin;
    pull.head_begin = shape.head_begin;
    pull.head_end = shape.head_end;
    pull.num_tokens = shape.num_tokens;
    return engine_->PullFromPeerPool(req.device(), pull);
  }
  resp->set_path("ucx");
  if (open.worker_address().empty())
    return absl::FailedPreconditionError(absl::StrCat(
        "source ", req.source(), " offers no UCX for its pool (its UCX cannot register it) and "
        "the pool could not be mapped here through CUDA IPC"));
  if (open.ucx_version() != UcxTransport::Version())
    return absl::FailedPreconditionError(absl::StrCat(
        "source ", req.source(), " runs UCX ", open.ucx_version(), ", this server ",
        UcxTransport::Version(), "; both sides of a pull must run the same UCX version"));
  auto runs = PlanPullRuns(src, dst, shape, src_pages, dst_pages);
  if (!runs.ok()) return runs.status();
  absl::StatusOr<UcxTransport*> transport = TransportFor(req.device());
  if (!transport.ok()) return transport.status();
  std::vector<CopyRun> copies;
  copies.reserve(runs->size());
  for (const PageRun& r : *runs) copies.push_back({r.src_offset, r.dst_offset, r.bytes});
  RemotePool remote{open.worker_address(), open.rkey(), open.pool_base(), src_bytes};
  ReadStats stats;
  absl::Status read = (*transport)->Read(remote, copies, deadline, &stats);
  resp->set_requests(stats.requests);
  resp->set_bytes(stats.bytes);
  if (!read.ok())
    return absl::Status(read.code(), absl::StrCat("source ", req.source(),
                                                  ": reading the pages failed: ", read.message()));
  return absl::OkStatus();
}

absl::Status KvTransfer::ClosePull(const v1::CloseKvPullRequest& req) {
  return engine_->CloseKvPull(req.pull_id(), req.completed());
}

void KvTransfer::Pull(const ClientRef& client, const v1::PullKvRequest& req, PullDone done) {
  if (absl::Status s = CheckPullRequest(req); !s.ok()) return std::move(done)(s);
  const std::vector<std::string>& sources = engine_->config().kv_sources;
  if (std::find(sources.begin(), sources.end(), "*") == sources.end() &&
      std::find(sources.begin(), sources.end(), req.source()) == sources.end())
    return std::move(done)(absl::PermissionDeniedError(absl::StrCat(
        "source: ", absl::CHexEscape(req.source()),
        " is not a source this server may pull from (--kv_sources)")));
  absl::MutexLock lock(&mu_);
  if (stopping_) return std::move(done)(absl::UnavailableError("attnd is shutting down"));
  if (queue_.size() >= kMaxQueuedPulls)
    return std::move(done)(absl::ResourceExhaustedError(absl::StrCat(
        "this server already has ", queue_.size(), " pulls waiting for one of its ",
        threads_.size(), " pull threads (--max_concurrent_pulls)")));
  queue_.push_back(QueuedPull{client, req, std::move(done)});
}

void KvTransfer::RunPullThread() {
  while (true) {
    QueuedPull pull;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](KvTransfer* t) ABSL_EXCLUSIVE_LOCKS_REQUIRED(t->mu_) {
            return t->stopping_ || !t->queue_.empty();
          },
          this));
      if (queue_.empty()) return;  // stopping
      pull = std::move(queue_.front());
      queue_.pop_front();
    }
    std::move(pull.done)(RunPull(pull.client, pull.req));
  }
}

std::shared_ptr<v1::Attention::Stub> KvTransfer::StubFor(const std::string& target) {
  absl::MutexLock lock(&mu_);
  auto it = stubs_.find(target);
  if (it != stubs_.end()) return it->second;
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (!tls_ca_.empty() && !absl::StartsWith(target, "unix:")) {
    grpc::SslCredentialsOptions options;
    options.pem_root_certs = tls_ca_;
    creds = grpc::SslCredentials(options);
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  auto stub = std::shared_ptr<v1::Attention::Stub>(
      v1::Attention::NewStub(grpc::CreateChannel(target, creds)));
  stubs_.emplace(target, stub);
  return stub;
}

void KvTransfer::PrepareContext(grpc::ClientContext* ctx, absl::Time deadline) const {
  ctx->set_deadline(absl::ToChronoTime(deadline));
  if (!token_.empty()) ctx->AddMetadata("authorization", absl::StrCat("Bearer ", token_));
}

absl::StatusOr<v1::PullKvResponse> KvTransfer::RunPull(const ClientRef& client,
                                                       const v1::PullKvRequest& req) {
  PullTimes times;
  times.start = absl::Now();
  const absl::Time deadline = times.start + absl::Seconds(engine_->config().kv_pull_timeout_s);
  std::shared_ptr<v1::Attention::Stub> stub = StubFor(req.source());
  v1::OpenKvPullRequest open_req;
  open_req.set_grant(req.grant());
  open_req.set_num_tokens(req.num_tokens());
  v1::OpenKvPullResponse open;
  {
    grpc::ClientContext ctx;
    PrepareContext(&ctx, deadline);
    grpc::Status s = stub->OpenKvPull(&ctx, open_req, &open);
    if (!s.ok()) return FromSource(req.source(), "OpenKvPull", s);
  }
  times.opened = absl::Now();
  absl::StatusOr<v1::PullKvResponse> result = ReadPull(client, req, open, deadline, &times);
  // The done message: the source lets go of the pages for this pull (and ends the grant after
  // its last allowed pull). A source that is gone has let go already.
  v1::CloseKvPullRequest close;
  close.set_pull_id(open.pull_id());
  close.set_completed(result.ok());
  v1::CloseKvPullResponse closed;
  grpc::ClientContext ctx;
  PrepareContext(&ctx, absl::Now() + absl::Seconds(5));
  grpc::Status s = stub->CloseKvPull(&ctx, close, &closed);
  if (!s.ok() && result.ok())
    spdlog::warn("kv transfer: source {} did not take the close of pull {}: {}", req.source(),
                 open.pull_id(), s.error_message());
  const auto ms = [](absl::Time a, absl::Time b) {
    return b > a ? absl::ToDoubleMilliseconds(b - a) : 0.0;
  };
  const absl::Time end = absl::Now();
  spdlog::info(
      "kv pull source=\"{}\" device={} seq_id={} code={} path={} bytes={} requests={} open_ms={:.2f} "
      "reserve_ms={:.2f} read_ms={:.2f} commit_ms={:.2f} close_ms={:.2f} total_ms={:.2f}",
      absl::CHexEscape(req.source()), req.device(), req.seq_id(),
      absl::StatusCodeToString(result.status().code()), result.ok() ? result->path() : "-",
      result.ok() ? result->bytes() : 0,
      result.ok() ? result->requests() : 0, ms(times.start, times.opened),
      ms(times.opened, times.reserved), ms(times.reserved, times.read),
      ms(times.read, times.committed), ms(std::max(times.committed, times.opened), end),
      ms(times.start, end));
  return result;
}

absl::StatusOr<v1::PullKvResponse> KvTransfer::ReadPull(const ClientRef& client,
                                                        const v1::PullKvRequest& req,
                                                        const v1::OpenKvPullResponse& open,
                                                        absl::Time deadline, PullTimes* times) {
  auto src = SourceShape(open);
  if (!src.ok()) return src.status();
  auto dst = engine_->PoolShape(req.device());
  if (!dst.ok()) return dst.status();
  KvPullShape shape;
  shape.layer_begin = req.layer_end() == 0 ? 0 : req.layer_begin();
  shape.layer_end = req.layer_end() == 0 ? src->num_layers : req.layer_end();
  shape.dst_layer_begin = req.dst_layer_begin();
  shape.head_begin = req.head_end() == 0 ? 0 : req.head_begin();
  shape.head_end = req.head_end() == 0 ? src->num_kv_heads : req.head_end();
  shape.num_tokens = static_cast<int64_t>(open.num_tokens());
  if (absl::Status s = CheckPullCompatible(*src, *dst, shape); !s.ok()) return s;

  KvPullTarget target;
  target.client = client;
  target.device = req.device();
  target.seq_id = req.seq_id();
  target.num_tokens = shape.num_tokens;
  target.layer_begin = shape.dst_layer_begin;
  target.layer_end = shape.dst_layer_begin + (shape.layer_end - shape.layer_begin);
  if (absl::Status s = TakeSourceScales(open, *src, shape, &target); !s.ok()) return s;
  if (engine_->config().debug_pull_pause_ms > 0)  // tests: the source changes or dies here
    absl::SleepFor(absl::Milliseconds(engine_->config().debug_pull_pause_ms));
  auto pages = engine_->ReserveKvPull(target);
  if (!pages.ok()) return pages.status();
  times->reserved = absl::Now();
  const std::vector<int32_t> src_pages(open.pages().begin(), open.pages().end());
  v1::PullKvResponse resp;
  const auto start = std::chrono::steady_clock::now();
  absl::Status read =
      CopyPages(req, open, *src, *dst, shape, src_pages, *pages, deadline, &resp);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  times->read = absl::Now();
  if (!read.ok()) {
    engine_->AbortKvPull(req.device(), *std::move(pages));
    return read;
  }
  auto lengths = engine_->CommitKvPull(target, *std::move(pages));
  if (!lengths.ok()) return lengths.status();
  times->committed = absl::Now();
  for (int64_t len : *lengths) resp.add_layer_lengths(static_cast<uint64_t>(len));
  resp.set_transfer_s(seconds);
  return resp;
}

}  // namespace attnd::wire
