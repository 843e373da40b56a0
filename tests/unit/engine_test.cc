// Tests of server/engine/engine.h on the CPU platform, driven in process with v1 requests and host regions
// over real POSIX shared memory. Every attention output is compared with a dense fp64 reference
// computed here from the K/V history the test itself fed in (so paging, copy-on-write, fork,
// truncate and import bugs all show up as wrong numbers), by ||out - ref|| / ||ref||.
//
// Inputs are fresh random values each run (the seed is printed; ATTND_TEST_SEED replays it);
// outputs are poisoned with NaN before each call; the pool is fragmented first so page tables
// are not contiguous by accident; lengths are not multiples of the page size, and include 1.
#include "server/engine/engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "kernels/cpu_attention.h"
#include "server/config/config.h"
#include "server/cpu/cpu_platform.h"
#include "server/metrics/metrics.h"
#include "server/wire/convert.h"
#include "spdlog/spdlog.h"
#include "tests/unit/unit_test_util.h"

namespace attnd {
namespace {

using kernels::DType;
using kernels::KvLayout;
using testing_util::ShmObject;

// Calls an engine method that answers through a Done callback and waits for the answer.
template <typename Call>
absl::Status Await(Call&& call) {
  absl::Notification done;
  absl::Status status = absl::UnknownError("Done was never called");
  std::forward<Call>(call)([&](absl::Status s) {
    status = std::move(s);
    done.Notify();
  });
  done.WaitForNotification();
  return status;
}

// The engine speaks plain C++. These tests build the wire's requests and convert them exactly
// as the gRPC handlers do (server/wire/convert.h), so the engine is tested on what clients
// send; this adapter is that conversion, with the handlers' signatures.
class WireEngine {
 public:
  using Done = Engine::Done;
  explicit WireEngine(Engine* engine) : engine_(engine) {}

  absl::Status RegisterHostRegion(const v1::RegisterHostRegionRequest& req) {
    return engine_->RegisterHostRegion(wire::ToHostRegionSpec(req));
  }
  void GetServerInfo(v1::ServerInfo* info) { wire::FillServerInfo(engine_->Info(), info); }
  void ListRegions(v1::ListRegionsResponse* resp) { wire::FillRegions(engine_->ListRegions(), resp); }
  void CreateSequence(const v1::CreateSequenceRequest& req, v1::SequenceInfo* info, Done done) {
    engine_->CreateSequence(req.device(), req.seq_id(), Sequence(info, std::move(done)));
  }
  void ForkSequence(const v1::ForkSequenceRequest& req, v1::SequenceInfo* info, Done done) {
    engine_->ForkSequence(req.device(), req.parent_id(), req.child_id(),
                          Sequence(info, std::move(done)));
  }
  void TruncateSequence(const v1::TruncateSequenceRequest& req, v1::SequenceInfo* info,
                        Done done) {
    engine_->TruncateSequence(req.device(), req.seq_id(), req.length(),
                              Sequence(info, std::move(done)));
  }
  void GetSequence(const v1::GetSequenceRequest& req, v1::SequenceInfo* info, Done done) {
    engine_->GetSequence(req.device(), req.seq_id(), Sequence(info, std::move(done)));
  }
  void ReleaseSequence(const v1::ReleaseSequenceRequest& req, v1::ReleaseSequenceResponse* resp,
                       Done done) {
    engine_->ReleaseSequence(req.device(), req.seq_id(),
                             [resp, done = std::move(done)](absl::StatusOr<int64_t> r) mutable {
                               if (r.ok()) resp->set_freed_pages(static_cast<uint64_t>(*r));
                               std::move(done)(r.status());
                             });
  }
  void ListSequences(const v1::ListSequencesRequest& req, v1::ListSequencesResponse* resp,
                     Done done) {
    engine_->ListSequences(
        req.device(), [resp, done = std::move(done)](
                          absl::StatusOr<std::vector<SequenceState>> r) mutable {
          if (r.ok())
            for (const SequenceState& s : *r) wire::FillSequenceInfo(s, resp->add_sequences());
          std::move(done)(r.status());
        });
  }
  void Append(const v1::AppendRequest& req, v1::AppendResponse* resp, Done done) {
    engine_->Append(wire::ToAppendCall(req), Lengths(resp, std::move(done)));
  }
  void Prefill(const v1::AttentionRequest& req, v1::AttentionResponse* resp, Done done,
               RequestTrace* trace = nullptr) {
    engine_->Prefill(wire::ToAttentionCall(req), Lengths(resp, std::move(done)), trace);
  }
  void Decode(const v1::AttentionRequest& req, v1::AttentionResponse* resp, Done done,
              RequestTrace* trace = nullptr) {
    engine_->Decode(wire::ToAttentionCall(req), Lengths(resp, std::move(done)), trace);
  }
  void ExportKv(const v1::ExportKvRequest& req, v1::ExportKvResponse*, Done done) {
    engine_->ExportKv(wire::ToTransferCall(req), std::move(done));
  }
  void ImportKv(const v1::ImportKvRequest& req, v1::ImportKvResponse* resp, Done done) {
    engine_->ImportKv(wire::ToTransferCall(req), [resp, done = std::move(done)](
                                                     absl::StatusOr<std::vector<int64_t>> r) mutable {
      if (r.ok())
        for (int64_t len : *r) resp->add_layer_lengths(static_cast<uint64_t>(len));
      std::move(done)(r.status());
    });
  }

 private:
  static Engine::Reply<SequenceState> Sequence(v1::SequenceInfo* info, Done done) {
    return [info, done = std::move(done)](absl::StatusOr<SequenceState> r) mutable {
      if (r.ok()) wire::FillSequenceInfo(*r, info);
      std::move(done)(r.status());
    };
  }
  template <typename Resp>
  static Engine::Reply<DataResult> Lengths(Resp* resp, Done done) {
    return [resp, done = std::move(done)](absl::StatusOr<DataResult> r) mutable {
      if (r.ok()) wire::FillLengths(*r, resp->mutable_lengths());
      std::move(done)(r.status());
    };
  }

