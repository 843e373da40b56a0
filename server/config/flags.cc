#include "server/config/flags.h"

#include <cstdlib>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

ABSL_FLAG(std::string, backend, "auto", "cpu, cuda, or auto (cuda when a GPU is present)");
ABSL_FLAG(std::string, devices, "all",
          "Comma-separated device indices to serve, or \"all\": every visible GPU (the CPU backend: 0)");
ABSL_FLAG(int64_t, num_layers, 2, "Model layers whose KV the pool holds");
ABSL_FLAG(int64_t, num_qo_heads, 8, "Query/output heads");
ABSL_FLAG(int64_t, num_kv_heads, 2, "K/V heads; divides num_qo_heads");
ABSL_FLAG(int64_t, head_dim, 64, "Elements per head (64, 128 or 256 on CUDA)");
ABSL_FLAG(std::string, dtype, "bf16", "Element type of q/k/v/out and the pool: bf16, fp16, fp32");
ABSL_FLAG(int64_t, page_size, 16, "Tokens per KV page, 1..64");
ABSL_FLAG(std::string, kv_cache_dtype, "auto",
          "How the pool stores K and V: auto (the model dtype); fp8 (= fp8_e4m3: e4m3 with "
          "per-layer scales, half the bytes of a bf16/fp16 pool); or fp8_per_token (e4m3 with a "
          "scale per token and kv head of K and of V, computed at append: no calibration, 4 more "
          "bytes per token, head and K/V, ~3% of a head_dim-128 fp8 pool)");
ABSL_FLAG(std::string, kv_scales_file, "",
          "--kv_cache_dtype=fp8: a file of 'k_scale v_scale' lines, one for every layer or one "
          "per layer in layer order ('#' comments); K = k_scale * fp8. Empty: every scale 1. "
          "fp8_per_token pools compute their scales and take no file");
ABSL_FLAG(std::string, kv_layout, "NHD", "Page layout: NHD or HND");
ABSL_FLAG(double, sm_scale, 0.0, "Logits scale; 0 = 1/sqrt(head_dim)");
ABSL_FLAG(double, logits_soft_cap, 0.0, "Soft-cap of the logits (cap*tanh(x/cap)); 0 = off");
ABSL_FLAG(int64_t, window_left, -1, "Sliding window: keys [i - window_left, i]; -1 = off");
ABSL_FLAG(int64_t, pages_per_device, 0, "KV pages per device; 0 = from --memory_fraction");
ABSL_FLAG(double, memory_fraction, 0.1,
          "Fraction of free GPU memory (CUDA) or physical RAM (CPU) for each device's pool");
ABSL_FLAG(int64_t, max_batch_size, 256, "Most sequences in one data request");
ABSL_FLAG(int64_t, max_seq_len, 131072, "Most tokens a sequence may hold per layer");
ABSL_FLAG(int64_t, max_tokens_per_request, 65536, "Most new tokens in one data request");
ABSL_FLAG(std::string, graph_buckets, "",
          "Comma-separated decode batch sizes to capture CUDA graphs for; empty = 1,2,4,8,16,24,"
          "32,... up to --max_batch_size");
ABSL_FLAG(std::string, unix_socket, "/tmp/attnd.sock", "Unix socket to listen on; empty = none");
ABSL_FLAG(std::string, tcp_address, "", "host:port to listen on over TCP; empty = none");
ABSL_FLAG(std::string, tls_cert_file, "", "TLS on TCP: the server's certificate chain (PEM)");
ABSL_FLAG(std::string, tls_key_file, "", "TLS on TCP: the server's private key (PEM)");
ABSL_FLAG(std::string, tls_client_ca_file, "",
          "TLS on TCP: CA certificates (PEM) client certificates must chain to; set = required");
ABSL_FLAG(bool, insecure_tcp, false,
          "Serve --tcp_address without TLS (anyone who can reach the port can call attnd)");
ABSL_FLAG(std::string, token_file, "",
          "Bearer tokens, one 'name token' per line; a call with 'authorization: Bearer <token>' "
          "acts as client 'name'. Set: TCP calls need a valid token");
ABSL_FLAG(double, lease_timeout_s, 60.0,
          "How long a client's sequences, regions and events outlive its last connection, open "
          "Stream and call before they are released");
