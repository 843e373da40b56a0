#include "client/attnctl/demo.h"

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/random/distributions.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/attnctl/print.h"
#include "client/reference.h"
#include "client/shm_buffer.h"
#include "client/tensor.h"

namespace attnd::attnctl {
namespace {

using client::DataStream;

using Clock = std::chrono::steady_clock;

// The shm object's name, for the signal handler: an interrupted demo must not leave its
// memory behind in /dev/shm (the RAII owner never runs when a signal kills the process).
char g_shm_key[256] = {0};

void UnlinkAndReraise(int sig) {
  if (g_shm_key[0] != '\0') shm_unlink(g_shm_key);
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string Micros(double seconds) { return absl::StrFormat("%.0f us", seconds * 1e6); }

// Latencies of one kind of call, for percentiles.
class Latencies {
 public:
  void Add(double seconds) {
    samples_.push_back(seconds);
    total_ += seconds;
  }
  size_t count() const { return samples_.size(); }
  double total() const { return total_; }

  // Nearest-rank percentile, p in [0, 100].
  double Percentile(double p) const {
    if (samples_.empty()) return 0;
    std::vector<double> sorted = samples_;
    std::sort(sorted.begin(), sorted.end());
    const size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * sorted.size()));
    return sorted[std::min(sorted.size() - 1, rank == 0 ? 0 : rank - 1)];
  }

  std::string Summary() const {
    if (samples_.empty()) return "no calls";
    return absl::StrFormat("n=%d  p50 %s  p90 %s  p99 %s  mean %s", count(), Micros(Percentile(50)),
                           Micros(Percentile(90)), Micros(Percentile(99)),
                           Micros(total_ / count()));
  }

 private:
  std::vector<double> samples_;
  double total_ = 0;
};

// The client's copy of one server sequence: its length per layer and, for the layers it
// checks, every token's K and V exactly as sent (dtype-rounded), [len][kv_heads][head_dim].
struct Sequence {
  uint64_t id = 0;
  int64_t prompt_len = 0;
  int64_t prompt_sent = 0;  // prompt tokens already sent
  bool imported = false;    // prompt KV written with Append only
  std::vector<int64_t> len;
  std::vector<bool> tracked;  // per layer: k/v kept (the benchmark keeps layer 0 only)
  std::vector<std::vector<float>> k, v;

  int64_t MaxLen() const { return *std::max_element(len.begin(), len.end()); }
};

using Items = std::vector<std::pair<Sequence*, int64_t>>;  // (sequence, new tokens)

int64_t TotalTokens(const Items& items) {
  int64_t total = 0;
  for (const auto& [seq, n] : items) total += n;
  return total;
}

// Byte offsets of one set of data-call buffers in the region, each with room for `tokens`
// rows.
struct Slot {
  uint64_t q = 0, k = 0, v = 0, out = 0, lse = 0;
  int64_t tokens = 0;
};

enum class Op { kPrefill, kDecode };
enum class Transport { kUnary, kStream };

const char* OpName(Op op) { return op == Op::kPrefill ? "Prefill" : "Decode"; }

class Demo {
 public:
  Demo(client::Client& client, const DemoOptions& options) : client_(client), options_(options) {}

  int Run();

 private:
  // ---- phases ----
  absl::Status Setup();
  absl::Status CreateSequences();
  absl::Status PrefillPrompts();
  absl::Status ImportPrompt(Sequence& seq);
  absl::Status DecodeSteps();
  absl::Status ForkOne(int step);
  absl::Status TruncateOne(Sequence& seq, int64_t target, const std::string& why);
  absl::Status CheckServerLengths(const std::vector<std::unique_ptr<Sequence>>& seqs);
  absl::Status ReleaseAll(std::vector<std::unique_ptr<Sequence>>& seqs);
  absl::Status Bench();
  void Cleanup();
  void PrintSummary();

  // ---- calls ----
  // One Prefill or Decode with fresh random q/k/v, every output checked.
  absl::Status FreshAttention(Op op, Transport transport, uint32_t layer, const Items& items,
                              bool want_lse);
  // One Append with fresh random k/v; with fresh == false it resends what the buffers hold
  // (the benchmark fills layers it does not check that way: no time spent on random numbers).
  absl::Status FreshAppend(uint32_t layer, const Items& items, bool fresh = true);

  v1::AttentionRequest BuildAttention(uint32_t layer, const Items& items, const Slot& slot,
                                      bool want_lse) const;
  absl::StatusOr<v1::AttentionResponse> Call(Op op, Transport transport,
                                             const v1::AttentionRequest& request,
                                             Latencies* latencies);
  // Checks the response's lengths against the client's copies plus the new tokens, then
  // adds the new rows (k, v: [tokens][kv_heads][head_dim]) to the copies.
  absl::Status Advance(const std::string& label, uint32_t layer, const Items& items,
                       const google::protobuf::RepeatedField<uint64_t>& lengths, const float* k,
                       const float* v);
  // Compares out (and lse) in `slot` with the reference; records a failure on mismatch.
  void Verify(const std::string& label, Op op, uint32_t layer, const Items& items, const float* q,
              const Slot& slot, bool want_lse);

  // ---- helpers ----
  std::vector<float> RandomRounded(size_t n);
  void Write(uint64_t offset, const std::vector<float>& values);
  void Poison(const Slot& slot, int64_t tokens);
  Sequence* NewSequence(uint64_t id);
  void Fail(std::string what);

  client::Client& client_;
  DemoOptions options_;
  std::mt19937_64 rng_;

  v1::ServerInfo info_;
  v1::ModelConfig model_;
  client::AttentionParams params_;
  v1::DType dtype_ = v1::DTYPE_UNSPECIFIED;
  int64_t layers_ = 0, qo_heads_ = 0, kv_heads_ = 0, head_dim_ = 0, page_size_ = 0;
  int64_t max_batch_ = 0;   // most items per request
  int64_t max_tokens_ = 0;  // most new tokens per request
  double tolerance_ = 0, lse_tolerance_ = 0;
  uint64_t pages_free_at_start_ = 0, live_at_start_ = 0;

  std::unique_ptr<client::SharedMemoryBuffer> shm_;
  std::string region_;
  bool region_registered_ = false;
  Slot main_slot_;                 // demo calls
  std::vector<Slot> bench_slots_;  // benchmark: shared q/k/v, one out/lse per pipelined call
  std::unique_ptr<DataStream> stream_;

  uint64_t next_id_ = 0;
  std::vector<std::unique_ptr<Sequence>> seqs_;        // the demo's live sequences
  std::vector<std::unique_ptr<Sequence>> bench_seqs_;  // the benchmark's
  std::set<uint64_t> live_ids_;                        // on the server, to release at the end

