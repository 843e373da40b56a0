#include "server/metrics/metrics.h"

#include <cmath>
#include <exception>

#include "absl/strings/str_cat.h"

namespace attnd {
namespace {

std::string CodeName(absl::StatusCode code) {
  std::string name = absl::StatusCodeToString(code);
  return name.empty() ? absl::StrCat(static_cast<int>(code)) : name;
}

prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  // 10 us .. ~20 s, x2 per bucket.
  prometheus::Histogram::BucketBoundaries b;
  for (double s = 10e-6; s < 30.0; s *= 2) b.push_back(s);
  return b;
}

// Stages are mostly tens of microseconds and the question is where a few of them go: 1 us to
// 1 ms in steps of 2^(1/4) (about 19%, so a median interpolated inside its bucket is off by
// well under a tenth), then x2 up to ~8 s for device time and long prefills.
prometheus::Histogram::BucketBoundaries StageBuckets() {
  prometheus::Histogram::BucketBoundaries b;
  for (int k = 0; k <= 40; ++k) b.push_back(1e-6 * std::exp2(k / 4.0));
  for (double s = 2 * b.back(); s < 10.0; s *= 2) b.push_back(s);
  return b;
}

prometheus::Histogram::BucketBoundaries BatchBuckets() {
  return {1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096};
}

}  // namespace

Metrics::Metrics(const std::vector<int>& devices)
    : start_(std::chrono::steady_clock::now()),
      registry_(std::make_shared<prometheus::Registry>()),
      requests_(prometheus::BuildCounter()
                    .Name("attnd_requests_total")
                    .Help("RPCs handled, by method and gRPC status code")
                    .Register(*registry_)),
      latency_(prometheus::BuildHistogram()
                   .Name("attnd_request_duration_seconds")
                   .Help("Time from receiving an RPC to its reply, by method and gRPC status code")
                   .Register(*registry_)),
      batch_size_(prometheus::BuildHistogram()
                      .Name("attnd_batch_size")
                      .Help("Sequences per data request, by method")
                      .Register(*registry_)),
      device_ids_(devices),
      decode_launches_(prometheus::BuildCounter()
                           .Name("attnd_decode_launches_total")
                           .Help("CUDA Decode calls by device and path: a graph replay of a "
                                 "batch bucket, or eager launches")
                           .Register(*registry_)),
      stages_(prometheus::BuildHistogram()
                  .Name("attnd_request_stage_seconds")
                  .Help("Where a data request's time goes inside attnd, by method and stage: "
                        "validate, queue (waking the device worker), host (bookkeeping, "
                        "planning, launches), device (waiting for the GPU), reply, write "
                        "(Stream), total (receipt to reply)")
                  .Register(*registry_)) {
  clients_ = &prometheus::BuildGauge()
                  .Name("attnd_clients")
                  .Help("Clients known to the server (a uid or token, and its attnd-client name)")
                  .Register(*registry_)
                  .Add({});
  leases_expired_ = &prometheus::BuildCounter()
                         .Name("attnd_leases_expired_total")
                         .Help("Client leases that ran out; what the client held was released")
                         .Register(*registry_)
                         .Add({});
  auto& pages_used = prometheus::BuildGauge()
                         .Name("attnd_pages_used")
                         .Help("KV pages owned by sequences, per device")
                         .Register(*registry_);
  auto& pages_total = prometheus::BuildGauge()
                          .Name("attnd_pages_total")
                          .Help("KV pages in the pool, per device")
                          .Register(*registry_);
  auto& live = prometheus::BuildGauge()
                   .Name("attnd_live_sequences")
                   .Help("Sequences that exist, per device")
                   .Register(*registry_);
  auto& serving = prometheus::BuildGauge()
                      .Name("attnd_device_serving")
                      .Help("1 while the device takes work, 0 after a fault")
                      .Register(*registry_);
  auto& tokens = prometheus::BuildCounter()
                     .Name("attnd_tokens_appended_total")
                     .Help("K/V tokens written into the pool (each layer counts), per device")
                     .Register(*registry_);
  auto& queries = prometheus::BuildCounter()
                      .Name("attnd_attention_queries_total")
                      .Help("Query tokens attended (each layer counts), per device")
                      .Register(*registry_);
  for (int d : devices) {
    const prometheus::Labels labels{{"device", absl::StrCat(d)}};
    devices_.push_back({&pages_used.Add(labels), &pages_total.Add(labels), &live.Add(labels),
                        &serving.Add(labels), &tokens.Add(labels), &queries.Add(labels)});
    devices_.back().serving->Set(1);
  }
}

Metrics::~Metrics() = default;

absl::Status Metrics::StartExposer(const std::string& bind, int port) {
  if (port == 0) return absl::OkStatus();
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(absl::StrCat(bind, ":", port));
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("--metrics_port=", port, ": cannot listen on ", bind, ": ", e.what()));
  }
  exposer_->RegisterCollectable(registry_);
  return absl::OkStatus();
}

void Metrics::StopExposer() { exposer_.reset(); }

