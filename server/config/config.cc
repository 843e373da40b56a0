#include "server/config/config.h"

#include <algorithm>
#include <cmath>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace attnd {

kernels::KvCacheShape ModelShape::CacheShape(int64_t num_pages) const {
  kernels::KvCacheShape s;
  s.num_layers = num_layers;
  s.num_pages = num_pages;
  s.page_size = page_size;
  s.num_kv_heads = num_kv_heads;
  s.head_dim = head_dim;
  s.layout = layout;
  s.dtype = dtype;
  s.storage = kv_storage;
  return s;
}

kernels::AttentionOptions ModelShape::Options() const {
  kernels::AttentionOptions o;
  o.num_qo_heads = num_qo_heads;
  o.sm_scale = sm_scale;
  o.logits_soft_cap = logits_soft_cap;
  o.window_left = window_left;
  return o;
}

std::vector<int64_t> DefaultGraphBuckets(int64_t max_batch_size) {
  std::vector<int64_t> buckets;
  for (int64_t b : {1, 2, 4}) {
    if (b <= max_batch_size) buckets.push_back(b);
  }
  for (int64_t b = 8; b <= max_batch_size; b += 8) buckets.push_back(b);
  if (buckets.empty() || buckets.back() != max_batch_size) buckets.push_back(max_batch_size);
  return buckets;
}