  // Accounting.
  int64_t calls_ = 0, tokens_ = 0;
  Latencies prefill_lat_, decode_unary_lat_, decode_stream_lat_, append_lat_;
  double max_err_[2] = {0, 0};  // by Op
  double max_lse_err_ = 0;
  int64_t outputs_checked_ = 0, lse_checked_ = 0;
  std::vector<std::string> failures_;
  std::string bench_report_;
  bool summary_printed_ = false;
};

// ---------------------------------------------------------------------------------------------

void Demo::Fail(std::string what) {
  // The first failures say what is wrong; hundreds more of the same would bury them.
  constexpr size_t kPrinted = 20;
  if (failures_.size() < kPrinted) {
    absl::PrintF("CHECK FAILED: %s\n", what);
  } else if (failures_.size() == kPrinted) {
    absl::PrintF("CHECK FAILED: (more failures; only the first %d are printed)\n", kPrinted);
  }
  std::fflush(stdout);
  failures_.push_back(std::move(what));
}

std::vector<float> Demo::RandomRounded(size_t n) {
  std::vector<float> values(n);
  for (float& x : values) x = client::RoundToDType(dtype_, absl::Gaussian<float>(rng_, 0, 1));
  return values;
}

void Demo::Write(uint64_t offset, const std::vector<float>& values) {
  client::EncodeFloats(dtype_, values, static_cast<char*>(shm_->data()) + offset);
}

void Demo::Poison(const Slot& slot, int64_t tokens) {
  // All-ones bytes are a NaN in fp32, fp16 and bf16 alike: an output the server skips cannot
  // pass the check by accident.
  char* base = static_cast<char*>(shm_->data());
  std::memset(base + slot.out, 0xff, tokens * qo_heads_ * head_dim_ * client::DTypeSize(dtype_));
  std::memset(base + slot.lse, 0xff, tokens * qo_heads_ * sizeof(float));
}

Sequence* Demo::NewSequence(uint64_t id) {
  auto seq = std::make_unique<Sequence>();
  seq->id = id;
  seq->len.assign(layers_, 0);
  seq->tracked.assign(layers_, true);
  seq->k.resize(layers_);
  seq->v.resize(layers_);
  Sequence* raw = seq.get();
  seqs_.push_back(std::move(seq));
  return raw;
}

// ---- setup -----------------------------------------------------------------------------------

absl::Status Demo::Setup() {
  absl::StatusOr<v1::ServerInfo> info = client_.GetServerInfo();
  if (!info.ok())
    return absl::Status(info.status().code(), "GetServerInfo: " + info.status().ToString());
  info_ = *std::move(info);
  model_ = info_.model();
  absl::PrintF("server: attnd %s at %s\n", info_.version().c_str(), client_.target().c_str());
  absl::PrintF("model:  %s\n", FormatModel(model_).c_str());

  dtype_ = model_.dtype();
  layers_ = model_.num_layers();
  qo_heads_ = model_.num_qo_heads();
  kv_heads_ = model_.num_kv_heads();
  head_dim_ = model_.head_dim();
  page_size_ = model_.page_size();
  if (client::DTypeSize(dtype_) == 0 || layers_ == 0 || qo_heads_ == 0 || kv_heads_ == 0 ||
      head_dim_ == 0 || page_size_ == 0 || qo_heads_ % kv_heads_ != 0) {
    return absl::FailedPreconditionError("ServerInfo.model is incomplete or inconsistent: " +
                                         FormatModel(model_));
  }
  params_ = client::ParamsFromModel(model_);
  switch (dtype_) {
    case v1::DTYPE_FLOAT32:
      tolerance_ = 1e-4;
      lse_tolerance_ = 1e-3;
      break;
    case v1::DTYPE_FLOAT16:
      tolerance_ = 2e-3;
      lse_tolerance_ = 5e-3;
      break;
    default:
      tolerance_ = 1e-2;
      lse_tolerance_ = 1e-2;
      break;
  }
  max_batch_ = info_.max_batch_size() > 0 ? info_.max_batch_size() : int64_t{1} << 30;
  max_tokens_ =
      info_.max_tokens_per_request() > 0 ? info_.max_tokens_per_request() : int64_t{1} << 30;

  const v1::DeviceInfo* device = nullptr;
  for (const v1::DeviceInfo& d : info_.devices()) {
    if (d.device() == options_.device) device = &d;
  }
  if (device == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("the server has no device ", options_.device));
  }
  if (!device->serving()) {
    return absl::FailedPreconditionError(
        absl::StrCat("device ", options_.device, " is not serving"));
  }
  pages_free_at_start_ = device->free_pages();
  live_at_start_ = device->live_sequences();
  if (!info_.features().empty() && std::find(info_.features().begin(), info_.features().end(),
                                             "host_regions") == info_.features().end()) {
    return absl::FailedPreconditionError("the server does not list the host_regions feature");
  }

  // Buffers: one slot for the demo's calls, sized for its largest request, and for the
  // benchmark a shared q/k/v plus one out/lse per call in flight in the pipelined mode.
  const int64_t es = client::DTypeSize(dtype_);
  const int64_t decode_batch = std::min<int64_t>(options_.sequences + 1, max_batch_);
  const int64_t bench_batch = std::min<int64_t>(options_.bench_batch, max_batch_);
  const int64_t main_tokens = std::min<int64_t>(
      max_tokens_, std::max<int64_t>({options_.prefill_tokens, decode_batch, bench_batch, 2048}));
  const int64_t pipeline = std::max<int64_t>(layers_, 4);
  auto layout = [&](client::RegionAllocator& alloc) -> absl::Status {
    auto take = [&](uint64_t bytes, uint64_t* offset) -> absl::Status {
      absl::StatusOr<uint64_t> at = alloc.Allocate(std::max<uint64_t>(bytes, 1));
      if (!at.ok()) return at.status();
      *offset = *at;
      return absl::OkStatus();
    };
    auto slot = [&](Slot& s, int64_t tokens, bool inputs) -> absl::Status {
      s.tokens = tokens;
      if (inputs) {
        if (auto st = take(tokens * qo_heads_ * head_dim_ * es, &s.q); !st.ok()) return st;
        if (auto st = take(tokens * kv_heads_ * head_dim_ * es, &s.k); !st.ok()) return st;
        if (auto st = take(tokens * kv_heads_ * head_dim_ * es, &s.v); !st.ok()) return st;
      }
      if (auto st = take(tokens * qo_heads_ * head_dim_ * es, &s.out); !st.ok()) return st;
      return take(tokens * qo_heads_ * sizeof(float), &s.lse);
    };
    if (auto st = slot(main_slot_, main_tokens, true); !st.ok()) return st;
    bench_slots_.assign(bench_batch > 0 ? pipeline : 0, Slot());
    for (size_t i = 0; i < bench_slots_.size(); ++i) {
      if (auto st = slot(bench_slots_[i], bench_batch, i == 0); !st.ok()) return st;
      bench_slots_[i].q = bench_slots_[0].q;
      bench_slots_[i].k = bench_slots_[0].k;
      bench_slots_[i].v = bench_slots_[0].v;
    }
    return absl::OkStatus();
  };
  client::RegionAllocator sizing(~uint64_t{0});
  if (auto st = layout(sizing); !st.ok()) return st;
  const uint64_t bytes = sizing.used();