ABSL_FLAG(int64_t, max_sequences_per_client, 65536, "Most live sequences per client; 0 = no limit");
ABSL_FLAG(int64_t, max_pages_per_client, 0, "Most KV pages per client per device; 0 = no limit");
ABSL_FLAG(int64_t, max_regions_per_client, 1024, "Most registered regions per client; 0 = no limit");
ABSL_FLAG(int64_t, max_region_bytes_per_client, 0,
          "Most bytes of registered regions per client; 0 = no limit");
ABSL_FLAG(int64_t, max_events_per_client, 1024, "Most registered CUDA events per client; 0 = no limit");
ABSL_FLAG(std::string, kv_peers, "",
          "KV transfer: comma-separated callers (uid:N, token:NAME) that may pull this server's "
          "grants (other attnd processes; each learns the UCX key of a whole pool)");
ABSL_FLAG(std::string, kv_scale_setters, "",
          "fp8 pools: comma-separated callers (uid:N, token:NAME, or * for any) that may change "
          "the KV scales with SetKvScales; empty: nobody (scales come from --kv_scales_file)");
ABSL_FLAG(std::string, kv_sources, "",
          "KV transfer: comma-separated gRPC targets (host:port, unix:///path) this server may "
          "pull from, or * for any; empty: PullKv is refused");
ABSL_FLAG(std::string, kv_peer_token_file, "",
          "KV transfer: a file whose first line is the bearer token this server presents to "
          "source attnd processes it pulls from");
ABSL_FLAG(std::string, kv_peer_tls_ca_file, "",
          "KV transfer: CA certificates (PEM) of TLS sources; unset: TCP sources are plaintext");
ABSL_FLAG(bool, kv_same_node_ipc, true,
          "KV transfer between CUDA pools on one node: map the source's pool through CUDA IPC "
          "and copy the runs with one kernel instead of a UCX request each");
ABSL_FLAG(int64_t, max_concurrent_pulls, 4, "KV transfer: pulls run at once (more wait)");
ABSL_FLAG(double, kv_pull_timeout_s, 60.0, "KV transfer: the longest one pull may take");
ABSL_FLAG(int32_t, metrics_port, 9464, "Port of the Prometheus /metrics endpoint; 0 = off");
ABSL_FLAG(std::string, metrics_bind, "127.0.0.1",
          "Address the /metrics endpoint binds (0.0.0.0 to let scrapers on other hosts in)");
ABSL_FLAG(std::string, unix_socket_mode, "0660",
          "Permission bits of the Unix socket file, in octal: who on this host may connect");
ABSL_FLAG(int64_t, max_message_bytes, 4 << 20,
          "Largest request accepted, in bytes (requests are control messages; tensors travel by "
          "region)");
ABSL_FLAG(std::string, log_level, "info", "trace, debug, info, warn, error");
ABSL_FLAG(int32_t, cpu_threads, 0, "CPU backend: threads computing each device's attention; 0 = all cores");
ABSL_FLAG(int64_t, cuda_workspace_mb, 1024,
          "CUDA backend: MiB per device for split-KV partial states (bounds the batches one "
          "request may carry)");
ABSL_FLAG(bool, cuda_graphs, true,
          "CUDA backend: run Decode batches up to the largest --graph_buckets entry by replaying "
          "graphs captured at start-up (false: always launch eagerly)");
ABSL_FLAG(int64_t, debug_pull_pause_ms, 0,
          "Testing aid: each KV pull waits this long after the source opened it, before reading");
ABSL_FLAG(int64_t, debug_fault_layer, -1,
          "Testing aid (CUDA backend): a data request at this layer launches a kernel that "
          "traps, giving the device a sticky error; -1 = never");
ABSL_FLAG(int64_t, worker_spin_us, -1,
          "How long each device worker polls for the next request before it sleeps (a request "
          "arriving in that window skips a thread wake-up); -1 = auto: 200 on the CUDA backend, "
          "0 on the CPU backend");
ABSL_FLAG(double, drain_timeout_s, 30.0,
          "On SIGTERM, how long in-flight calls may take before they are cancelled");

namespace attnd {
namespace {

template <typename T>
absl::StatusOr<std::vector<T>> ParseList(const std::string& flag, const std::string& text) {
  std::vector<T> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    T value;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(part), &value))
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, ": '", part, "' is not an integer"));
    out.push_back(value);
  }
  return out;
}