  Engine* engine_;
};

struct ModelCase {
  const char* name;
  DType dtype;
  KvLayout layout;
  int64_t page_size;
  float soft_cap;
  int64_t window_left;
  double tolerance;  // on ||out - ref|| / ||ref||
};

void PrintTo(const ModelCase& c, std::ostream* os) { *os << c.name; }

constexpr int64_t kLayers = 2;
constexpr int64_t kQoHeads = 8;
constexpr int64_t kKvHeads = 2;
constexpr int64_t kHeadDim = 64;
constexpr size_t kShmBytes = 8 << 20;
constexpr char kRegion[] = "io";

// One item of a data batch.
struct Item {
  uint64_t id;
  int64_t n;
};

// What the test fed into one sequence: per layer, K and V as [len][kv_heads][head_dim] of the
// values the pool holds (already rounded to the model dtype).
struct History {
  std::vector<std::vector<double>> k = std::vector<std::vector<double>>(kLayers);
  std::vector<std::vector<double>> v = std::vector<std::vector<double>>(kLayers);
  int64_t Length(int64_t layer) const {
    return static_cast<int64_t>(k[layer].size()) / (kKvHeads * kHeadDim);
  }
  void Truncate(int64_t length) {
    for (int64_t l = 0; l < kLayers; ++l) {
      const size_t keep = static_cast<size_t>(std::min(Length(l), length) * kKvHeads * kHeadDim);
      k[l].resize(keep);
      v[l].resize(keep);
    }
  }
};

// Row-packed inputs of a batch before rounding: q [rows][qo][d], k and v [rows][kv][d].
struct BatchInputs {
  std::vector<float> q, k, v;
};

// Per item: the raw bytes of its out rows, and its lse rows if asked for.
struct Outputs {
  std::vector<std::vector<uint8_t>> out;
  std::vector<std::vector<float>> lse;
};

// Causal attention of the last n positions of a dense history, in double, from the definition:
// logits = cap * tanh(scale * q.k / cap) (or scale * q.k), keys j <= i and i - j <= window.
void DenseReference(const History& h, int64_t layer, int64_t n, const double* q,
                    const ModelShape& m, std::vector<double>* out, std::vector<double>* lse) {
  const int64_t kv_len = h.Length(layer);
  const int64_t group = kQoHeads / kKvHeads;
  const double scale = m.sm_scale;
  const double cap = m.logits_soft_cap;
  out->assign(static_cast<size_t>(n * kQoHeads * kHeadDim), 0.0);
  lse->assign(static_cast<size_t>(n * kQoHeads), -std::numeric_limits<double>::infinity());
  std::vector<double> logits(static_cast<size_t>(kv_len));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = kv_len - n + i;
    for (int64_t head = 0; head < kQoHeads; ++head) {
      const int64_t g = head / group;
      const double* qv = q + (i * kQoHeads + head) * kHeadDim;
      const int64_t first = m.window_left < 0 ? 0 : std::max<int64_t>(0, pos - m.window_left);
      double max = -std::numeric_limits<double>::infinity();
      for (int64_t j = first; j <= pos; ++j) {
        const double* kv = h.k[layer].data() + (j * kKvHeads + g) * kHeadDim;
        double dot = 0;
        for (int64_t x = 0; x < kHeadDim; ++x) dot += qv[x] * kv[x];
        double logit = scale * dot;
        if (cap > 0) logit = cap * std::tanh(logit / cap);
        logits[j] = logit;
        max = std::max(max, logit);
      }
      double sum = 0;
      double* o = out->data() + (i * kQoHeads + head) * kHeadDim;
      for (int64_t j = first; j <= pos; ++j) {
        const double w = std::exp(logits[j] - max);
        sum += w;
        const double* vv = h.v[layer].data() + (j * kKvHeads + g) * kHeadDim;
        for (int64_t x = 0; x < kHeadDim; ++x) o[x] += w * vv[x];
      }
      for (int64_t x = 0; x < kHeadDim; ++x) o[x] /= sum;
      (*lse)[i * kQoHeads + head] = max + std::log(sum);
    }
  }
}

class EngineTest : public ::testing::TestWithParam<ModelCase> {
 protected:
  void SetUp() override {
    spdlog::set_level(spdlog::level::warn);
    seed_ = testing_util::TestSeed();
    rng_.seed(seed_);
    shm_ = std::make_unique<ShmObject>(kShmBytes);
    StartEngine(/*pages=*/512);
  }

  void TearDown() override {
    engine_.reset();
    metrics_.reset();
  }

  // (Re)starts the engine with a pool of `pages` pages and registers the shared region.
  void StartEngine(int64_t pages) {
    engine_.reset();
    metrics_.reset();
    history_.clear();
    const ModelCase& c = GetParam();
    config_ = ServerConfig();
    config_.model.num_layers = kLayers;
    config_.model.num_qo_heads = kQoHeads;
    config_.model.num_kv_heads = kKvHeads;
    config_.model.head_dim = kHeadDim;
    config_.model.dtype = c.dtype;
    config_.model.layout = c.layout;
    config_.model.page_size = c.page_size;
    config_.model.logits_soft_cap = c.soft_cap;
    config_.model.window_left = c.window_left;
    config_.pages_per_device = pages;
    config_.max_batch_size = 16;
    config_.metrics_port = 0;
    ASSERT_TRUE(config_.Validate().ok()) << config_.Validate();
    metrics_ = std::make_unique<Metrics>(config_.devices);
    auto engine = Engine::Create(config_, CreateCpuPlatform(), metrics_.get());
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = *std::move(engine);
    wire_ = std::make_unique<WireEngine>(engine_.get());
    v1::RegisterHostRegionRequest reg;
    reg.set_name(kRegion);
    reg.set_shm_key(shm_->key());
    reg.set_byte_size(shm_->size());
    ASSERT_TRUE(wire_->RegisterHostRegion(reg).ok());
  }

  const ModelShape& model() const { return config_.model; }
  size_t ElemSize() const { return kernels::DTypeSize(model().dtype); }

  // ---- Memory in the shared region ----

  // Bump allocation in the region, reset before each call: returns a byte offset.
  uint64_t Alloc(uint64_t bytes) {
    const uint64_t at = cursor_;
    cursor_ = (cursor_ + bytes + 255) / 256 * 256;
    EXPECT_LE(cursor_, kShmBytes) << "test region too small";
    return at;
  }

  // Stores values into the region in `dtype` and returns what was stored, as double.
  std::vector<double> Store(uint64_t offset, const std::vector<float>& values, DType dtype) {
    std::vector<double> stored(values.size());
    uint8_t* base = shm_->data() + offset;
    for (size_t i = 0; i < values.size(); ++i) {
      kernels::StoreFromFloat(base, static_cast<int64_t>(i), dtype, values[i]);
      stored[i] = kernels::LoadAsFloat(base, static_cast<int64_t>(i), dtype);
    }
    return stored;
  }

  void Poison(uint64_t offset, size_t elems, DType dtype) {
    Store(offset, std::vector<float>(elems, std::numeric_limits<float>::quiet_NaN()), dtype);
  }

  std::vector<double> Load(uint64_t offset, size_t elems, DType dtype) const {
    std::vector<double> out(elems);
    for (size_t i = 0; i < elems; ++i)
      out[i] = kernels::LoadAsFloat(shm_->data() + offset, static_cast<int64_t>(i), dtype);
    return out;
  }