  absl::StatusOr<std::unique_ptr<client::SharedMemoryBuffer>> shm =
      client::SharedMemoryBuffer::Create(client::SharedMemoryBuffer::UniqueKey("attnctl"), bytes);
  if (!shm.ok()) return shm.status();
  shm_ = *std::move(shm);
  std::snprintf(g_shm_key, sizeof(g_shm_key), "%s", shm_->key().c_str());
  for (int sig : {SIGINT, SIGTERM, SIGPIPE, SIGHUP}) std::signal(sig, UnlinkAndReraise);
  client::RegionAllocator alloc(bytes);
  if (auto st = layout(alloc); !st.ok()) return st;

  region_ = absl::StrCat("attnctl-demo", shm_->key());  // the key is unique and '/'-prefixed
  if (absl::Status st = client_.RegisterHostRegion(region_, shm_->key(), 0, bytes); !st.ok()) {
    return absl::Status(st.code(), "RegisterHostRegion: " + st.ToString());
  }
  region_registered_ = true;
  absl::PrintF("region: %s, shm %s, %.2f MiB\n", region_.c_str(), shm_->key().c_str(),
               bytes / 1048576.0);

  // Sequence ids come from a source apart from the seed, so a rerun with the same seed never
  // collides with the sequences of a run that is still going (or crashed).
  std::random_device entropy;
  next_id_ = ((static_cast<uint64_t>(entropy()) << 20) ^ entropy()) & ((uint64_t{1} << 48) - 1);
  next_id_ = (next_id_ + 1) << 12;
  return absl::OkStatus();
}

// ---- calls -----------------------------------------------------------------------------------

v1::AttentionRequest Demo::BuildAttention(uint32_t layer, const Items& items, const Slot& slot,
                                          bool want_lse) const {
  const uint64_t t = TotalTokens(items);
  const uint64_t hq = qo_heads_, hk = kv_heads_, d = head_dim_;
  v1::AttentionRequest request;
  request.set_device(options_.device);
  request.set_layer(layer);
  for (const auto& [seq, n] : items) {
    v1::BatchItem* item = request.add_items();
    item->set_seq_id(seq->id);
    item->set_num_new_tokens(static_cast<uint32_t>(n));
  }
  *request.mutable_q() = client::MakeTensorRef(region_, slot.q, dtype_, {t, hq, d});
  *request.mutable_k_new() = client::MakeTensorRef(region_, slot.k, dtype_, {t, hk, d});
  *request.mutable_v_new() = client::MakeTensorRef(region_, slot.v, dtype_, {t, hk, d});
  *request.mutable_out() = client::MakeTensorRef(region_, slot.out, dtype_, {t, hq, d});
  if (want_lse) {
    *request.mutable_lse() = client::MakeTensorRef(region_, slot.lse, v1::DTYPE_FLOAT32, {t, hq});
  }
  return request;
}

absl::StatusOr<v1::AttentionResponse> Demo::Call(Op op, Transport transport,
                                                 const v1::AttentionRequest& request,
                                                 Latencies* latencies) {
  const Clock::time_point start = Clock::now();
  absl::StatusOr<v1::AttentionResponse> response;
  if (transport == Transport::kUnary) {
    response = op == Op::kPrefill ? client_.Prefill(request) : client_.Decode(request);
  } else {
    response = op == Op::kPrefill ? stream_->Prefill(request) : stream_->Decode(request);
  }
  const double seconds = SecondsSince(start);
  if (latencies != nullptr) latencies->Add(seconds);
  ++calls_;
  if (response.ok()) {
    for (const v1::BatchItem& item : request.items()) tokens_ += item.num_new_tokens();
  }
  return response;
}

absl::Status Demo::Advance(const std::string& label, uint32_t layer, const Items& items,
                           const google::protobuf::RepeatedField<uint64_t>& lengths, const float* k,
                           const float* v) {
  if (lengths.size() != static_cast<int>(items.size())) {
    return absl::InternalError(absl::StrCat(label, ": response has ", lengths.size(),
                                            " lengths for ", items.size(), " items"));
  }
  const int64_t row = kv_heads_ * head_dim_;
  int64_t offset = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    auto [seq, n] = items[i];
    const int64_t expected = seq->len[layer] + n;
    if (static_cast<int64_t>(lengths[i]) != expected) {
      // The client's copy and the server disagree from here on; stop rather than report
      // every later call as wrong.
      return absl::InternalError(absl::StrCat(label, ": sequence ", seq->id, " has length ",
                                              lengths[i], ", expected ", expected));
    }
    seq->len[layer] = expected;
    if (seq->tracked[layer] && k != nullptr) {
      seq->k[layer].insert(seq->k[layer].end(), k + offset * row, k + (offset + n) * row);
      seq->v[layer].insert(seq->v[layer].end(), v + offset * row, v + (offset + n) * row);
    }
    offset += n;
  }
  return absl::OkStatus();
}

void Demo::Verify(const std::string& label, Op op, uint32_t layer, const Items& items,
                  const float* q, const Slot& slot, bool want_lse) {
  const int64_t t = TotalTokens(items);
  const int64_t q_row = qo_heads_ * head_dim_;
  std::vector<float> out(t * q_row);
  client::DecodeFloats(dtype_, static_cast<const char*>(shm_->data()) + slot.out,
                       absl::MakeSpan(out));
  std::vector<double> ref(t * q_row), lse_ref(t * qo_heads_);
  int64_t row = 0;
  for (const auto& [seq, n] : items) {
    client::DenseAttentionReference(params_, q + row * q_row, n, seq->k[layer].data(),
                                    seq->v[layer].data(), seq->len[layer], ref.data() + row * q_row,
                                    lse_ref.data() + row * qo_heads_);
    row += n;
  }
  const double err = client::RelativeL2Error(out, ref);
  max_err_[static_cast<int>(op)] = std::max(max_err_[static_cast<int>(op)], err);
  ++outputs_checked_;
  if (!(err <= tolerance_)) {
    // Name the items that are off, so a failure points at a sequence and a length.
    std::vector<std::string> bad;
    row = 0;
    for (const auto& [seq, n] : items) {
      const double item_err =
          client::RelativeL2Error(absl::MakeConstSpan(out).subspan(row * q_row, n * q_row),
                                  absl::MakeConstSpan(ref).subspan(row * q_row, n * q_row));
      if (!(item_err <= tolerance_) && bad.size() < 8) {
        bad.push_back(
            absl::StrFormat("seq %d (len %d, +%d): %.3g", seq->id, seq->len[layer], n, item_err));
      }
      row += n;
    }
    Fail(absl::StrFormat("%s: ||out-ref||/||ref|| = %.3g > %.0e; %s", label, err, tolerance_,
                         absl::StrJoin(bad, "; ")));
  }
  if (want_lse) {
    std::vector<float> lse(t * qo_heads_);
    std::memcpy(lse.data(), static_cast<const char*>(shm_->data()) + slot.lse,
                lse.size() * sizeof(float));
    const double lse_err = client::MaxAbsError(lse, lse_ref);
    max_lse_err_ = std::max(max_lse_err_, lse_err);
    ++lse_checked_;
    if (!(lse_err < lse_tolerance_)) {
      Fail(absl::StrFormat("%s: lse max |err| = %.3g >= %.0e", label, lse_err, lse_tolerance_));
    }
  }
}