void Metrics::RecordRpc(absl::string_view rpc, absl::StatusCode code, double seconds) {
  prometheus::Counter* counter;
  prometheus::Histogram* histogram;
  {
    absl::MutexLock lock(&mu_);
    const std::string code_name = CodeName(code);
    const std::string key = absl::StrCat(rpc, "/", code_name);
    auto& c = request_counters_[key];
    auto& h = latency_histograms_[key];
    if (c == nullptr || h == nullptr) {  // first call of this (rpc, code): build the labels once
      const prometheus::Labels labels{{"rpc", std::string(rpc)}, {"code", code_name}};
      if (c == nullptr) c = &requests_.Add(labels);
      if (h == nullptr) h = &latency_.Add(labels, LatencyBuckets());
    }
    counter = c;
    histogram = h;
  }
  counter->Increment();
  histogram->Observe(seconds);
}

void Metrics::RecordStages(absl::string_view rpc, const RequestTrace& trace) {
  const std::array<double, kNumStages> seconds = StageSeconds(trace);
  if (seconds[static_cast<int>(Stage::kQueue)] < 0) return;  // never reached a worker
  std::array<prometheus::Histogram*, kNumStages> histograms;
  {
    absl::MutexLock lock(&mu_);
    auto [it, inserted] = stage_histograms_.try_emplace(rpc);
    if (inserted) {
      for (int i = 0; i < kNumStages; ++i)
        it->second[i] = &stages_.Add(
            {{"rpc", std::string(rpc)}, {"stage", StageName(static_cast<Stage>(i))}},
            StageBuckets());
    }
    histograms = it->second;
  }
  for (int i = 0; i < kNumStages; ++i) {
    if (seconds[i] >= 0) histograms[i]->Observe(seconds[i]);
  }
}

void Metrics::RecordBatch(absl::string_view rpc, int64_t items) {
  prometheus::Histogram* histogram;
  {
    absl::MutexLock lock(&mu_);
    auto& h = batch_histograms_[rpc];
    if (h == nullptr) h = &batch_size_.Add({{"rpc", std::string(rpc)}}, BatchBuckets());
    histogram = h;
  }
  histogram->Observe(static_cast<double>(items));
}

void Metrics::SetPages(int i, int64_t used, int64_t total) {
  devices_[i].pages_used->Set(static_cast<double>(used));
  devices_[i].pages_total->Set(static_cast<double>(total));
}

void Metrics::SetLiveSequences(int i, int64_t n) {
  devices_[i].live_sequences->Set(static_cast<double>(n));
}

void Metrics::AddTokens(int i, int64_t appended, int64_t queries) {
  if (appended > 0) devices_[i].tokens_appended->Increment(static_cast<double>(appended));
  if (queries > 0) devices_[i].attention_queries->Increment(static_cast<double>(queries));
}

void Metrics::SetServing(int i, bool serving) { devices_[i].serving->Set(serving ? 1 : 0); }

void Metrics::RecordDecodeLaunch(int i, int bucket) {
  prometheus::Counter* counter;
  {
    absl::MutexLock lock(&mu_);
    auto& c = launch_counters_[absl::StrCat(i, "/", bucket)];
    if (c == nullptr)
      c = &decode_launches_.Add({{"device", absl::StrCat(device_ids_[static_cast<size_t>(i)])},
                                 {"path", bucket > 0 ? "graph" : "eager"},
                                 {"bucket", bucket > 0 ? absl::StrCat(bucket) : "none"}});
    counter = c;
  }
  counter->Increment();
}

StatsSnapshot Metrics::Snapshot() const {
  StatsSnapshot stats;
  stats.uptime_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  // Counts come from the counters, total time from the histograms' sums.
  for (const prometheus::MetricFamily& family : registry_->Collect()) {
    if (family.name != "attnd_requests_total") continue;
    for (const prometheus::ClientMetric& m : family.metric) {
      StatsSnapshot::Rpc r;
      for (const prometheus::ClientMetric::Label& l : m.label) {
        if (l.name == "rpc") r.rpc = l.value;
        if (l.name == "code") r.code = l.value;
      }
      r.count = static_cast<uint64_t>(m.counter.value);
      stats.rpcs.push_back(std::move(r));
    }
  }
  {
    absl::MutexLock lock(&mu_);
    for (StatsSnapshot::Rpc& r : stats.rpcs) {
      auto it = latency_histograms_.find(absl::StrCat(r.rpc, "/", r.code));
      if (it != latency_histograms_.end())
        r.total_seconds = it->second->Collect().histogram.sample_sum;
    }
  }
  for (size_t i = 0; i < devices_.size(); ++i) {
    StatsSnapshot::Device d;
    d.device = device_ids_[i];
    d.total_pages = static_cast<uint64_t>(devices_[i].pages_total->Value());
    d.used_pages = static_cast<uint64_t>(devices_[i].pages_used->Value());
    d.live_sequences = static_cast<uint64_t>(devices_[i].live_sequences->Value());
    d.tokens_appended = static_cast<uint64_t>(devices_[i].tokens_appended->Value());
    d.attention_queries = static_cast<uint64_t>(devices_[i].attention_queries->Value());
    stats.devices.push_back(d);
  }
  return stats;
}

}  // namespace attnd