  v1::TensorRef Ref(uint64_t offset, v1::DType dtype, std::vector<uint64_t> shape) const {
    v1::TensorRef ref;
    ref.set_region(kRegion);
    ref.set_offset(offset);
    ref.set_dtype(dtype);
    for (uint64_t d : shape) ref.add_shape(d);
    return ref;
  }

  std::vector<float> Random(size_t n, float range) {
    std::uniform_real_distribution<float> dist(-range, range);
    std::vector<float> out(n);
    for (float& x : out) x = dist(rng_);
    return out;
  }

  BatchInputs RandomInputs(int64_t rows) {
    // q spans a wider range so the softmax is far from uniform.
    return BatchInputs{Random(rows * kQoHeads * kHeadDim, 3.0f),
                       Random(rows * kKvHeads * kHeadDim, 1.0f),
                       Random(rows * kKvHeads * kHeadDim, 1.0f)};
  }

  // ---- Engine calls ----

  void Create(uint64_t id) {
    v1::CreateSequenceRequest req;
    req.set_seq_id(id);
    v1::SequenceInfo info;
    ASSERT_TRUE(Await([&](Engine::Done d) { wire_->CreateSequence(req, &info, std::move(d)); }).ok());
    history_[id] = History();
  }

  absl::Status Release(uint64_t id) {
    v1::ReleaseSequenceRequest req;
    req.set_seq_id(id);
    v1::ReleaseSequenceResponse resp;
    absl::Status s =
        Await([&](Engine::Done d) { wire_->ReleaseSequence(req, &resp, std::move(d)); });
    if (s.ok()) history_.erase(id);
    return s;
  }

  v1::SequenceInfo Fork(uint64_t parent, uint64_t child) {
    v1::ForkSequenceRequest req;
    req.set_parent_id(parent);
    req.set_child_id(child);
    v1::SequenceInfo info;
    EXPECT_TRUE(Await([&](Engine::Done d) { wire_->ForkSequence(req, &info, std::move(d)); }).ok());
    history_[child] = history_[parent];
    return info;
  }

  v1::SequenceInfo Truncate(uint64_t id, uint64_t length) {
    v1::TruncateSequenceRequest req;
    req.set_seq_id(id);
    req.set_length(length);
    v1::SequenceInfo info;
    EXPECT_TRUE(
        Await([&](Engine::Done d) { wire_->TruncateSequence(req, &info, std::move(d)); }).ok());
    history_[id].Truncate(static_cast<int64_t>(length));
    return info;
  }

  v1::SequenceInfo Get(uint64_t id) {
    v1::GetSequenceRequest req;
    req.set_seq_id(id);
    v1::SequenceInfo info;
    EXPECT_TRUE(Await([&](Engine::Done d) { wire_->GetSequence(req, &info, std::move(d)); }).ok());
    return info;
  }

  uint64_t FreePages() const {
    v1::ServerInfo info;
    wire_->GetServerInfo(&info);
    return info.devices(0).free_pages();
  }

  // Appends random K/V for the items at `layer` through Append; records them in the history.
  void Append(uint32_t layer, const std::vector<Item>& items) {
    int64_t rows = 0;
    for (const Item& it : items) rows += it.n;
    cursor_ = 0;
    const size_t kv_elems = rows * kKvHeads * kHeadDim;
    const uint64_t k_off = Alloc(kv_elems * ElemSize());
    const uint64_t v_off = Alloc(kv_elems * ElemSize());
    const std::vector<double> k = Store(k_off, Random(kv_elems, 1.0f), model().dtype);
    const std::vector<double> v = Store(v_off, Random(kv_elems, 1.0f), model().dtype);
    v1::AppendRequest req;
    req.set_layer(layer);
    for (const Item& it : items) {
      v1::BatchItem* b = req.add_items();
      b->set_seq_id(it.id);
      b->set_num_new_tokens(static_cast<uint32_t>(it.n));
    }
    const v1::DType wire = wire::ToWire(model().dtype);
    const std::vector<uint64_t> shape = {static_cast<uint64_t>(rows), kKvHeads, kHeadDim};
    *req.mutable_k_new() = Ref(k_off, wire, shape);
    *req.mutable_v_new() = Ref(v_off, wire, shape);
    v1::AppendResponse resp;
    const absl::Status s = Await([&](Engine::Done d) { wire_->Append(req, &resp, std::move(d)); });
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_EQ(resp.lengths_size(), static_cast<int>(items.size()));
    int64_t row = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      History& h = history_[items[i].id];
      const size_t from = row * kKvHeads * kHeadDim;
      const size_t to = (row + items[i].n) * kKvHeads * kHeadDim;
      h.k[layer].insert(h.k[layer].end(), k.begin() + from, k.begin() + to);
      h.v[layer].insert(h.v[layer].end(), v.begin() + from, v.begin() + to);
      EXPECT_EQ(resp.lengths(static_cast<int>(i)), static_cast<uint64_t>(h.Length(layer)));
      row += items[i].n;
    }
  }