absl::Status Demo::FreshAttention(Op op, Transport transport, uint32_t layer, const Items& items,
                                  bool want_lse) {
  const int64_t t = TotalTokens(items);
  const std::vector<float> q = RandomRounded(t * qo_heads_ * head_dim_);
  const std::vector<float> k = RandomRounded(t * kv_heads_ * head_dim_);
  const std::vector<float> v = RandomRounded(t * kv_heads_ * head_dim_);
  Write(main_slot_.q, q);
  Write(main_slot_.k, k);
  Write(main_slot_.v, v);
  Poison(main_slot_, t);
  const v1::AttentionRequest request = BuildAttention(layer, items, main_slot_, want_lse);
  Latencies* latencies = op == Op::kPrefill               ? &prefill_lat_
                         : transport == Transport::kUnary ? &decode_unary_lat_
                                                          : &decode_stream_lat_;
  const std::string label =
      absl::StrFormat("%s%s layer %d (%d items, %d tokens)", OpName(op),
                      transport == Transport::kStream ? " via Stream" : "", layer, items.size(), t);
  absl::StatusOr<v1::AttentionResponse> response = Call(op, transport, request, latencies);
  if (!response.ok()) {
    return absl::Status(response.status().code(), label + ": " + response.status().ToString());
  }
  if (absl::Status st = Advance(label, layer, items, response->lengths(), k.data(), v.data());
      !st.ok()) {
    return st;
  }
  Verify(label, op, layer, items, q.data(), main_slot_, want_lse);
  return absl::OkStatus();
}

absl::Status Demo::FreshAppend(uint32_t layer, const Items& items, bool fresh) {
  const uint64_t t = TotalTokens(items);
  std::vector<float> k, v;
  if (fresh) {
    k = RandomRounded(t * kv_heads_ * head_dim_);
    v = RandomRounded(t * kv_heads_ * head_dim_);
    Write(main_slot_.k, k);
    Write(main_slot_.v, v);
  }
  v1::AppendRequest request;
  request.set_device(options_.device);
  request.set_layer(layer);
  for (const auto& [seq, n] : items) {
    v1::BatchItem* item = request.add_items();
    item->set_seq_id(seq->id);
    item->set_num_new_tokens(static_cast<uint32_t>(n));
  }
  const uint64_t hk = kv_heads_, d = head_dim_;
  *request.mutable_k_new() = client::MakeTensorRef(region_, main_slot_.k, dtype_, {t, hk, d});
  *request.mutable_v_new() = client::MakeTensorRef(region_, main_slot_.v, dtype_, {t, hk, d});
  const std::string label =
      absl::StrFormat("Append layer %d (%d items, %d tokens)", layer, items.size(), t);
  const Clock::time_point start = Clock::now();
  absl::StatusOr<v1::AppendResponse> response = client_.Append(request);
  append_lat_.Add(SecondsSince(start));
  ++calls_;
  if (!response.ok()) {
    return absl::Status(response.status().code(), label + ": " + response.status().ToString());
  }
  tokens_ += t;
  return Advance(label, layer, items, response->lengths(), fresh ? k.data() : nullptr,
                 fresh ? v.data() : nullptr);
}

// ---- phases ----------------------------------------------------------------------------------

absl::Status Demo::CreateSequences() {
  const int n = options_.sequences;
  const int64_t max_prompt = std::max(1, options_.max_prompt);
  // Lengths: 1, exactly one page, one page plus one, then random; all of them leave room
  // for the decode steps under max_seq_len.
  int64_t cap = max_prompt;
  if (info_.max_seq_len() > 0) {
    const int64_t room = static_cast<int64_t>(info_.max_seq_len()) - options_.steps - 1;
    if (room < 1) return absl::FailedPreconditionError("max_seq_len leaves no room for a prompt");
    cap = std::min(cap, room);
  }
  std::vector<int64_t> lengths;
  for (int i = 0; i < n; ++i) {
    int64_t len;
    if (i == 0) {
      len = 1;
    } else if (i == 1) {
      len = page_size_;
    } else if (i == 2) {
      len = page_size_ + 1;
    } else {
      len = absl::Uniform<int64_t>(absl::IntervalClosed, rng_, 1, max_prompt);
    }
    lengths.push_back(std::clamp<int64_t>(len, 1, cap));
  }

  // Capacity: every sequence at its final length, the fork child, and rounding up per page.
  uint64_t pages = 0;
  for (int64_t len : lengths) pages += (len + options_.steps + page_size_) / page_size_ + 1;
  pages += (cap + options_.steps + page_size_) / page_size_ + 1;  // the fork child's copy
  if (pages > pages_free_at_start_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the demo needs up to ", pages, " pages on device ", options_.device,
                     "; the server has ", pages_free_at_start_, " free"));
  }

  int64_t total = 0;
  for (int i = 0; i < n; ++i) {
    Sequence* seq = NewSequence(next_id_++);
    seq->prompt_len = lengths[i];
    // The last sequence (when there are at least two) gets its prompt KV imported with Append.
    seq->imported = n >= 2 && i == n - 1;
    total += lengths[i];
    absl::StatusOr<v1::SequenceInfo> created = client_.CreateSequence(options_.device, seq->id);
    if (!created.ok()) {
      return absl::Status(created.status().code(), absl::StrCat("CreateSequence ", seq->id, ": ",
                                                                created.status().ToString()));
    }
    live_ids_.insert(seq->id);
    if (created->layer_lengths_size() != layers_ ||
        std::any_of(created->layer_lengths().begin(), created->layer_lengths().end(),
                    [](uint64_t l) { return l != 0; })) {
      Fail(absl::StrCat("CreateSequence ", seq->id, ": expected ", layers_,
                        " zero layer lengths, got [", absl::StrJoin(created->layer_lengths(), ","),
                        "]"));
    }
  }
  absl::PrintF("sequences: %d created (ids from %d), prompt lengths [%s], %d tokens\n", n,
               seqs_.front()->id, absl::StrJoin(lengths, " ").c_str(), total);

  // A duplicate id must be refused and change nothing.
  absl::StatusOr<v1::SequenceInfo> dup = client_.CreateSequence(options_.device, seqs_[0]->id);
  if (dup.status().code() != absl::StatusCode::kAlreadyExists) {
    Fail(absl::StrCat("CreateSequence of a live id: expected ALREADY_EXISTS, got ",
                      dup.status().ToString()));
  }
  return absl::OkStatus();
}

