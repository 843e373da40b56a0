// Everything attnd is told at start-up: the model shape, the devices and their pools, where it
// listens. Filled from flags (server/flags.cc) and checked once by Validate().
#ifndef ATTND_SERVER_CONFIG_CONFIG_H_
#define ATTND_SERVER_CONFIG_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/paged_kv.h"

namespace attnd {

enum class BackendChoice { kAuto, kCpu, kCuda };

struct ModelShape {
  int64_t num_layers = 2;
  int64_t num_qo_heads = 8;
  int64_t num_kv_heads = 2;
  int64_t head_dim = 64;
  kernels::DType dtype = kernels::DType::kBFloat16;
  // fp8: K and V stored as e4m3 with per-layer scales (--kv_cache_dtype=fp8, --kv_scales_file)
  // or with a scale per token and kv head that append computes (--kv_cache_dtype=fp8_per_token).
  kernels::KvStorage kv_storage = kernels::KvStorage::kModelDType;
  // The per-layer scales every layer starts with (num_layers entries after Validate(); 1 and 1
  // unless a scales file says otherwise, and always for pools other than kFp8E4M3). SetKvScales
  // changes them later for layers that hold no KV.
  std::vector<kernels::KvScales> kv_scales;
  int64_t page_size = 16;
  kernels::KvLayout layout = kernels::KvLayout::kNHD;
  float sm_scale = 0.0f;  // 0: 1/sqrt(head_dim), resolved by Validate()
  float logits_soft_cap = 0.0f;
  int64_t window_left = -1;

  // Bytes of one page across all layers (K and V, and their per-token scales if any).
  int64_t PageBytes() const { return CacheShape(0).PageBytes(); }
  kernels::KvCacheShape CacheShape(int64_t num_pages) const;
  kernels::AttentionOptions Options() const;
};

struct ServerConfig {
  ModelShape model;
  BackendChoice backend = BackendChoice::kAuto;
  std::vector<int> devices = {0};  // empty (--devices=all): every device the platform sees
  int64_t pages_per_device = 0;   // 0: derived from memory_fraction
  double memory_fraction = 0.1;   // of free GPU memory (CUDA) or of physical RAM (CPU)
  int64_t max_batch_size = 256;
  int64_t max_seq_len = 131072;
  int64_t max_tokens_per_request = 65536;
  // Where model.kv_scales came from (--kv_scales_file; empty: every scale 1). Kept so that
  // Validate() can refuse a scales file an fp16/bf16 pool would silently ignore.
  std::string kv_scales_file;
  std::vector<int64_t> graph_buckets;  // empty: vLLM-like default up to max_batch_size
  std::string unix_socket = "/tmp/attnd.sock";  // empty: no Unix socket
  int unix_socket_mode = 0660;                  // permission bits of the socket file
  std::string tcp_address;                      // empty: no TCP listener
  // TLS on TCP through gRPC's own credentials: the server's certificate chain and key (PEM),
  // and, when set, the CA that client certificates must chain to (then required).
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  bool insecure_tcp = false;  // TCP without TLS is refused unless this is set
  // Bearer tokens, one "name token" per line: a call carrying `authorization: Bearer <token>`
  // acts as client `name`. When set, TCP calls without a valid token are refused.
  std::string token_file;
  // How long a client's resources outlive its last connection, Stream and call.
  double lease_timeout_s = 60.0;
  // Per client (a uid or a token name, with all its `attnd-client` instances); 0: no limit.
  int64_t max_sequences_per_client = 65536;
  int64_t max_pages_per_client = 0;
  int64_t max_regions_per_client = 1024;
  int64_t max_region_bytes_per_client = 0;
  int64_t max_events_per_client = 1024;
  // KV transfer between attnd processes (README "Across nodes").
  // Callers (principals: "uid:N", "token:NAME") allowed to open pulls of this server's grants:
  // they learn the UCX key of a whole pool, so only other attnd processes belong here.
  std::vector<std::string> kv_peers;
  // Callers ("uid:N", "token:NAME"; "*": any) that may change an fp8 pool's scales with
  // SetKvScales. Scales are every client's: one that set them badly would degrade the others'
  // KV, so by default nobody may (--kv_scales_file sets them at start).
  std::vector<std::string> kv_scale_setters;
  // gRPC targets this server may pull from ("*": any). A pull names its source, and this
  // server presents its token there: without a list, a client could send it anywhere.
  std::vector<std::string> kv_sources;
  // What this server presents to a source attnd when it pulls: a bearer token (the file's
  // first line) and, for TLS sources, the CA certificates to check them against.
  std::string kv_peer_token_file;
  std::string kv_peer_tls_ca_file;
  bool kv_same_node_ipc = true;  // CUDA pools on one node: map through CUDA IPC, copy by kernel
  int64_t max_concurrent_pulls = 4;  // pulls this server runs at once (more queue, up to 64)
  double kv_pull_timeout_s = 60.0;   // one pull, end to end
  int metrics_port = 9464;                      // 0: no /metrics
  std::string metrics_bind = "127.0.0.1";  // loopback: scrapers from elsewhere need it set
  // Largest request gRPC accepts; requests are control messages (tensors travel by region).
  int64_t max_message_bytes = 4 << 20;
  std::string log_level = "info";
  double drain_timeout_s = 30.0;
  int cpu_threads = 0;  // CPU backend threads per device; 0: all cores
  // How long a device worker polls for the next request before sleeping; -1: auto (CUDA
  // backend 200 us, CPU backend 0, whose cores are busy computing attention).
  int64_t worker_spin_us = -1;
  int64_t cuda_workspace_mb = 1024;
  bool cuda_graphs = true;
  int64_t debug_fault_layer = -1;  // testing aid: data requests at this layer fault the GPU
  int64_t debug_pull_pause_ms = 0;  // testing aid: a pull waits this long between open and read

  // Checks every field, resolves defaults (sm_scale, graph buckets). The message names the
  // flag and its limit.
  absl::Status Validate();
};

// The configuration after Validate(), one `--flag=value` line per flag (attnd --check_config
// prints it), so that an operator sees the defaults a flagfile left out, resolved (sm_scale,
// graph buckets, CPU threads).
std::string Describe(const ServerConfig& config);

// The text of a --kv_scales_file: one "k_scale v_scale" pair per line, '#' starting a comment,
// blank lines skipped. Returns the pairs in order (one: every layer's; else one per layer, which
// Validate() checks against num_layers). Messages name the line ("line 3: ...").
absl::StatusOr<std::vector<kernels::KvScales>> ParseKvScales(absl::string_view text);

// The --kv_cache_dtype value that selects `storage`: "auto", "fp8_e4m3" or "fp8_per_token".
const char* KvCacheDTypeFlagValue(kernels::KvStorage storage);

// 1, 2, 4, 8, 16, 24, 32, 40, ... (steps of 8) up to max_batch_size, like vLLM's capture sizes.
std::vector<int64_t> DefaultGraphBuckets(int64_t max_batch_size);

}  // namespace attnd

#endif  // ATTND_SERVER_CONFIG_CONFIG_H_