  // Sends a Prefill (or Decode) of `items` at `layer`, with random inputs or `given` ones, and
  // checks every item's output (and lse) against the dense reference of its own history.
  Outputs Attend(bool decode, uint32_t layer, const std::vector<Item>& items, bool with_lse,
                 const BatchInputs* given = nullptr) {
    SCOPED_TRACE(absl::StrCat(decode ? "Decode" : "Prefill", " layer ", layer, " (seed ", seed_,
                              ")"));
    int64_t rows = 0;
    for (const Item& it : items) rows += it.n;
    const BatchInputs inputs = given != nullptr ? *given : RandomInputs(rows);
    const DType dtype = model().dtype;
    const size_t q_elems = rows * kQoHeads * kHeadDim;
    const size_t kv_elems = rows * kKvHeads * kHeadDim;
    cursor_ = 0;
    const uint64_t q_off = Alloc(q_elems * ElemSize());
    const uint64_t k_off = Alloc(kv_elems * ElemSize());
    const uint64_t v_off = Alloc(kv_elems * ElemSize());
    const uint64_t out_off = Alloc(q_elems * ElemSize());
    const uint64_t lse_off = Alloc(rows * kQoHeads * sizeof(float));
    const std::vector<double> q = Store(q_off, inputs.q, dtype);
    const std::vector<double> k = Store(k_off, inputs.k, dtype);
    const std::vector<double> v = Store(v_off, inputs.v, dtype);
    Poison(out_off, q_elems, dtype);
    Poison(lse_off, rows * kQoHeads, DType::kFloat32);

    v1::AttentionRequest req;
    req.set_layer(layer);
    for (const Item& it : items) {
      v1::BatchItem* b = req.add_items();
      b->set_seq_id(it.id);
      b->set_num_new_tokens(static_cast<uint32_t>(it.n));
    }
    const v1::DType wire = wire::ToWire(dtype);
    const uint64_t r = static_cast<uint64_t>(rows);
    *req.mutable_q() = Ref(q_off, wire, {r, kQoHeads, kHeadDim});
    *req.mutable_k_new() = Ref(k_off, wire, {r, kKvHeads, kHeadDim});
    *req.mutable_v_new() = Ref(v_off, wire, {r, kKvHeads, kHeadDim});
    *req.mutable_out() = Ref(out_off, wire, {r, kQoHeads, kHeadDim});
    if (with_lse) *req.mutable_lse() = Ref(lse_off, v1::DTYPE_FLOAT32, {r, kQoHeads});
    v1::AttentionResponse resp;
    const absl::Status s = Await([&](Engine::Done d) {
      if (decode) {
        wire_->Decode(req, &resp, std::move(d), trace_);
      } else {
        wire_->Prefill(req, &resp, std::move(d), trace_);
      }
    });
    Outputs outputs;
    EXPECT_TRUE(s.ok()) << s;
    if (!s.ok()) return outputs;
    EXPECT_EQ(resp.lengths_size(), static_cast<int>(items.size()));

    const std::vector<double> out = Load(out_off, q_elems, dtype);
    const std::vector<double> lse = Load(lse_off, rows * kQoHeads, DType::kFloat32);
    int64_t row = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      const Item& it = items[i];
      SCOPED_TRACE(absl::StrCat("item ", i, " (seq ", it.id, ", ", it.n, " new tokens)"));
      History& h = history_[it.id];
      const size_t kv_from = row * kKvHeads * kHeadDim;
      const size_t kv_to = (row + it.n) * kKvHeads * kHeadDim;
      h.k[layer].insert(h.k[layer].end(), k.begin() + kv_from, k.begin() + kv_to);
      h.v[layer].insert(h.v[layer].end(), v.begin() + kv_from, v.begin() + kv_to);
      if (i < static_cast<size_t>(resp.lengths_size())) {
        EXPECT_EQ(resp.lengths(static_cast<int>(i)), static_cast<uint64_t>(h.Length(layer)));
      }

      std::vector<double> ref, ref_lse;
      DenseReference(h, layer, it.n, q.data() + row * kQoHeads * kHeadDim, model(), &ref,
                     &ref_lse);
      const double* got = out.data() + row * kQoHeads * kHeadDim;
      double err = 0, norm = 0;
      bool finite = true;
      for (size_t x = 0; x < ref.size(); ++x) {
        finite = finite && std::isfinite(got[x]);
        err += (got[x] - ref[x]) * (got[x] - ref[x]);
        norm += ref[x] * ref[x];
      }
      EXPECT_TRUE(finite) << "out holds NaN/inf: rows not written?";
      EXPECT_LT(std::sqrt(err / norm), GetParam().tolerance)
          << "||out - ref|| / ||ref|| at kv_len " << h.Length(layer);
      const uint8_t* raw = shm_->data() + out_off + row * kQoHeads * kHeadDim * ElemSize();
      outputs.out.emplace_back(raw, raw + it.n * kQoHeads * kHeadDim * ElemSize());
      std::vector<float> item_lse;
      for (int64_t x = 0; x < it.n * kQoHeads; ++x) {
        const double got_lse = lse[row * kQoHeads + x];
        if (with_lse) {
          EXPECT_NEAR(got_lse, ref_lse[x], 1e-4 * std::max(1.0, std::fabs(ref_lse[x])))
              << "lse row " << x / kQoHeads << " head " << x % kQoHeads;
        } else {
          EXPECT_TRUE(std::isnan(got_lse)) << "lse written though not asked for";
        }
        item_lse.push_back(static_cast<float>(got_lse));
      }
      outputs.lse.push_back(std::move(item_lse));
      row += it.n;
    }
    return outputs;
  }

  Outputs Prefill(uint32_t layer, const std::vector<Item>& items, bool with_lse = true) {
    return Attend(false, layer, items, with_lse);
  }
  Outputs Decode(uint32_t layer, const std::vector<uint64_t>& ids, bool with_lse = true) {
    std::vector<Item> items;
    for (uint64_t id : ids) items.push_back({id, 1});
    return Attend(true, layer, items, with_lse);
  }
  // Prefills every layer.
  void PrefillAll(const std::vector<Item>& items) {
    for (uint32_t layer = 0; layer < kLayers; ++layer) Prefill(layer, items);
  }
  void DecodeAll(const std::vector<uint64_t>& ids) {
    for (uint32_t layer = 0; layer < kLayers; ++layer) Decode(layer, ids);
  }

  // Leaves holes in the free list so new sequences get scattered, non-contiguous pages.
  void FragmentPool() {
    for (uint64_t id = 1000; id < 1008; ++id) Create(id);
    std::vector<Item> fillers;
    for (uint64_t id = 1000; id < 1008; ++id) fillers.push_back({id, model().page_size});
    Append(0, fillers);
    for (uint64_t id = 1000; id < 1008; id += 2) ASSERT_TRUE(Release(id).ok());
  }

  void ExpectLengths(uint64_t id, int64_t len0, int64_t len1) {
    const v1::SequenceInfo info = Get(id);
    ASSERT_EQ(info.layer_lengths_size(), kLayers);
    EXPECT_EQ(info.layer_lengths(0), static_cast<uint64_t>(len0)) << "seq " << id;
    EXPECT_EQ(info.layer_lengths(1), static_cast<uint64_t>(len1)) << "seq " << id;
  }

  int64_t PagesFor(int64_t tokens) const {
    return (tokens + model().page_size - 1) / model().page_size;
  }

  uint32_t seed_ = 0;
  std::mt19937 rng_;
  std::unique_ptr<ShmObject> shm_;
  ServerConfig config_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<WireEngine> wire_;  // over engine_
  std::map<uint64_t, History> history_;
  uint64_t cursor_ = 0;
  RequestTrace* trace_ = nullptr;  // passed with every Prefill and Decode when set
};

// ---- Prefill and decode ----

TEST_P(EngineTest, PrefillOfSequencesOfDifferentLengthsThenDecodeStepsMatchTheReference) {
  FragmentPool();
  for (uint64_t id = 1; id <= 4; ++id) Create(id);
  // Not multiples of the page size (except where the page size is 1), and a single token.
  PrefillAll({{1, 1}, {2, 7}, {3, 19}, {4, 37}});
  ExpectLengths(4, 37, 37);
  std::vector<uint64_t> ids = {1, 2, 3, 4};
  for (int step = 0; step < 4; ++step) {
    SCOPED_TRACE(absl::StrCat("decode step ", step));
    std::shuffle(ids.begin(), ids.end(), rng_);
    DecodeAll(ids);
  }
  ExpectLengths(1, 5, 5);
  ExpectLengths(3, 23, 23);
}