absl::Status Demo::PrefillPrompts() {
  const int64_t budget_per_request =
      std::min<int64_t>({std::max(1, options_.prefill_tokens), max_tokens_, main_slot_.tokens});
  const int64_t chunk = std::max(1, options_.prefill_chunk);
  std::vector<Sequence*> todo;
  for (auto& seq : seqs_) {
    if (!seq->imported) todo.push_back(seq.get());
  }
  int requests = 0;
  size_t start = 0;  // rotates so requests mix different sequences' chunks
  const Clock::time_point begin = Clock::now();
  while (true) {
    Items items;
    int64_t budget = budget_per_request;
    for (size_t i = 0;
         i < todo.size() && budget > 0 && static_cast<int64_t>(items.size()) < max_batch_; ++i) {
      Sequence* seq = todo[(start + i) % todo.size()];
      const int64_t n = std::min({seq->prompt_len - seq->prompt_sent, chunk, budget});
      if (n <= 0) continue;
      items.emplace_back(seq, n);
      budget -= n;
    }
    if (items.empty()) break;
    start = (start + items.size()) % std::max<size_t>(todo.size(), 1);
    for (uint32_t layer = 0; layer < layers_; ++layer) {
      // lse on every third call: checked when asked for, and not written when not.
      const bool want_lse = (prefill_lat_.count() % 3) == 0;
      if (absl::Status st = FreshAttention(Op::kPrefill, Transport::kUnary, layer, items, want_lse);
          !st.ok()) {
        return st;
      }
    }
    for (auto& [seq, n] : items) seq->prompt_sent += n;
    ++requests;
  }
  absl::PrintF(
      "prefill: %d requests x %d layers in %.2f s (chunks of <= %d tokens, <= %d tokens "
      "per request)\n",
      requests, layers_, SecondsSince(begin), chunk, budget_per_request);
  return absl::OkStatus();
}

absl::Status Demo::ImportPrompt(Sequence& seq) {
  const int64_t budget = std::min<int64_t>(max_tokens_, main_slot_.tokens);
  int requests = 0;
  while (seq.prompt_sent < seq.prompt_len) {
    const int64_t n = std::min(seq.prompt_len - seq.prompt_sent, budget);
    for (uint32_t layer = 0; layer < layers_; ++layer) {
      if (absl::Status st = FreshAppend(layer, {{&seq, n}}); !st.ok()) return st;
    }
    seq.prompt_sent += n;
    ++requests;
  }
  absl::StatusOr<v1::SequenceInfo> got = client_.GetSequence(options_.device, seq.id);
  if (!got.ok()) return got.status();
  for (int64_t layer = 0; layer < layers_; ++layer) {
    if (got->layer_lengths_size() != layers_ ||
        static_cast<int64_t>(got->layer_lengths(layer)) != seq.prompt_len) {
      Fail(absl::StrCat("GetSequence ", seq.id, " after import: layer lengths [",
                        absl::StrJoin(got->layer_lengths(), ","), "], expected ", seq.prompt_len));
      break;
    }
  }
  absl::PrintF(
      "import: sequence %d, %d prompt tokens written with Append only (%d requests x %d "
      "layers)\n",
      seq.id, seq.prompt_len, requests, layers_);
  return absl::OkStatus();
}

absl::Status Demo::ForkOne(int step) {
  // The parent ends mid-page, so the child shares full pages and must copy the partial one.
  Sequence* parent = nullptr;
  for (auto& seq : seqs_) {
    const int64_t len = seq->len[0];
    if (!seq->imported && len > page_size_ && len % page_size_ != 0) {
      parent = seq.get();
      break;
    }
  }
  if (parent == nullptr) parent = seqs_.back().get();
  const uint64_t child_id = next_id_++;
  absl::StatusOr<v1::SequenceInfo> forked =
      client_.ForkSequence(options_.device, parent->id, child_id);
  if (!forked.ok()) {
    return absl::Status(forked.status().code(),
                        absl::StrCat("ForkSequence ", parent->id, " -> ", child_id, ": ",
                                     forked.status().ToString()));
  }
  live_ids_.insert(child_id);
  const Sequence parent_copy = *parent;  // seqs_ may reallocate below
  Sequence* child = NewSequence(child_id);
  *child = parent_copy;
  child->id = child_id;
  std::vector<uint64_t> expected(parent_copy.len.begin(), parent_copy.len.end());
  if (std::vector<uint64_t>(forked->layer_lengths().begin(), forked->layer_lengths().end()) !=
      expected) {
    Fail(absl::StrCat("ForkSequence: child layer lengths [",
                      absl::StrJoin(forked->layer_lengths(), ","), "], expected [",
                      absl::StrJoin(expected, ","), "]"));
  }
  absl::PrintF("fork: step %d, sequence %d (length %d) -> %d; %d pages, %d shared\n", step,
               parent_copy.id, parent_copy.len[0], child_id, forked->num_pages(),
               forked->shared_pages());

  // A fork onto a live id must be refused.
  absl::StatusOr<v1::SequenceInfo> dup =
      client_.ForkSequence(options_.device, parent_copy.id, child_id);
  if (dup.status().code() != absl::StatusCode::kAlreadyExists) {
    Fail(absl::StrCat("ForkSequence onto a live id: expected ALREADY_EXISTS, got ",
                      dup.status().ToString()));
  }
  return absl::OkStatus();
}

absl::Status Demo::TruncateOne(Sequence& seq, int64_t target, const std::string& why) {
  const int64_t before = seq.MaxLen();
  absl::StatusOr<v1::SequenceInfo> got =
      client_.TruncateSequence(options_.device, seq.id, static_cast<uint64_t>(target));
  if (!got.ok()) {
    return absl::Status(got.status().code(), absl::StrCat("TruncateSequence ", seq.id, " to ",
                                                          target, ": ", got.status().ToString()));
  }
  const int64_t row = kv_heads_ * head_dim_;
  for (int64_t layer = 0; layer < layers_; ++layer) {
    seq.len[layer] = std::min(seq.len[layer], target);
    if (seq.tracked[layer]) {
      seq.k[layer].resize(seq.len[layer] * row);
      seq.v[layer].resize(seq.len[layer] * row);
    }
  }
  std::vector<uint64_t> expected(seq.len.begin(), seq.len.end());
  if (std::vector<uint64_t>(got->layer_lengths().begin(), got->layer_lengths().end()) != expected) {
    Fail(absl::StrCat("TruncateSequence ", seq.id, ": layer lengths [",
                      absl::StrJoin(got->layer_lengths(), ","), "], expected [",
                      absl::StrJoin(expected, ","), "]"));
  }
  absl::PrintF(
      "truncate: sequence %d from %d to %d tokens (rolled back %d; %s); %d pages, %d "
      "shared\n",
      seq.id, before, target, before - target, why.c_str(), got->num_pages(), got->shared_pages());
  return absl::OkStatus();
}