// --kv_cache_dtype and --kv_scales_file into the model shape (Validate() checks the pair).
absl::Status KvCacheFromFlags(ServerConfig* c) {
  const std::string kv = absl::AsciiStrToLower(absl::GetFlag(FLAGS_kv_cache_dtype));
  if (kv == "auto") c->model.kv_storage = kernels::KvStorage::kModelDType;
  else if (kv == "fp8" || kv == "fp8_e4m3") c->model.kv_storage = kernels::KvStorage::kFp8E4M3;
  else if (kv == "fp8_per_token" || kv == "fp8_e4m3_per_token")
    c->model.kv_storage = kernels::KvStorage::kFp8E4M3PerToken;
  else return absl::InvalidArgumentError(absl::StrCat(
      "--kv_cache_dtype=", kv, ": expected auto, fp8 (fp8_e4m3) or fp8_per_token"));
  c->kv_scales_file = absl::GetFlag(FLAGS_kv_scales_file);
  if (c->kv_scales_file.empty()) return absl::OkStatus();
  std::ifstream file(c->kv_scales_file);
  if (!file.is_open())
    return absl::InvalidArgumentError(
        absl::StrCat("--kv_scales_file=", c->kv_scales_file, ": cannot be opened"));
  std::stringstream text;
  text << file.rdbuf();
  if (file.bad())
    return absl::InvalidArgumentError(
        absl::StrCat("--kv_scales_file=", c->kv_scales_file, ": cannot be read"));
  auto scales = ParseKvScales(text.str());
  if (!scales.ok())
    return absl::InvalidArgumentError(absl::StrCat("--kv_scales_file=", c->kv_scales_file, ": ",
                                                   scales.status().message()));
  c->model.kv_scales = *std::move(scales);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ServerConfig> ConfigFromFlags() {
  ServerConfig c;
  const std::string backend = absl::AsciiStrToLower(absl::GetFlag(FLAGS_backend));
  if (backend == "auto") c.backend = BackendChoice::kAuto;
  else if (backend == "cpu") c.backend = BackendChoice::kCpu;
  else if (backend == "cuda") c.backend = BackendChoice::kCuda;
  else return absl::InvalidArgumentError(absl::StrCat("--backend=", backend, ": expected cpu, cuda or auto"));

  c.devices.clear();  // "all": empty; the platform fills it in
  if (absl::GetFlag(FLAGS_devices) != "all") {
    auto devices = ParseList<int>("devices", absl::GetFlag(FLAGS_devices));
    if (!devices.ok()) return devices.status();
    if (devices->empty())
      return absl::InvalidArgumentError("--devices must name at least one device, or be all");
    c.devices = *devices;
  }

  ModelShape& m = c.model;
  m.num_layers = absl::GetFlag(FLAGS_num_layers);
  m.num_qo_heads = absl::GetFlag(FLAGS_num_qo_heads);
  m.num_kv_heads = absl::GetFlag(FLAGS_num_kv_heads);
  m.head_dim = absl::GetFlag(FLAGS_head_dim);
  const std::string dtype = absl::AsciiStrToLower(absl::GetFlag(FLAGS_dtype));
  if (dtype == "bf16" || dtype == "bfloat16") m.dtype = kernels::DType::kBFloat16;
  else if (dtype == "fp16" || dtype == "float16") m.dtype = kernels::DType::kFloat16;
  else if (dtype == "fp32" || dtype == "float32") m.dtype = kernels::DType::kFloat32;
  else return absl::InvalidArgumentError(absl::StrCat("--dtype=", dtype, ": expected bf16, fp16 or fp32"));
  m.page_size = absl::GetFlag(FLAGS_page_size);
  if (absl::Status s = KvCacheFromFlags(&c); !s.ok()) return s;
  const std::string layout = absl::AsciiStrToUpper(absl::GetFlag(FLAGS_kv_layout));
  if (layout == "NHD") m.layout = kernels::KvLayout::kNHD;
  else if (layout == "HND") m.layout = kernels::KvLayout::kHND;
  else return absl::InvalidArgumentError(absl::StrCat("--kv_layout=", layout, ": expected NHD or HND"));
  m.sm_scale = static_cast<float>(absl::GetFlag(FLAGS_sm_scale));
  m.logits_soft_cap = static_cast<float>(absl::GetFlag(FLAGS_logits_soft_cap));
  m.window_left = absl::GetFlag(FLAGS_window_left);

  c.pages_per_device = absl::GetFlag(FLAGS_pages_per_device);
  c.memory_fraction = absl::GetFlag(FLAGS_memory_fraction);
  c.max_batch_size = absl::GetFlag(FLAGS_max_batch_size);
  c.max_seq_len = absl::GetFlag(FLAGS_max_seq_len);
  c.max_tokens_per_request = absl::GetFlag(FLAGS_max_tokens_per_request);
  auto buckets = ParseList<int64_t>("graph_buckets", absl::GetFlag(FLAGS_graph_buckets));
  if (!buckets.ok()) return buckets.status();
  c.graph_buckets = *buckets;
  c.unix_socket = absl::GetFlag(FLAGS_unix_socket);
  c.tcp_address = absl::GetFlag(FLAGS_tcp_address);
  c.tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  c.tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  c.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca_file);
  c.insecure_tcp = absl::GetFlag(FLAGS_insecure_tcp);
  c.token_file = absl::GetFlag(FLAGS_token_file);
  c.lease_timeout_s = absl::GetFlag(FLAGS_lease_timeout_s);
  c.max_sequences_per_client = absl::GetFlag(FLAGS_max_sequences_per_client);
  c.max_pages_per_client = absl::GetFlag(FLAGS_max_pages_per_client);
  c.max_regions_per_client = absl::GetFlag(FLAGS_max_regions_per_client);
  c.max_region_bytes_per_client = absl::GetFlag(FLAGS_max_region_bytes_per_client);
  c.max_events_per_client = absl::GetFlag(FLAGS_max_events_per_client);
  for (absl::string_view peer : absl::StrSplit(absl::GetFlag(FLAGS_kv_peers), ',',
                                               absl::SkipWhitespace()))
    c.kv_peers.emplace_back(absl::StripAsciiWhitespace(peer));
  for (absl::string_view setter : absl::StrSplit(absl::GetFlag(FLAGS_kv_scale_setters), ',',
                                                 absl::SkipWhitespace()))
    c.kv_scale_setters.emplace_back(absl::StripAsciiWhitespace(setter));
  for (absl::string_view source : absl::StrSplit(absl::GetFlag(FLAGS_kv_sources), ',',
                                                 absl::SkipWhitespace()))
    c.kv_sources.emplace_back(absl::StripAsciiWhitespace(source));
  c.kv_peer_token_file = absl::GetFlag(FLAGS_kv_peer_token_file);
  c.kv_peer_tls_ca_file = absl::GetFlag(FLAGS_kv_peer_tls_ca_file);
  c.max_concurrent_pulls = absl::GetFlag(FLAGS_max_concurrent_pulls);
  c.kv_same_node_ipc = absl::GetFlag(FLAGS_kv_same_node_ipc);
  c.kv_pull_timeout_s = absl::GetFlag(FLAGS_kv_pull_timeout_s);
  c.metrics_port = absl::GetFlag(FLAGS_metrics_port);
  c.metrics_bind = absl::GetFlag(FLAGS_metrics_bind);
  {
    const std::string mode = absl::GetFlag(FLAGS_unix_socket_mode);
    char* end = nullptr;
    const long bits = std::strtol(mode.c_str(), &end, 8);
    if (mode.empty() || end == nullptr || *end != '\0')
      return absl::InvalidArgumentError(
          absl::StrCat("--unix_socket_mode=", mode, ": not an octal number such as 0660"));
    c.unix_socket_mode = static_cast<int>(bits);
  }
  c.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  c.log_level = absl::GetFlag(FLAGS_log_level);
  c.drain_timeout_s = absl::GetFlag(FLAGS_drain_timeout_s);
  c.cpu_threads = absl::GetFlag(FLAGS_cpu_threads);
  c.cuda_workspace_mb = absl::GetFlag(FLAGS_cuda_workspace_mb);
  c.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  c.debug_fault_layer = absl::GetFlag(FLAGS_debug_fault_layer);
  c.debug_pull_pause_ms = absl::GetFlag(FLAGS_debug_pull_pause_ms);
  c.worker_spin_us = absl::GetFlag(FLAGS_worker_spin_us);
  if (absl::Status s = c.Validate(); !s.ok()) return s;
  return c;
}

}  // namespace attnd