TEST_P(EngineTest, ChunkedPrefillMixingLongChunksAndSingleTokensMatchesTheReference) {
  FragmentPool();
  for (uint64_t id = 1; id <= 4; ++id) Create(id);
  PrefillAll({{1, 3}, {2, 1}, {3, 11}, {4, 2}});
  PrefillAll({{3, 1}, {1, 22}, {4, 1}, {2, 9}});
  PrefillAll({{2, 1}, {4, 30}});
  DecodeAll({4, 3, 2, 1});
  ExpectLengths(1, 26, 26);
  ExpectLengths(4, 34, 34);
}

TEST_P(EngineTest, LayersKeepIndependentLengthsAndKv) {
  FragmentPool();
  Create(1);
  Create(2);
  Prefill(0, {{1, 13}, {2, 5}});
  Prefill(0, {{1, 4}});
  Prefill(1, {{2, 21}, {1, 2}});
  ExpectLengths(1, 17, 2);
  ExpectLengths(2, 5, 21);
  Decode(1, {1, 2});
  Decode(0, {2, 1});
  Decode(1, {1});
  ExpectLengths(1, 18, 4);
}

TEST_P(EngineTest, LseIsTheNaturalLogOfTheSoftmaxDenominatorAndOnlyWrittenWhenAsked) {
  FragmentPool();
  Create(1);
  Create(2);
  // Attend checks lse against the reference when asked, and that it stays NaN when not.
  Attend(false, 0, {{1, 9}, {2, 1}}, /*with_lse=*/true);
  Attend(false, 0, {{1, 3}, {2, 17}}, /*with_lse=*/false);
  Attend(true, 0, {{2, 1}, {1, 1}}, /*with_lse=*/true);
  Attend(true, 0, {{1, 1}, {2, 1}}, /*with_lse=*/false);
}

// ---- Fork ----

TEST_P(EngineTest, ForkThenDifferentContinuationsInParentAndChildEachMatchTheirOwnHistory) {
  FragmentPool();
  Create(1);
  PrefillAll({{1, 19}});
  const uint64_t free_before = FreePages();
  const v1::SequenceInfo child = Fork(1, 2);
  EXPECT_EQ(FreePages(), free_before);  // a fork takes no page
  EXPECT_EQ(child.layer_lengths(0), 19u);
  EXPECT_EQ(child.num_pages(), static_cast<uint64_t>(PagesFor(19)));
  EXPECT_EQ(child.shared_pages(), child.num_pages());
  // Parent and child both write into their shared partial page in one batch, then diverge.
  for (int step = 0; step < 3; ++step) DecodeAll({1, 2});
  Prefill(0, {{2, 6}});
  Prefill(1, {{2, 6}});
  DecodeAll({2, 1});
  // Only the pages that were full at the fork stay shared.
  EXPECT_EQ(Get(1).shared_pages(), static_cast<uint64_t>(19 / model().page_size));
  EXPECT_EQ(Get(2).shared_pages(), static_cast<uint64_t>(19 / model().page_size));
  ExpectLengths(1, 23, 23);
  ExpectLengths(2, 29, 29);
}

TEST_P(EngineTest, ReleasingTheParentLeavesTheForkIntact) {
  FragmentPool();
  Create(1);
  PrefillAll({{1, 21}});
  Fork(1, 2);
  DecodeAll({1});
  ASSERT_TRUE(Release(1).ok());
  EXPECT_EQ(Get(2).shared_pages(), 0u);
  DecodeAll({2});
  Prefill(0, {{2, 5}});
}

// ---- Truncate ----

TEST_P(EngineTest, TruncateThenDecodeMatchesTheTruncatedHistory) {
  FragmentPool();
  Create(1);
  Create(2);
  PrefillAll({{1, 37}, {2, 9}});
  const uint64_t free_before = FreePages();
  const v1::SequenceInfo info = Truncate(1, 20);
  EXPECT_EQ(info.layer_lengths(0), 20u);
  EXPECT_EQ(info.layer_lengths(1), 20u);
  EXPECT_EQ(info.num_pages(), static_cast<uint64_t>(PagesFor(20)));
  EXPECT_EQ(FreePages(), free_before + (PagesFor(37) - PagesFor(20)));
  for (int step = 0; step < 3; ++step) DecodeAll({2, 1});
  Prefill(0, {{1, 4}});
  Prefill(1, {{1, 4}});
  // Back to a single token, then grow again.
  Truncate(1, 1);
  DecodeAll({1, 2});
  ExpectLengths(1, 2, 2);
}

TEST_P(EngineTest, TruncateOfAForkLeavesTheParentIntact) {
  FragmentPool();
  Create(1);
  PrefillAll({{1, 30}});
  Fork(1, 2);
  Truncate(2, 11);
  DecodeAll({1, 2});
  Prefill(0, {{2, 13}, {1, 2}});
  Prefill(1, {{1, 2}, {2, 13}});
  DecodeAll({2, 1});
}

// ---- Append-only import ----

TEST_P(EngineTest, AppendOnlyImportThenDecodeMatchesTheReference) {
  FragmentPool();
  Create(1);
  Create(2);
  for (uint32_t layer = 0; layer < kLayers; ++layer) Append(layer, {{1, 23}, {2, 1}});
  Append(0, {{2, 17}});
  Append(1, {{2, 17}});
  ExpectLengths(1, 23, 23);
  ExpectLengths(2, 18, 18);
  for (int step = 0; step < 3; ++step) DecodeAll({1, 2});
  Prefill(0, {{1, 5}});
}

// ---- KV export / import ----