absl::Status Demo::DecodeSteps() {
  const int steps = options_.steps;
  const int fork_step = steps / 3;
  const int truncate_step = (2 * steps) / 3;
  Sequence* fork_child = nullptr;
  int64_t fork_len = 0;
  int decode_calls = 0;
  const Clock::time_point begin = Clock::now();

  for (int step = 0; step <= steps; ++step) {
    if (step == fork_step) {
      if (absl::Status st = ForkOne(step); !st.ok()) return st;
      fork_child = seqs_.back().get();
      fork_len = fork_child->len[0];
    }
    if (step == truncate_step) {
      // A plain rollback that crosses back over a page boundary (when the length allows)...
      Sequence* plain = nullptr;
      for (auto& seq : seqs_) {
        if (seq.get() == fork_child || seq->imported || seq->len[0] <= 2) continue;
        if (plain == nullptr) plain = seq.get();
        if (seq->len[0] % page_size_ != 0) {
          plain = seq.get();
          break;
        }
      }
      if (plain != nullptr) {
        const int64_t len = plain->MaxLen();
        const int64_t k = std::clamp<int64_t>(len % page_size_ + 1, 1, len - 1);
        if (absl::Status st = TruncateOne(*plain, len - k, "speculative rollback"); !st.ok()) {
          return st;
        }
      }
      // ...and one of the fork child into the last full page it shares with its parent: its
      // next token lands in a shared page, which must be copied, or the parent's next check
      // fails.
      if (fork_child != nullptr && fork_len > 1) {
        int64_t target = fork_len - 1;
        if (page_size_ > 1 && fork_len >= page_size_) {
          target = (fork_len / page_size_ - 1) * page_size_ + std::max<int64_t>(1, page_size_ / 2);
        }
        if (absl::Status st =
                TruncateOne(*fork_child, target, "into a page shared with its parent");
            !st.ok()) {
          return st;
        }
      }
    }
    if (step == steps) break;

    std::vector<Sequence*> batch;
    for (auto& seq : seqs_) batch.push_back(seq.get());
    // Even steps through the unary Decode, odd steps through the Stream: both transports get
    // the same checks.
    const Transport transport = step % 2 == 0 ? Transport::kUnary : Transport::kStream;
    for (uint32_t layer = 0; layer < layers_; ++layer) {
      for (size_t first = 0; first < batch.size(); first += max_batch_) {
        Items items;
        for (size_t i = first; i < std::min(batch.size(), first + max_batch_); ++i) {
          items.emplace_back(batch[i], 1);
        }
        const bool want_lse = decode_calls % 3 == 1;
        if (absl::Status st = FreshAttention(Op::kDecode, transport, layer, items, want_lse);
            !st.ok()) {
          return st;
        }
        ++decode_calls;
      }
    }
  }
  absl::PrintF("decode: %d steps x %d layers, %d sequences at the end, %d calls in %.2f s\n", steps,
               layers_, seqs_.size(), decode_calls, SecondsSince(begin));
  return absl::OkStatus();
}

absl::Status Demo::CheckServerLengths(const std::vector<std::unique_ptr<Sequence>>& seqs) {
  absl::StatusOr<v1::ListSequencesResponse> list = client_.ListSequences(options_.device);
  if (!list.ok()) return list.status();
  int found = 0;
  for (const auto& seq : seqs) {
    const v1::SequenceInfo* info = nullptr;
    for (const v1::SequenceInfo& s : list->sequences()) {
      if (s.seq_id() == seq->id) info = &s;
    }
    if (info == nullptr) {
      Fail(absl::StrCat("ListSequences does not list live sequence ", seq->id));
      continue;
    }
    ++found;
    std::vector<uint64_t> expected(seq->len.begin(), seq->len.end());
    if (std::vector<uint64_t>(info->layer_lengths().begin(), info->layer_lengths().end()) !=
        expected) {
      Fail(absl::StrCat("ListSequences: sequence ", seq->id, " has layer lengths [",
                        absl::StrJoin(info->layer_lengths(), ","), "], expected [",
                        absl::StrJoin(expected, ","), "]"));
    }
    // Pages span all layers, so a sequence needs as many as its longest layer fills.
    const uint64_t pages = (seq->MaxLen() + page_size_ - 1) / page_size_;
    if (info->num_pages() != pages) {
      Fail(absl::StrCat("ListSequences: sequence ", seq->id, " of length ", seq->MaxLen(),
                        " holds ", info->num_pages(), " pages, expected ", pages));
    }
  }
  absl::PrintF("list: %d of %d sequences listed with the expected lengths and pages\n", found,
               seqs.size());
  return absl::OkStatus();
}

absl::Status Demo::ReleaseAll(std::vector<std::unique_ptr<Sequence>>& seqs) {
  uint64_t freed = 0;
  for (const auto& seq : seqs) {
    absl::StatusOr<uint64_t> got = client_.ReleaseSequence(options_.device, seq->id);
    if (!got.ok()) {
      return absl::Status(got.status().code(),
                          absl::StrCat("ReleaseSequence ", seq->id, ": ", got.status().ToString()));
    }
    live_ids_.erase(seq->id);
    freed += *got;
  }
  if (!seqs.empty()) {
    absl::StatusOr<v1::SequenceInfo> gone = client_.GetSequence(options_.device, seqs[0]->id);
    if (gone.status().code() != absl::StatusCode::kNotFound) {
      Fail(absl::StrCat("GetSequence of a released sequence: expected NOT_FOUND, got ",
                        gone.status().ToString()));
    }
  }
  absl::PrintF("release: %d sequences, %d pages freed\n", seqs.size(), freed);
  seqs.clear();

  // With nobody else using the device, every page must be back.
  absl::StatusOr<v1::ServerInfo> info = client_.GetServerInfo();
  if (!info.ok()) return info.status();
  for (const v1::DeviceInfo& d : info->devices()) {
    if (d.device() != options_.device) continue;
    if (d.live_sequences() == live_at_start_ && d.free_pages() != pages_free_at_start_) {
      Fail(absl::StrCat("after releasing every sequence, device ", d.device(), " has ",
                        d.free_pages(), " free pages; it had ", pages_free_at_start_,
                        " before the demo"));
    }
  }
  return absl::OkStatus();
}

// ---- benchmark -------------------------------------------------------------------------------

