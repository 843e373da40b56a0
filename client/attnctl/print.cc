#include "client/attnctl/print.h"

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/describe.h"
#include "client/tensor.h"

namespace attnd::attnctl {
namespace {

std::string BackendName(v1::BackendKind backend) {
  switch (backend) {
    case v1::BACKEND_CPU:
      return "cpu";
    case v1::BACKEND_CUDA:
      return "cuda";
    default:
      return "unspecified";
  }
}

std::string Bytes(uint64_t bytes) {
  if (bytes >= (uint64_t{1} << 30)) return absl::StrFormat("%.2f GiB", bytes / 1073741824.0);
  if (bytes >= (uint64_t{1} << 20)) return absl::StrFormat("%.2f MiB", bytes / 1048576.0);
  if (bytes >= (uint64_t{1} << 10)) return absl::StrFormat("%.2f KiB", bytes / 1024.0);
  return absl::StrCat(bytes, " B");
}

std::string Percent(uint64_t part, uint64_t whole) {
  return whole == 0 ? "-" : absl::StrFormat("%.1f%%", 100.0 * part / whole);
}

}  // namespace

std::string FormatServerInfo(const v1::ServerInfo& info) {
  std::string out;
  absl::StrAppend(&out, "attnd ", info.version(), ", backend ", BackendName(info.backend()), "\n");
  absl::StrAppend(&out, "model:    ", client::DescribeModel(info.model()), "\n");
  absl::StrAppend(&out, "limits:   max_batch_size=", info.max_batch_size(),
                  " max_seq_len=", info.max_seq_len(),
                  " max_tokens_per_request=", info.max_tokens_per_request(), "\n");
  absl::StrAppend(&out, "buckets:  ",
                  info.graph_buckets().empty() ? "none" : absl::StrJoin(info.graph_buckets(), " "),
                  "\n");
  absl::StrAppend(&out, "features: ",
                  info.features().empty() ? "none" : absl::StrJoin(info.features(), " "), "\n");
  for (const v1::DeviceInfo& device : info.devices()) {
    const uint64_t used =
        device.total_pages() - std::min(device.free_pages(), device.total_pages());
    absl::StrAppend(
        &out, absl::StrFormat(
                  "device %d (%s): %s, pages used %d/%d (%s), free %d, pool %s, "
                  "live sequences %d\n",
                  device.device(), device.name(), device.serving() ? "serving" : "NOT SERVING",
                  used, device.total_pages(), Percent(used, device.total_pages()),
                  device.free_pages(), Bytes(device.pool_bytes()), device.live_sequences()));
    // fp8 pools with per-layer scales: each layer's dequantization scales (a per-token pool has
    // none: kv_cache=fp8_per_token in the model line says so).
    if (device.k_scales_size() > 0)
      absl::StrAppend(&out, "  k_scales: ", absl::StrJoin(device.k_scales(), " "),
                      "\n  v_scales: ", absl::StrJoin(device.v_scales(), " "), "\n");
  }
  return out;
}

std::string FormatStats(const v1::Stats& stats) {
  std::string out = absl::StrFormat("uptime %.1f s\n", stats.uptime_seconds());
  absl::StrAppend(
      &out, absl::StrFormat("%-20s %-20s %10s %14s\n", "rpc", "code", "count", "mean latency"));
  std::vector<const v1::RpcStats*> rows;
  for (const v1::RpcStats& row : stats.rpcs()) rows.push_back(&row);
  std::sort(rows.begin(), rows.end(), [](const v1::RpcStats* a, const v1::RpcStats* b) {
    return std::tie(a->rpc(), a->code()) < std::tie(b->rpc(), b->code());
  });
  for (const v1::RpcStats* row : rows) {
    const double mean_us = row->count() == 0 ? 0 : 1e6 * row->total_seconds() / row->count();
    absl::StrAppend(&out, absl::StrFormat("%-20s %-20s %10d %11.1f us\n", row->rpc(), row->code(),
                                          row->count(), mean_us));
  }
  if (rows.empty()) absl::StrAppend(&out, "(no calls yet)\n");
  for (const v1::DeviceStats& device : stats.devices()) {
    absl::StrAppend(
        &out,
        absl::StrFormat("device %d: pages used %d/%d (%s), live sequences %d, "
                        "tokens appended %d, attention queries %d\n",
                        device.device(), device.used_pages(), device.total_pages(),
                        Percent(device.used_pages(), device.total_pages()), device.live_sequences(),
                        device.tokens_appended(), device.attention_queries()));
  }
  return out;
}

}  // namespace attnd::attnctl