TEST_P(EngineTest, ExportByHeadRangeThenImportIntoANewSequenceDecodesBitwiseEqual) {
  FragmentPool();
  Create(1);
  constexpr uint64_t kTokens = 21;
  PrefillAll({{1, kTokens}});

  // Export heads [0, 1) and [1, 2) of every layer into two buffers.
  cursor_ = 0;
  const size_t per_head = kLayers * 2 * kTokens * 1 * kHeadDim;
  const uint64_t buf[2] = {Alloc(per_head * ElemSize()), Alloc(per_head * ElemSize())};
  const v1::DType wire = wire::ToWire(model().dtype);
  const std::vector<uint64_t> shape = {kLayers, 2, kTokens, 1, kHeadDim};
  for (uint32_t head = 0; head < 2; ++head) {
    Poison(buf[head], per_head, model().dtype);
    v1::ExportKvRequest req;
    req.set_seq_id(1);
    req.set_layer_begin(0);
    req.set_layer_end(kLayers);
    req.set_head_begin(head);
    req.set_head_end(head + 1);
    req.set_num_tokens(kTokens);
    *req.mutable_dst() = Ref(buf[head], wire, shape);
    v1::ExportKvResponse resp;
    ASSERT_TRUE(Await([&](Engine::Done d) { wire_->ExportKv(req, &resp, std::move(d)); }).ok());
    // The buffer is [layer][K, V][token][head][dim] of exactly what was fed in.
    const std::vector<double> got = Load(buf[head], per_head, model().dtype);
    const History& h = history_[1];
    size_t at = 0;
    for (int64_t l = 0; l < kLayers; ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        const std::vector<double>& src = kv == 0 ? h.k[l] : h.v[l];
        for (uint64_t t = 0; t < kTokens; ++t) {
          for (int64_t x = 0; x < kHeadDim; ++x, ++at) {
            ASSERT_EQ(got[at], src[(t * kKvHeads + head) * kHeadDim + x])
                << "head " << head << " layer " << l << (kv ? " V" : " K") << " token " << t
                << " dim " << x;
          }
        }
      }
    }
  }

  // Import both head ranges into a new sequence.
  Create(2);
  const uint64_t free_before = FreePages();
  for (uint32_t head = 0; head < 2; ++head) {
    v1::ImportKvRequest req;
    req.set_seq_id(2);
    req.set_layer_begin(0);
    req.set_layer_end(kLayers);
    req.set_head_begin(head);
    req.set_head_end(head + 1);
    req.set_num_tokens(kTokens);
    *req.mutable_src() = Ref(buf[head], wire, shape);
    v1::ImportKvResponse resp;
    const absl::Status s =
        Await([&](Engine::Done d) { wire_->ImportKv(req, &resp, std::move(d)); });
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_EQ(resp.layer_lengths_size(), kLayers);
    for (int l = 0; l < kLayers; ++l) EXPECT_EQ(resp.layer_lengths(l), kTokens);
  }
  history_[2] = history_[1];
  ExpectLengths(2, kTokens, kTokens);
  EXPECT_EQ(FreePages(), free_before - PagesFor(kTokens));
  EXPECT_EQ(Get(2).shared_pages(), 0u);

  // The same q, k, v for both sequences in one batch: bitwise the same outputs.
  for (int step = 0; step < 3; ++step) {
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      const BatchInputs one = RandomInputs(1);
      auto twice = [](const std::vector<float>& x) {
        std::vector<float> y = x;
        y.insert(y.end(), x.begin(), x.end());
        return y;
      };
      const BatchInputs both{twice(one.q), twice(one.k), twice(one.v)};
      const Outputs o = Attend(true, layer, {{1, 1}, {2, 1}}, true, &both);
      ASSERT_EQ(o.out.size(), 2u);
      EXPECT_EQ(o.out[0], o.out[1]) << "step " << step << " layer " << layer;
      EXPECT_EQ(o.lse[0], o.lse[1]) << "step " << step << " layer " << layer;
    }
  }
}

TEST_P(EngineTest, ImportIntoAForkRewritesOnlyTheForksHeadsAndLeavesTheParentIntact) {
  FragmentPool();
  Create(1);
  constexpr uint64_t kTokens = 19;
  PrefillAll({{1, kTokens}});
  Fork(1, 2);
  // New K/V for kv head 1 of layer 0 only, into the child, whose pages are all shared.
  cursor_ = 0;
  const size_t elems = 1 * 2 * kTokens * 1 * kHeadDim;
  const uint64_t buf = Alloc(elems * ElemSize());
  const std::vector<double> fresh = Store(buf, Random(elems, 1.0f), model().dtype);
  v1::ImportKvRequest req;
  req.set_seq_id(2);
  req.set_layer_begin(0);
  req.set_layer_end(1);
  req.set_head_begin(1);
  req.set_head_end(2);
  req.set_num_tokens(kTokens);
  *req.mutable_src() = Ref(buf, wire::ToWire(model().dtype), {1, 2, kTokens, 1, kHeadDim});
  v1::ImportKvResponse resp;
  const absl::Status s = Await([&](Engine::Done d) { wire_->ImportKv(req, &resp, std::move(d)); });
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(Get(2).shared_pages(), 0u);  // every page it wrote was copied first
  History& child = history_[2];
  for (int kv = 0; kv < 2; ++kv) {
    std::vector<double>& dst = kv == 0 ? child.k[0] : child.v[0];
    for (uint64_t t = 0; t < kTokens; ++t) {
      for (int64_t x = 0; x < kHeadDim; ++x)
        dst[(t * kKvHeads + 1) * kHeadDim + x] = fresh[(kv * kTokens + t) * kHeadDim + x];
    }
  }
  DecodeAll({1, 2});
  DecodeAll({2, 1});
}

TEST_P(EngineTest, ImportOfEveryLayerIntoAnEmptySequenceNeedsItsPagesOnlyOnce) {
  // Room for exactly two copies of the sequence: the source and the imported one.
  constexpr uint64_t kTokens = 21;
  StartEngine(2 * PagesFor(kTokens));
  Create(1);
  PrefillAll({{1, kTokens}});
  ASSERT_EQ(FreePages(), static_cast<uint64_t>(PagesFor(kTokens)));
  cursor_ = 0;
  const size_t elems = kLayers * 2 * kTokens * kKvHeads * kHeadDim;
  const uint64_t buf = Alloc(elems * ElemSize());
  const v1::DType wire = wire::ToWire(model().dtype);
  const std::vector<uint64_t> shape = {kLayers, 2, kTokens, kKvHeads, kHeadDim};
  v1::ExportKvRequest ex;
  ex.set_seq_id(1);
  ex.set_layer_end(kLayers);
  ex.set_head_end(kKvHeads);
  ex.set_num_tokens(kTokens);
  *ex.mutable_dst() = Ref(buf, wire, shape);
  v1::ExportKvResponse ex_resp;
  ASSERT_TRUE(Await([&](Engine::Done d) { wire_->ExportKv(ex, &ex_resp, std::move(d)); }).ok());

  Create(2);
  v1::ImportKvRequest im;
  im.set_seq_id(2);
  im.set_layer_end(kLayers);
  im.set_head_end(kKvHeads);
  im.set_num_tokens(kTokens);
  *im.mutable_src() = Ref(buf, wire, shape);
  v1::ImportKvResponse im_resp;
  const absl::Status s = Await([&](Engine::Done d) { wire_->ImportKv(im, &im_resp, std::move(d)); });
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(FreePages(), 0u);
  history_[2] = history_[1];
  Truncate(2, kTokens - 1);  // make room for one decode step without a new page
  Truncate(1, kTokens - 1);
  DecodeAll({1, 2});
}

// ---- All or nothing ----