absl::Status Demo::Bench() {
  const int64_t batch = std::min<int64_t>(options_.bench_batch, max_batch_);
  const int64_t context = std::max(1, options_.bench_context);
  const int64_t calls = std::max(1, options_.bench_calls);
  const int64_t pipeline = bench_slots_.size();
  const int64_t growth =
      2 * ((calls + layers_ - 1) / layers_) +
      ((calls + pipeline - 1) / pipeline) * ((pipeline + layers_ - 1) / layers_) + 2;
  const uint64_t pages_needed = batch * ((context + growth + page_size_ - 1) / page_size_);
  if (pages_needed > pages_free_at_start_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the benchmark needs ", pages_needed, " pages (", batch, " sequences x ",
                     context + growth, " tokens); the device has ", pages_free_at_start_,
                     " free; lower --bench_batch or --bench_context"));
  }
  if (info_.max_seq_len() > 0 && static_cast<uint64_t>(context + growth) > info_.max_seq_len()) {
    return absl::FailedPreconditionError(
        absl::StrCat("--bench_context ", context, " exceeds the server's max_seq_len"));
  }

  // Sequences at `context` tokens on every layer, filled with Append; the client keeps layer
  // 0's K/V only, which is where the checked calls run.
  for (int64_t i = 0; i < batch; ++i) {
    Sequence* seq = NewSequence(next_id_++);
    for (int64_t layer = 1; layer < layers_; ++layer) seq->tracked[layer] = false;
    absl::StatusOr<v1::SequenceInfo> created = client_.CreateSequence(options_.device, seq->id);
    if (!created.ok()) return created.status();
    live_ids_.insert(seq->id);
  }
  bench_seqs_ = std::move(seqs_);
  seqs_.clear();
  const Clock::time_point fill_start = Clock::now();
  const int64_t budget = std::min<int64_t>(max_tokens_, main_slot_.tokens);
  size_t next = 0;
  while (next < bench_seqs_.size()) {
    Items items;
    int64_t left = budget;
    for (; next < bench_seqs_.size() && left > 0 &&
           static_cast<int64_t>(items.size()) < max_batch_;) {
      Sequence* seq = bench_seqs_[next].get();
      const int64_t n = std::min(context - seq->len[0], left);
      items.emplace_back(seq, n);
      left -= n;
      if (seq->len[0] + n == context)
        ++next;
      else
        break;  // the budget ran out part-way through this sequence
    }
    for (uint32_t layer = 0; layer < layers_; ++layer) {
      if (absl::Status st = FreshAppend(layer, items, /*fresh=*/layer == 0); !st.ok()) return st;
    }
  }
  absl::PrintF("bench: %d sequences filled to %d tokens x %d layers with Append in %.2f s\n", batch,
               context, layers_, SecondsSince(fill_start));

  // One set of inputs for every timed call: the timing is of the server, not of the client's
  // random number generator.
  const std::vector<float> q = RandomRounded(batch * qo_heads_ * head_dim_);
  const std::vector<float> k = RandomRounded(batch * kv_heads_ * head_dim_);
  const std::vector<float> v = RandomRounded(batch * kv_heads_ * head_dim_);
  Write(bench_slots_[0].q, q);
  Write(bench_slots_[0].k, k);
  Write(bench_slots_[0].v, v);
  Items items;
  for (auto& seq : bench_seqs_) items.emplace_back(seq.get(), 1);

  auto timed_series = [&](Transport transport, Latencies& lat) -> absl::Status {
    for (int64_t i = 0; i < calls; ++i) {
      const uint32_t layer = i % layers_;
      const bool check = i == 0;
      const Slot& slot = bench_slots_[0];
      if (check) Poison(slot, batch);
      const v1::AttentionRequest request = BuildAttention(layer, items, slot, check);
      const std::string label =
          absl::StrFormat("bench Decode%s layer %d (%d items)",
                          transport == Transport::kStream ? " via Stream" : "", layer, batch);
      absl::StatusOr<v1::AttentionResponse> response = Call(Op::kDecode, transport, request, &lat);
      if (!response.ok()) {
        return absl::Status(response.status().code(), label + ": " + response.status().ToString());
      }
      if (absl::Status st = Advance(label, layer, items, response->lengths(), k.data(), v.data());
          !st.ok()) {
        return st;
      }
      if (check) Verify(label, Op::kDecode, layer, items, q.data(), slot, true);
    }
    return absl::OkStatus();
  };

  Latencies unary, stream, rounds;
  if (absl::Status st = timed_series(Transport::kUnary, unary); !st.ok()) return st;
  if (absl::Status st = timed_series(Transport::kStream, stream); !st.ok()) return st;

  // Pipelined: `pipeline` Decodes in flight on the stream (layers in turn, one out buffer
  // each), then their answers; timed per round.
  const int64_t round_count = (calls + pipeline - 1) / pipeline;
  for (int64_t r = 0; r < round_count; ++r) {
    const bool check = r == 0;
    if (check) {
      for (const Slot& slot : bench_slots_) Poison(slot, batch);
    }
    std::vector<uint32_t> layers;
    const Clock::time_point start = Clock::now();
    for (int64_t j = 0; j < pipeline; ++j) {
      const uint32_t layer = j % layers_;
      layers.push_back(layer);
      absl::StatusOr<uint64_t> tag =
          stream_->SendDecode(BuildAttention(layer, items, bench_slots_[j], check));
      if (!tag.ok()) return tag.status();
    }
    std::vector<v1::StreamResponse> responses;
    for (int64_t j = 0; j < pipeline; ++j) {
      absl::StatusOr<v1::StreamResponse> response = stream_->Receive();
      if (!response.ok()) return response.status();
      responses.push_back(*std::move(response));
    }
    rounds.Add(SecondsSince(start));
    calls_ += pipeline;
    // Answers are applied in request order: the copy of layer 0 is exactly what the server
    // held when it ran each call.
    for (int64_t j = 0; j < pipeline; ++j) {
      const std::string label =
          absl::StrFormat("bench pipelined Decode #%d layer %d (%d items)", j, layers[j], batch);
      if (absl::Status st = client::StreamResponseStatus(responses[j]); !st.ok()) {
        return absl::Status(st.code(), label + ": " + st.ToString());
      }
      if (!responses[j].has_attention()) {
        return absl::InternalError(label + ": answered without an attention result");
      }
      tokens_ += batch;
      if (absl::Status st = Advance(label, layers[j], items, responses[j].attention().lengths(),
                                    k.data(), v.data());
          !st.ok()) {
        return st;
      }
      if (check && layers[j] == 0) {
        Verify(label, Op::kDecode, 0, items, q.data(), bench_slots_[j], true);
      }
    }
  }

  auto line = [&](const char* name, const Latencies& lat, int64_t per_sample) {
    const double per_call = lat.total() / (lat.count() * per_sample);
    return absl::StrFormat(
        "  %-26s p50 %8s  p99 %8s  mean/call %8s  %8.0f calls/s  %10.0f tokens/s\n", name,
        Micros(lat.Percentile(50)), Micros(lat.Percentile(99)), Micros(per_call), 1.0 / per_call,
        batch / per_call);
  };
  bench_report_ = absl::StrFormat(
      "bench: Decode of %d sequences at ~%d tokens, %d calls per transport (layers in turn), "
      "checked once per transport\n",
      batch, context, calls);
  absl::StrAppend(&bench_report_, line("unary Decode", unary, 1));
  absl::StrAppend(&bench_report_, line("Stream (one in flight)", stream, 1));
  absl::StrAppend(&bench_report_, line(absl::StrFormat("Stream (%d in flight)", pipeline).c_str(),
                                       rounds, pipeline));
  absl::StrAppend(&bench_report_,
                  absl::StrFormat("  (pipelined p50/p99 are per round of %d calls)\n", pipeline));
  std::fputs(bench_report_.c_str(), stdout);
  return ReleaseAll(bench_seqs_);
}