namespace {

absl::Status OutOfRange(absl::string_view flag, int64_t value, absl::string_view limit) {
  return absl::InvalidArgumentError(
      absl::StrCat("--", flag, "=", value, " is out of range: ", limit));
}

bool GoodScale(float s) { return std::isfinite(s) && s > 0.0f; }

// The KV pool's storage and its scales: an fp8 pool is for 16-bit models, per-layer scales are
// only for fp8 pools with per-layer scales, and every layer ends up with a finite, positive pair
// (all 1 where the pool has no per-layer scales).
absl::Status ValidateKvCache(const std::string& scales_file, ModelShape& m) {
  using kernels::KvStorage;
  if (m.kv_storage != KvStorage::kModelDType && m.dtype == kernels::DType::kFloat32)
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv_cache_dtype=", KvCacheDTypeFlagValue(m.kv_storage),
        " needs --dtype=bf16 or fp16: fp8 KV halves the pool of a 16-bit model; an fp32 model "
        "would lose 20 mantissa bits for a quarter of the memory"));
  const bool all_ones = std::all_of(m.kv_scales.begin(), m.kv_scales.end(),
                                    [](kernels::KvScales s) { return s.k == 1.0f && s.v == 1.0f; });
  if (m.kv_storage == KvStorage::kModelDType && (!scales_file.empty() || !all_ones))
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv_scales_file=", scales_file,
        ": scales apply only to --kv_cache_dtype=fp8; this pool stores the model dtype and "
        "would ignore them"));
  if (m.kv_storage == KvStorage::kFp8E4M3PerToken && (!scales_file.empty() || !all_ones))
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv_scales_file=", scales_file,
        ": --kv_cache_dtype=fp8_per_token computes a scale for every token and kv head as it "
        "appends and takes no per-layer scales; use --kv_cache_dtype=fp8 for calibrated ones"));
  const size_t layers = static_cast<size_t>(m.num_layers);
  if (m.kv_scales.empty()) m.kv_scales.assign(layers, kernels::KvScales{});
  if (m.kv_scales.size() == 1) m.kv_scales.assign(layers, m.kv_scales.front());
  if (m.kv_scales.size() != layers)
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv_scales_file=", scales_file, ": ", m.kv_scales.size(), " scale lines for --num_layers=",
        m.num_layers, "; give one line (every layer) or one per layer"));
  for (size_t l = 0; l < layers; ++l) {
    const kernels::KvScales s = m.kv_scales[l];
    if (!GoodScale(s.k) || !GoodScale(s.v))
      return absl::InvalidArgumentError(absl::StrCat(
          "--kv_scales_file=", scales_file, ": layer ", l, ": ", GoodScale(s.k) ? "v" : "k",
          "_scale=", GoodScale(s.k) ? s.v : s.k, " must be finite and > 0"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<kernels::KvScales>> ParseKvScales(absl::string_view text) {
  std::vector<kernels::KvScales> scales;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = line.substr(0, line.find('#'));
    const std::vector<absl::string_view> words =
        absl::StrSplit(line, absl::ByAnyChar(" \t\r"), absl::SkipEmpty());
    if (words.empty()) continue;
    if (words.size() != 2)
      return absl::InvalidArgumentError(absl::StrCat(
          "line ", line_number, ": ", words.size(), " values; expected \"k_scale v_scale\""));
    kernels::KvScales s;
    if (!absl::SimpleAtof(words[0], &s.k) || !absl::SimpleAtof(words[1], &s.v))
      return absl::InvalidArgumentError(absl::StrCat(
          "line ", line_number, ": '", absl::StripAsciiWhitespace(line), "' is not two numbers"));
    if (!GoodScale(s.k) || !GoodScale(s.v))
      return absl::InvalidArgumentError(absl::StrCat(
          "line ", line_number, ": ", GoodScale(s.k) ? "v" : "k", "_scale=",
          GoodScale(s.k) ? words[1] : words[0], " must be finite and > 0"));
    scales.push_back(s);
  }
  if (scales.empty())
    return absl::InvalidArgumentError("no \"k_scale v_scale\" line in it");
  return scales;
}

absl::Status ServerConfig::Validate() {
  ModelShape& m = model;
  if (m.num_layers < 1 || m.num_layers > 1024) return OutOfRange("num_layers", m.num_layers, "1..1024");
  if (m.num_kv_heads < 1 || m.num_kv_heads > 1024)
    return OutOfRange("num_kv_heads", m.num_kv_heads, "1..1024");
  if (m.num_qo_heads < 1 || m.num_qo_heads % m.num_kv_heads != 0)
    return absl::InvalidArgumentError(absl::StrCat("--num_qo_heads=", m.num_qo_heads,
                                                   " must be a positive multiple of --num_kv_heads=",
                                                   m.num_kv_heads));
  if (m.head_dim < 1 || m.head_dim > 1024) return OutOfRange("head_dim", m.head_dim, "1..1024");
  if (m.page_size < 1 || m.page_size > 64) return OutOfRange("page_size", m.page_size, "1..64");
  if (m.window_left < -1) return OutOfRange("window_left", m.window_left, "-1 (off) or >= 0");
  if (!(m.logits_soft_cap >= 0.0f) || !std::isfinite(m.logits_soft_cap))
    return absl::InvalidArgumentError("--logits_soft_cap must be finite and >= 0 (0 = off)");
  if (!std::isfinite(m.sm_scale) || m.sm_scale < 0.0f)
    return absl::InvalidArgumentError("--sm_scale must be finite and >= 0 (0 = 1/sqrt(head_dim))");
  if (m.sm_scale == 0.0f) m.sm_scale = 1.0f / std::sqrt(static_cast<float>(m.head_dim));
  if (absl::Status s = ValidateKvCache(kv_scales_file, m); !s.ok()) return s;

  if (!devices.empty()) {  // empty: --devices=all, resolved by the platform
    std::vector<int> sorted = devices;
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
      return absl::InvalidArgumentError("--devices names a device twice");
    if (sorted.front() < 0) return absl::InvalidArgumentError("--devices: indices must be >= 0");
  }

  if (max_concurrent_pulls < 1 || max_concurrent_pulls > 64)
    return OutOfRange("max_concurrent_pulls", max_concurrent_pulls, "1..64");
  if (!(kv_pull_timeout_s > 0) || !std::isfinite(kv_pull_timeout_s))
    return absl::InvalidArgumentError("--kv_pull_timeout_s must be finite and > 0");
  if (pages_per_device < 0) return OutOfRange("pages_per_device", pages_per_device, ">= 0");
  if (pages_per_device > (int64_t{1} << 31) - 1)
    return OutOfRange("pages_per_device", pages_per_device, "< 2^31");
  if (pages_per_device == 0 && !(memory_fraction > 0.0 && memory_fraction <= 0.95))
    return absl::InvalidArgumentError("--memory_fraction must be in (0, 0.95]");
  if (max_batch_size < 1 || max_batch_size > 4096)
    return OutOfRange("max_batch_size", max_batch_size, "1..4096");
  if (max_seq_len < 1 || max_seq_len > (int64_t{1} << 30))
    return OutOfRange("max_seq_len", max_seq_len, "1..2^30");
  if (max_tokens_per_request < 1 || max_tokens_per_request > (int64_t{1} << 24))
    return OutOfRange("max_tokens_per_request", max_tokens_per_request, "1..2^24");

  if (graph_buckets.empty()) graph_buckets = DefaultGraphBuckets(max_batch_size);
  std::sort(graph_buckets.begin(), graph_buckets.end());
  graph_buckets.erase(std::unique(graph_buckets.begin(), graph_buckets.end()), graph_buckets.end());
  if (graph_buckets.front() < 1 || graph_buckets.back() > max_batch_size)
    return absl::InvalidArgumentError(
        absl::StrCat("--graph_buckets must lie in 1..--max_batch_size=", max_batch_size));

  if (unix_socket.empty() && tcp_address.empty())
    return absl::InvalidArgumentError("set --unix_socket or --tcp_address: attnd listens nowhere");
  static constexpr const char* kLogLevels[] = {"trace", "debug", "info", "warn", "error"};
  if (std::find(std::begin(kLogLevels), std::end(kLogLevels), log_level) == std::end(kLogLevels))
    return absl::InvalidArgumentError(absl::StrCat(
        "--log_level=", log_level, ": expected trace, debug, info, warn or error"));
  if (metrics_port < 0 || metrics_port > 65535) return OutOfRange("metrics_port", metrics_port, "0..65535");
  if (unix_socket_mode < 0 || unix_socket_mode > 0777)
    return OutOfRange("unix_socket_mode", unix_socket_mode, "permission bits 0..0777 (octal)");
  if (max_message_bytes < 4096 || max_message_bytes > (int64_t{1} << 30))
    return OutOfRange("max_message_bytes", max_message_bytes, "4096..1073741824");
  if (cuda_workspace_mb < 16 || cuda_workspace_mb > (int64_t{1} << 20))
    return OutOfRange("cuda_workspace_mb", cuda_workspace_mb, "16..2^20");
  if (cpu_threads < 0 || cpu_threads > 1024) return OutOfRange("cpu_threads", cpu_threads, "0..1024");
  if (cpu_threads == 0) cpu_threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  if (!(drain_timeout_s >= 0)) return absl::InvalidArgumentError("--drain_timeout_s must be >= 0");
  if (!tcp_address.empty() && !insecure_tcp && (tls_cert_file.empty() || tls_key_file.empty()))
    return absl::InvalidArgumentError(
        "--tcp_address needs TLS (--tls_cert_file and --tls_key_file), or --insecure_tcp to "
        "serve TCP in the clear");
  if (tls_cert_file.empty() != tls_key_file.empty())
    return absl::InvalidArgumentError("--tls_cert_file and --tls_key_file go together");
  if (!tls_client_ca_file.empty() && tls_cert_file.empty())
    return absl::InvalidArgumentError("--tls_client_ca_file needs --tls_cert_file and --tls_key_file");
  if (!(lease_timeout_s >= 0)) return absl::InvalidArgumentError("--lease_timeout_s must be >= 0");
  for (const auto& [flag, value] :
       {std::pair<const char*, int64_t>{"max_sequences_per_client", max_sequences_per_client},
        {"max_pages_per_client", max_pages_per_client},
        {"max_regions_per_client", max_regions_per_client},
        {"max_region_bytes_per_client", max_region_bytes_per_client},
        {"max_events_per_client", max_events_per_client}}) {
    if (value < 0) return OutOfRange(flag, value, ">= 0 (0: no limit)");
  }
  if (worker_spin_us < -1 || worker_spin_us > 1000000)
    return OutOfRange("worker_spin_us", worker_spin_us, "-1..1000000");
  return absl::OkStatus();
}

const char* KvCacheDTypeFlagValue(kernels::KvStorage storage) {
  switch (storage) {
    case kernels::KvStorage::kModelDType:
      return "auto";
    case kernels::KvStorage::kFp8E4M3:
      return "fp8_e4m3";
    case kernels::KvStorage::kFp8E4M3PerToken:
      return "fp8_per_token";
  }
  return "auto";
}

std::string Describe(const ServerConfig& c) {
  const ModelShape& m = c.model;
  const char* backend = c.backend == BackendChoice::kCpu    ? "cpu"
                        : c.backend == BackendChoice::kCuda ? "cuda"
                                                            : "auto";
  const char* dtype = m.dtype == kernels::DType::kBFloat16  ? "bf16"
                      : m.dtype == kernels::DType::kFloat16 ? "fp16"
                                                            : "fp32";
  return absl::StrCat(
      "--backend=", backend, "\n--devices=", c.devices.empty() ? "all" : absl::StrJoin(c.devices, ","),
      "\n--num_layers=", m.num_layers, "\n--num_qo_heads=", m.num_qo_heads,
      "\n--num_kv_heads=", m.num_kv_heads, "\n--head_dim=", m.head_dim, "\n--dtype=", dtype,
      "\n--page_size=", m.page_size,
      "\n--kv_cache_dtype=", KvCacheDTypeFlagValue(m.kv_storage),
      "\n--kv_scales_file=", c.kv_scales_file,
      "\n--kv_layout=", m.layout == kernels::KvLayout::kNHD ? "NHD" : "HND",
      "\n--sm_scale=", m.sm_scale, "\n--logits_soft_cap=", m.logits_soft_cap,
      "\n--window_left=", m.window_left, "\n--pages_per_device=", c.pages_per_device,
      "\n--memory_fraction=", c.memory_fraction, "\n--max_batch_size=", c.max_batch_size,
      "\n--max_seq_len=", c.max_seq_len, "\n--max_tokens_per_request=", c.max_tokens_per_request,
      "\n--graph_buckets=", absl::StrJoin(c.graph_buckets, ","),
      "\n--unix_socket=", c.unix_socket, "\n--unix_socket_mode=", absl::StrFormat("%04o", c.unix_socket_mode),
      "\n--tcp_address=", c.tcp_address,
      "\n--tls_cert_file=", c.tls_cert_file, "\n--tls_key_file=", c.tls_key_file,
      "\n--tls_client_ca_file=", c.tls_client_ca_file,
      "\n--insecure_tcp=", c.insecure_tcp ? "true" : "false",
      "\n--token_file=", c.token_file, "\n--lease_timeout_s=", c.lease_timeout_s,
      "\n--metrics_port=", c.metrics_port, "\n--metrics_bind=", c.metrics_bind,
      "\n--max_message_bytes=", c.max_message_bytes,
      "\n--max_sequences_per_client=", c.max_sequences_per_client,
      "\n--max_pages_per_client=", c.max_pages_per_client,
      "\n--max_regions_per_client=", c.max_regions_per_client,
      "\n--max_region_bytes_per_client=", c.max_region_bytes_per_client,
      "\n--max_events_per_client=", c.max_events_per_client,
      absl::StrCat("\n--cpu_threads=", c.cpu_threads, "\n--worker_spin_us=", c.worker_spin_us,
                   "\n--cuda_workspace_mb=", c.cuda_workspace_mb,
                   "\n--cuda_graphs=", c.cuda_graphs ? "true" : "false",
                   "\n--debug_fault_layer=", c.debug_fault_layer,
                   "\n--debug_pull_pause_ms=", c.debug_pull_pause_ms),
      absl::StrCat("\n--kv_peers=", absl::StrJoin(c.kv_peers, ","),
                   "\n--kv_scale_setters=", absl::StrJoin(c.kv_scale_setters, ","),
                   "\n--kv_sources=", absl::StrJoin(c.kv_sources, ","),
                   "\n--kv_peer_token_file=", c.kv_peer_token_file,
                   "\n--kv_peer_tls_ca_file=", c.kv_peer_tls_ca_file,
                   "\n--max_concurrent_pulls=", c.max_concurrent_pulls,
                   "\n--kv_same_node_ipc=", c.kv_same_node_ipc ? "true" : "false",
                   "\n--kv_pull_timeout_s=", c.kv_pull_timeout_s),
      "\n--drain_timeout_s=", c.drain_timeout_s, "\n--log_level=", c.log_level, "\n");
}

}  // namespace attnd