// Each test fills a small pool so that the first item of a batch would fit alone and the second
// does not, then checks that the rejected batch changed no sequence, no page count, no output
// and no K/V.
TEST_P(EngineTest, OutOfPagesInAPrefillBatchGrowsNoSequence) {
  StartEngine(6);
  const int64_t ps = model().page_size;
  Create(1);
  Create(2);
  PrefillAll({{1, ps}, {2, 1}});  // one page each, 4 free
  ASSERT_EQ(FreePages(), 4u);
  const v1::SequenceInfo a = Get(1), b = Get(2);

  // Item 0 needs 1 new page (fits alone); item 1 needs 5 (does not): nothing happens.
  cursor_ = 0;
  const int64_t rows = ps + 5 * ps;
  const uint64_t q_off = Alloc(rows * kQoHeads * kHeadDim * ElemSize());
  const uint64_t k_off = Alloc(rows * kKvHeads * kHeadDim * ElemSize());
  const uint64_t v_off = Alloc(rows * kKvHeads * kHeadDim * ElemSize());
  const uint64_t out_off = Alloc(rows * kQoHeads * kHeadDim * ElemSize());
  Store(q_off, Random(rows * kQoHeads * kHeadDim, 1.0f), model().dtype);
  Store(k_off, Random(rows * kKvHeads * kHeadDim, 1.0f), model().dtype);
  Store(v_off, Random(rows * kKvHeads * kHeadDim, 1.0f), model().dtype);
  Poison(out_off, rows * kQoHeads * kHeadDim, model().dtype);
  v1::AttentionRequest req;
  req.set_layer(0);
  v1::BatchItem* i0 = req.add_items();
  i0->set_seq_id(1);
  i0->set_num_new_tokens(static_cast<uint32_t>(ps));
  v1::BatchItem* i1 = req.add_items();
  i1->set_seq_id(2);
  i1->set_num_new_tokens(static_cast<uint32_t>(5 * ps));
  const v1::DType wire = wire::ToWire(model().dtype);
  const uint64_t r = static_cast<uint64_t>(rows);
  *req.mutable_q() = Ref(q_off, wire, {r, kQoHeads, kHeadDim});
  *req.mutable_k_new() = Ref(k_off, wire, {r, kKvHeads, kHeadDim});
  *req.mutable_v_new() = Ref(v_off, wire, {r, kKvHeads, kHeadDim});
  *req.mutable_out() = Ref(out_off, wire, {r, kQoHeads, kHeadDim});
  v1::AttentionResponse resp;
  const absl::Status s = Await([&](Engine::Done d) { wire_->Prefill(req, &resp, std::move(d)); });
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;

  EXPECT_EQ(Get(1).DebugString(), a.DebugString());
  EXPECT_EQ(Get(2).DebugString(), b.DebugString());
  EXPECT_EQ(FreePages(), 4u);
  EXPECT_EQ(resp.lengths_size(), 0);
  const std::vector<double> out = Load(out_off, rows * kQoHeads * kHeadDim, model().dtype);
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](double x) { return std::isnan(x); }))
      << "a rejected request wrote outputs";
  // The pool's K/V are untouched: both sequences still attend over exactly their history.
  DecodeAll({1, 2});
}

TEST_P(EngineTest, OutOfPagesInADecodeBatchGrowsNoSequence) {
  StartEngine(5);
  const int64_t ps = model().page_size;
  Create(1);
  Create(2);
  Create(3);
  PrefillAll({{1, ps}, {2, ps}, {3, 2 * ps}});  // every page full; 1 free
  ASSERT_EQ(FreePages(), 1u);
  const v1::SequenceInfo a = Get(1), b = Get(2);

  cursor_ = 0;
  const uint64_t q_off = Alloc(2 * kQoHeads * kHeadDim * ElemSize());
  const uint64_t k_off = Alloc(2 * kKvHeads * kHeadDim * ElemSize());
  const uint64_t v_off = Alloc(2 * kKvHeads * kHeadDim * ElemSize());
  const uint64_t out_off = Alloc(2 * kQoHeads * kHeadDim * ElemSize());
  Poison(out_off, 2 * kQoHeads * kHeadDim, model().dtype);
  v1::AttentionRequest req;
  req.set_layer(1);
  for (uint64_t id : {1, 2}) {
    v1::BatchItem* item = req.add_items();
    item->set_seq_id(id);
    item->set_num_new_tokens(1);
  }
  const v1::DType wire = wire::ToWire(model().dtype);
  *req.mutable_q() = Ref(q_off, wire, {2, kQoHeads, kHeadDim});
  *req.mutable_k_new() = Ref(k_off, wire, {2, kKvHeads, kHeadDim});
  *req.mutable_v_new() = Ref(v_off, wire, {2, kKvHeads, kHeadDim});
  *req.mutable_out() = Ref(out_off, wire, {2, kQoHeads, kHeadDim});
  v1::AttentionResponse resp;
  const absl::Status s = Await([&](Engine::Done d) { wire_->Decode(req, &resp, std::move(d)); });
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_EQ(Get(1).DebugString(), a.DebugString());
  EXPECT_EQ(Get(2).DebugString(), b.DebugString());
  EXPECT_EQ(FreePages(), 1u);
  const std::vector<double> out = Load(out_off, 2 * kQoHeads * kHeadDim, model().dtype);
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](double x) { return std::isnan(x); }))
      << "a rejected request wrote outputs";
  // Each alone fits.
  DecodeAll({1});
  ASSERT_TRUE(Release(3).ok());
  DecodeAll({2});
}

TEST_P(EngineTest, OutOfPagesInAnAppendBatchGrowsNoSequence) {
  StartEngine(4);
  const int64_t ps = model().page_size;
  Create(1);
  Create(2);
  Append(0, {{1, 1}, {2, ps}});
  ASSERT_EQ(FreePages(), 2u);
  const v1::SequenceInfo a = Get(1), b = Get(2);
  cursor_ = 0;
  const int64_t rows = 1 + 3 * ps;
  const uint64_t k_off = Alloc(rows * kKvHeads * kHeadDim * ElemSize());
  const uint64_t v_off = Alloc(rows * kKvHeads * kHeadDim * ElemSize());
  v1::AppendRequest req;
  v1::BatchItem* i0 = req.add_items();
  i0->set_seq_id(1);
  i0->set_num_new_tokens(1);  // fits in its partial page (or one new page when ps == 1)
  v1::BatchItem* i1 = req.add_items();
  i1->set_seq_id(2);
  i1->set_num_new_tokens(static_cast<uint32_t>(3 * ps));  // needs 3 pages
  const v1::DType wire = wire::ToWire(model().dtype);
  const uint64_t r = static_cast<uint64_t>(rows);
  *req.mutable_k_new() = Ref(k_off, wire, {r, kKvHeads, kHeadDim});
  *req.mutable_v_new() = Ref(v_off, wire, {r, kKvHeads, kHeadDim});
  v1::AppendResponse resp;
  const absl::Status s = Await([&](Engine::Done d) { wire_->Append(req, &resp, std::move(d)); });
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_EQ(Get(1).DebugString(), a.DebugString());
  EXPECT_EQ(Get(2).DebugString(), b.DebugString());
  EXPECT_EQ(FreePages(), 2u);
  DecodeAll({1, 2});
}

// ---- Sequences and regions ----

