// Prometheus metrics of the server, served on /metrics, and the same numbers for GetStats.
#ifndef ATTND_SERVER_METRICS_METRICS_H_
#define ATTND_SERVER_METRICS_METRICS_H_

#include <array>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "prometheus/counter.h"
#include "prometheus/exposer.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "server/metrics/request_trace.h"

namespace attnd {

// What GetStats reports: the counters, summed per RPC and per device.
struct StatsSnapshot {
  struct Rpc {
    std::string rpc, code;
    uint64_t count = 0;
    double total_seconds = 0;
  };
  struct Device {
    int device = 0;
    uint64_t total_pages = 0, used_pages = 0, live_sequences = 0;
    uint64_t tokens_appended = 0, attention_queries = 0;
  };
  double uptime_seconds = 0;
  std::vector<Rpc> rpcs;
  std::vector<Device> devices;
};

class Metrics {
 public:
  explicit Metrics(const std::vector<int>& devices);
  ~Metrics();

  // Serves /metrics on bind:port (port 0: not at all).
  absl::Status StartExposer(const std::string& bind, int port);
  // Stops serving /metrics; blocks up to ~2 s (civetweb notices its stop flag between 2 s
  // polls). Not concurrent with StartExposer.
  void StopExposer();

  void RecordRpc(absl::string_view rpc, absl::StatusCode code, double seconds);
  // The stages of one data request that reached a device worker, whatever its outcome
  // (attnd_request_stage_seconds{rpc,stage}); stages the trace lacks are skipped.
  void RecordStages(absl::string_view rpc, const RequestTrace& trace);
  void RecordBatch(absl::string_view rpc, int64_t items);
  void SetPages(int device_index, int64_t used, int64_t total);
  void SetLiveSequences(int device_index, int64_t n);
  void AddTokens(int device_index, int64_t appended, int64_t queries);
  void SetServing(int device_index, bool serving);
  // A Decode on the CUDA backend: replayed through the graph of `bucket`, or (bucket 0)
  // launched eagerly.
  void RecordDecodeLaunch(int device_index, int bucket);
  // Leases: clients known now, and leases that ran out (their holdings released).
  void SetClients(int64_t n) { clients_->Set(static_cast<double>(n)); }
  void RecordLeaseExpired() { leases_expired_->Increment(); }

  StatsSnapshot Snapshot() const;
  prometheus::Registry& registry() { return *registry_; }

 private:
  struct DeviceMetrics {
    prometheus::Gauge* pages_used;
    prometheus::Gauge* pages_total;
    prometheus::Gauge* live_sequences;
    prometheus::Gauge* serving;
    prometheus::Counter* tokens_appended;
    prometheus::Counter* attention_queries;
  };

  std::chrono::steady_clock::time_point start_;
  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& latency_;
  prometheus::Family<prometheus::Histogram>& batch_size_;
  std::vector<int> device_ids_;
  std::vector<DeviceMetrics> devices_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  prometheus::Gauge* clients_;
  prometheus::Counter* leases_expired_;

  // Per-label lookups are cached: prometheus-cpp's Family::Add hashes the label map each time.
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, prometheus::Counter*> request_counters_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, prometheus::Histogram*> latency_histograms_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, prometheus::Histogram*> batch_histograms_ ABSL_GUARDED_BY(mu_);
  prometheus::Family<prometheus::Counter>& decode_launches_;
  absl::flat_hash_map<std::string, prometheus::Counter*> launch_counters_ ABSL_GUARDED_BY(mu_);
  prometheus::Family<prometheus::Histogram>& stages_;
  absl::flat_hash_map<std::string, std::array<prometheus::Histogram*, kNumStages>> stage_histograms_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace attnd

#endif  // ATTND_SERVER_METRICS_METRICS_H_