// ---- driver ----------------------------------------------------------------------------------

void Demo::Cleanup() {
  if (stream_ != nullptr) {
    if (absl::Status st = stream_->Close(); !st.ok()) Fail("closing the Stream: " + st.ToString());
    stream_.reset();
  }
  size_t left = live_ids_.size();
  for (uint64_t id : live_ids_) {
    absl::StatusOr<uint64_t> released = client_.ReleaseSequence(options_.device, id);
    --left;
    if (!released.ok()) {
      Fail(absl::StrCat("ReleaseSequence ", id, " at clean-up: ", released.status().ToString()));
      if (absl::IsUnavailable(released.status()) || absl::IsDeadlineExceeded(released.status())) {
        // The server is gone; the other sequences went with it (or will time out the same).
        if (left > 0) Fail(absl::StrCat(left, " more sequences not released"));
        break;
      }
    }
  }
  live_ids_.clear();
  if (region_registered_) {
    if (absl::Status st = client_.UnregisterRegion(region_); !st.ok()) {
      Fail("UnregisterRegion: " + st.ToString());
    } else {
      absl::StatusOr<v1::ListRegionsResponse> regions = client_.ListRegions();
      if (regions.ok()) {
        for (const v1::RegionInfo& r : regions->regions()) {
          if (r.name() == region_) Fail("ListRegions still lists the unregistered region");
        }
      }
    }
    region_registered_ = false;
  }
  g_shm_key[0] = '\0';
  shm_.reset();
}

void Demo::PrintSummary() {
  // Printed once, after the demo's own calls and before the benchmark's.
  summary_printed_ = true;
  const double rpc_seconds = prefill_lat_.total() + decode_unary_lat_.total() +
                             decode_stream_lat_.total() + append_lat_.total();
  const double per_second = rpc_seconds > 0 ? 1.0 / rpc_seconds : 0.0;
  absl::PrintF("summary:\n");
  absl::PrintF("  calls       %d data calls: Prefill %d, Decode %d unary + %d Stream, Append %d\n",
               calls_, prefill_lat_.count(), decode_unary_lat_.count(), decode_stream_lat_.count(),
               append_lat_.count());
  absl::PrintF("  tokens      %d (query tokens attended + K/V tokens appended, all layers)\n",
               tokens_);
  absl::PrintF("  throughput  %.0f tokens/s, %.0f calls/s (%.3f s inside data calls)\n",
               tokens_ * per_second, calls_ * per_second, rpc_seconds);
  absl::PrintF("  Prefill          %s\n", prefill_lat_.Summary().c_str());
  absl::PrintF("  Decode (unary)   %s\n", decode_unary_lat_.Summary().c_str());
  absl::PrintF("  Decode (Stream)  %s\n", decode_stream_lat_.Summary().c_str());
  absl::PrintF("  Append           %s\n", append_lat_.Summary().c_str());
  absl::PrintF(
      "  checks      %d outputs (max rel err Prefill %.2e, Decode %.2e; tol %.0e), %d lse "
      "(max abs err %.2e; tol %.0e), %d failed\n",
      outputs_checked_, max_err_[0], max_err_[1], tolerance_, lse_checked_, max_lse_err_,
      lse_tolerance_, failures_.size());
}

int Demo::Run() {
  if (options_.seed == 0) {
    std::random_device entropy;
    options_.seed = (static_cast<uint64_t>(entropy()) << 32) | entropy();
    if (options_.seed == 0) options_.seed = 1;
  }
  rng_.seed(options_.seed);
  absl::PrintF("demo: seed %llu (rerun with --seed=%llu)\n",
               static_cast<unsigned long long>(options_.seed),
               static_cast<unsigned long long>(options_.seed));
  if (options_.sequences < 1 || options_.steps < 0) {
    absl::PrintF("demo: FAIL (--demo_sequences must be >= 1 and --demo_steps >= 0)\n");
    return 2;
  }

  const Clock::time_point begin = Clock::now();
  absl::Status status = [&]() -> absl::Status {
    if (absl::Status st = Setup(); !st.ok()) return st;
    // No deadline on the stream: it lives as long as the demo; each call on it is short.
    absl::StatusOr<std::unique_ptr<DataStream>> stream =
        client_.OpenStream({.timeout = absl::InfiniteDuration()});
    if (!stream.ok()) return stream.status();
    stream_ = *std::move(stream);
    if (absl::Status st = CreateSequences(); !st.ok()) return st;
    if (absl::Status st = PrefillPrompts(); !st.ok()) return st;
    for (auto& seq : seqs_) {
      if (seq->imported) {
        if (absl::Status st = ImportPrompt(*seq); !st.ok()) return st;
      }
    }
    if (absl::Status st = DecodeSteps(); !st.ok()) return st;
    if (absl::Status st = CheckServerLengths(seqs_); !st.ok()) return st;
    if (absl::Status st = ReleaseAll(seqs_); !st.ok()) return st;
    PrintSummary();
    if (options_.bench_batch > 0) {
      if (absl::Status st = Bench(); !st.ok()) return st;
    }
    return absl::OkStatus();
  }();
  Cleanup();
  if (!summary_printed_) PrintSummary();
  absl::PrintF("demo: wall time %.2f s\n", SecondsSince(begin));

  if (!status.ok()) {
    absl::PrintF("demo: FAIL (%s)\n", status.ToString().c_str());
    return 1;
  }
  if (!failures_.empty()) {
    absl::PrintF("demo: FAIL (%d checks failed; first: %s)\n", failures_.size(),
                 failures_.front().c_str());
    return 1;
  }
  absl::PrintF("demo: PASS\n");
  return 0;
}

}  // namespace

int RunDemo(client::Client& client, const DemoOptions& options) {
  Demo demo(client, options);
  return demo.Run();
}

}  // namespace attnd::attnctl