TEST_P(EngineTest, ReleasingEverySequenceReturnsEveryPage) {
  const uint64_t total = FreePages();
  FragmentPool();
  for (uint64_t id = 1; id <= 3; ++id) Create(id);
  PrefillAll({{1, 5}, {2, 40}, {3, 1}});
  Fork(2, 4);
  DecodeAll({4, 2});
  EXPECT_LT(FreePages(), total);
  v1::ListSequencesRequest list_req;
  v1::ListSequencesResponse list;
  ASSERT_TRUE(Await([&](Engine::Done d) { wire_->ListSequences(list_req, &list, std::move(d)); }).ok());
  std::vector<uint64_t> ids;
  for (const v1::SequenceInfo& s : list.sequences()) ids.push_back(s.seq_id());
  for (uint64_t id : ids) ASSERT_TRUE(Release(id).ok()) << id;
  EXPECT_EQ(FreePages(), total);
  v1::ServerInfo info;
  wire_->GetServerInfo(&info);
  EXPECT_EQ(info.devices(0).live_sequences(), 0u);
}

TEST_P(EngineTest, FinishedRequestsHoldNoRegion) {
  Create(1);
  PrefillAll({{1, 3}});
  Decode(0, {1});
  // One more call through the worker, so everything the earlier tasks held is surely gone.
  Get(1);
  v1::ListRegionsResponse regions;
  wire_->ListRegions(&regions);
  ASSERT_EQ(regions.regions_size(), 1);
  EXPECT_EQ(regions.regions(0).name(), kRegion);
  EXPECT_EQ(regions.regions(0).in_flight(), 0u);
  EXPECT_EQ(regions.regions(0).byte_size(), kShmBytes);
  EXPECT_EQ(regions.regions(0).shm_key(), shm_->key());
}

// ---- Stage timing ----

TEST_P(EngineTest, ADataRequestIsStampedAtEveryStageInOrder) {
  Create(1);
  PrefillAll({{1, 3}});
  for (bool decode : {false, true}) {
    RequestTrace trace;
    trace.received = RequestTrace::Clock::now();
    trace_ = &trace;
    Attend(decode, 0, {{1, 1}}, /*with_lse=*/false);
    trace_ = nullptr;
    SCOPED_TRACE(decode ? "Decode" : "Prefill");
    EXPECT_NE(trace.posted, RequestTrace::Clock::time_point{});
    EXPECT_NE(trace.enqueued, RequestTrace::Clock::time_point{});
    EXPECT_LE(trace.received, trace.posted);
    EXPECT_LE(trace.posted, trace.dequeued);
    EXPECT_LE(trace.dequeued, trace.enqueued);
    EXPECT_LE(trace.enqueued, trace.completed);
    // The service stamps these after the engine answered.
    EXPECT_EQ(trace.handed, RequestTrace::Clock::time_point{});
    EXPECT_EQ(trace.written, RequestTrace::Clock::time_point{});
  }
}

TEST_P(EngineTest, ARequestRefusedBeforeTheWorkerLeavesItsTraceUnstamped) {
  v1::AttentionRequest req;  // no items
  v1::AttentionResponse resp;
  RequestTrace trace;
  const absl::Status s =
      Await([&](Engine::Done d) { wire_->Decode(req, &resp, std::move(d), &trace); });
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(trace.posted, RequestTrace::Clock::time_point{});
  EXPECT_EQ(trace.completed, RequestTrace::Clock::time_point{});
}

TEST_P(EngineTest, ARequestRefusedOnTheWorkerIsStampedButNotEnqueued) {
  Create(1);
  PrefillAll({{1, 3}});
  RequestTrace trace;
  trace.received = RequestTrace::Clock::now();
  trace_ = &trace;
  // An unknown sequence: refused by the pool, on the worker, before any backend call.
  cursor_ = 0;
  const uint64_t q = Alloc(kQoHeads * kHeadDim * ElemSize());
  const uint64_t kv = Alloc(kKvHeads * kHeadDim * ElemSize());
  const uint64_t out = Alloc(kQoHeads * kHeadDim * ElemSize());
  v1::AttentionRequest req;
  req.set_layer(0);
  req.add_items()->set_seq_id(99);
  req.mutable_items(0)->set_num_new_tokens(1);
  const v1::DType wire = wire::ToWire(model().dtype);
  *req.mutable_q() = Ref(q, wire, {1, kQoHeads, kHeadDim});
  *req.mutable_k_new() = Ref(kv, wire, {1, kKvHeads, kHeadDim});
  *req.mutable_v_new() = Ref(kv, wire, {1, kKvHeads, kHeadDim});
  *req.mutable_out() = Ref(out, wire, {1, kQoHeads, kHeadDim});
  v1::AttentionResponse resp;
  const absl::Status s =
      Await([&](Engine::Done d) { wire_->Decode(req, &resp, std::move(d), &trace); });
  trace_ = nullptr;
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_NE(trace.dequeued, RequestTrace::Clock::time_point{});
  EXPECT_NE(trace.completed, RequestTrace::Clock::time_point{});
  EXPECT_EQ(trace.enqueued, RequestTrace::Clock::time_point{});
}

TEST_P(EngineTest, DestroyingTheEngineAnswersEveryQueuedCallFirst) {
  Create(1);
  constexpr int kCalls = 64;
  std::vector<v1::SequenceInfo> infos(kCalls);
  std::atomic<int> answered{0}, ok{0};
  v1::GetSequenceRequest req;
  req.set_seq_id(1);
  for (int i = 0; i < kCalls; ++i) {
    wire_->GetSequence(req, &infos[i], [&](absl::Status s) {
      ok += s.ok();
      ++answered;
    });
  }
  engine_.reset();
  EXPECT_EQ(answered.load(), kCalls);
  EXPECT_EQ(ok.load(), kCalls);
  for (const v1::SequenceInfo& info : infos) EXPECT_EQ(info.seq_id(), 1u);
}

INSTANTIATE_TEST_SUITE_P(
    Models, EngineTest,
    ::testing::Values(
        ModelCase{"Bf16Nhd", DType::kBFloat16, KvLayout::kNHD, 16, 0.0f, -1, 1e-2},
        ModelCase{"Fp16Hnd", DType::kFloat16, KvLayout::kHND, 5, 0.0f, -1, 2e-3},
        ModelCase{"Fp32NhdPageSize1", DType::kFloat32, KvLayout::kNHD, 1, 0.0f, -1, 1e-5},
        ModelCase{"Bf16HndSoftCapWindow", DType::kBFloat16, KvLayout::kHND, 8, 1.5f, 6, 1e-2},
        ModelCase{"Fp32HndSoftCapWindow", DType::kFloat32, KvLayout::kHND, 3, 2.0f, 10, 1e-5}),
    [](const ::testing::TestParamInfo<ModelCase>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace attnd
