// The fixture of the engine tests (tests of server/engine/engine.h on the CPU platform, driven in
// process with v1 requests and host regions over real POSIX shared memory). Every attention output
// is compared with a dense fp64 reference computed from the K/V history the test itself fed in (so
// paging, copy-on-write, fork, truncate and import bugs all show up as wrong numbers), by
// ||out - ref|| / ||ref||.
//
// fp8 pools (ModelCase.storage) are compared the same way: the history holds what the pool
// holds, each value quantized with its layer's scales and dequantized (scale * fp8(x / scale)).
//
// Inputs are fresh random values each run (the seed is printed; ATTND_TEST_SEED replays it);
// outputs are poisoned with NaN before each call; the pool is fragmented first so page tables
// are not contiguous by accident; lengths are not multiples of the page size, and include 1.
//
// The suite is instantiated once, in engine_test_fixture.cc, over every model case; the tests
// themselves live in engine_*_test.cc by topic, all linked into the one engine_test executable.
#ifndef ATTND_TESTS_UNIT_ENGINE_TEST_FIXTURE_H_
#define ATTND_TESTS_UNIT_ENGINE_TEST_FIXTURE_H_

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <ostream>
#include <random>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/notification.h"
#include "kernels/cpu_attention.h"
#include "server/config/config.h"
#include "server/engine/engine.h"
#include "server/metrics/metrics.h"
#include "server/wire/convert.h"
#include "tests/unit/unit_test_util.h"

// Not in an anonymous namespace: the TEST_Ps of every engine_*_test.cc must see one and the same
// EngineTest type, or gtest refuses the suite.
namespace attnd::engine_test {

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
  // Calls act for `client` (default: the in-process client).
  explicit WireEngine(Engine* engine, ClientRef client = {}) : engine_(engine), client_(client) {}
  // The same engine, acting for another client.
  WireEngine As(const ClientRef& client) const { return WireEngine(engine_, client); }
  const ClientRef& client() const { return client_; }

  absl::Status RegisterHostRegion(const v1::RegisterHostRegionRequest& req) {
    return engine_->RegisterHostRegion(client_, wire::ToHostRegionSpec(req));
  }
  absl::Status UnregisterRegion(const std::string& name) {
    return engine_->UnregisterRegion(client_, name);
  }
  void GetServerInfo(v1::ServerInfo* info) { wire::FillServerInfo(engine_->Info(), info); }
  void ListRegions(v1::ListRegionsResponse* resp) {
    wire::FillRegions(engine_->ListRegions(client_), resp);
  }
  void CreateSequence(const v1::CreateSequenceRequest& req, v1::SequenceInfo* info, Done done) {
    engine_->CreateSequence(client_, req.device(), req.seq_id(), Sequence(info, std::move(done)));
  }
  void ForkSequence(const v1::ForkSequenceRequest& req, v1::SequenceInfo* info, Done done) {
    engine_->ForkSequence(client_, req.device(), req.parent_id(), req.child_id(),
                          Sequence(info, std::move(done)));
  }
  void TruncateSequence(const v1::TruncateSequenceRequest& req, v1::SequenceInfo* info,
                        Done done) {
    engine_->TruncateSequence(client_, req.device(), req.seq_id(), req.length(),
                              Sequence(info, std::move(done)));
  }
  void GetSequence(const v1::GetSequenceRequest& req, v1::SequenceInfo* info, Done done) {
    engine_->GetSequence(client_, req.device(), req.seq_id(), Sequence(info, std::move(done)));
  }
  void ReleaseSequence(const v1::ReleaseSequenceRequest& req, v1::ReleaseSequenceResponse* resp,
                       Done done) {
    engine_->ReleaseSequence(client_, req.device(), req.seq_id(),
                             [resp, done = std::move(done)](absl::StatusOr<int64_t> r) mutable {
                               if (r.ok()) resp->set_freed_pages(static_cast<uint64_t>(*r));
                               std::move(done)(r.status());
                             });
  }
  void ListSequences(const v1::ListSequencesRequest& req, v1::ListSequencesResponse* resp,
                     Done done) {
    engine_->ListSequences(
        client_, req.device(), [resp, done = std::move(done)](
                          absl::StatusOr<std::vector<SequenceState>> r) mutable {
          if (r.ok())
            for (const SequenceState& s : *r) wire::FillSequenceInfo(s, resp->add_sequences());
          std::move(done)(r.status());
        });
  }
  void Append(const v1::AppendRequest& req, v1::AppendResponse* resp, Done done) {
    AppendCall call = wire::ToAppendCall(req);
    call.client = client_;
    engine_->Append(std::move(call), Lengths(resp, std::move(done)));
  }
  void Prefill(const v1::AttentionRequest& req, v1::AttentionResponse* resp, Done done,
               RequestTrace* trace = nullptr) {
    engine_->Prefill(Attention(req), Lengths(resp, std::move(done)), trace);
  }
  void Decode(const v1::AttentionRequest& req, v1::AttentionResponse* resp, Done done,
              RequestTrace* trace = nullptr) {
    engine_->Decode(Attention(req), Lengths(resp, std::move(done)), trace);
  }
  void ExportKv(const v1::ExportKvRequest& req, v1::ExportKvResponse*, Done done) {
    KvTransferCall call = wire::ToTransferCall(req);
    call.client = client_;
    engine_->ExportKv(std::move(call), std::move(done));
  }
  // Checked by the wire's conversion first, as the handler does.
  void SetKvScales(const v1::SetKvScalesRequest& req, Done done) {
    auto call = wire::ToKvScalesCall(req, engine_->config().model);
    if (!call.ok()) return std::move(done)(call.status());
    engine_->SetKvScales(call->device, call->layer_begin, std::move(call->scales),
                         std::move(done));
  }
  void ImportKv(const v1::ImportKvRequest& req, v1::ImportKvResponse* resp, Done done) {
    KvTransferCall call = wire::ToTransferCall(req);
    call.client = client_;
    engine_->ImportKv(std::move(call), [resp, done = std::move(done)](
                                                     absl::StatusOr<std::vector<int64_t>> r) mutable {
      if (r.ok())
        for (int64_t len : *r) resp->add_layer_lengths(static_cast<uint64_t>(len));
      std::move(done)(r.status());
    });
  }

 private:
  AttentionCall Attention(const v1::AttentionRequest& req) const {
    AttentionCall call = wire::ToAttentionCall(req);
    call.client = client_;
    return call;
  }
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
  ClientRef client_;
};

struct ModelCase {
  const char* name;
  DType dtype;
  KvLayout layout;
  int64_t page_size;
  float soft_cap;
  int64_t window_left;
  double tolerance;  // on ||out - ref|| / ||ref||
  kernels::KvStorage storage = kernels::KvStorage::kModelDType;
};

// Prints a model case by its name in test failures.
void PrintTo(const ModelCase& c, std::ostream* os);

inline constexpr int64_t kLayers = 2;
inline constexpr int64_t kQoHeads = 8;
inline constexpr int64_t kKvHeads = 2;
inline constexpr int64_t kHeadDim = 64;
inline constexpr size_t kShmBytes = 8 << 20;
inline constexpr char kRegion[] = "io";

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
                    const ModelShape& m, std::vector<double>* out, std::vector<double>* lse);

class EngineTest : public ::testing::TestWithParam<ModelCase> {
 protected:
  void SetUp() override;
  void TearDown() override;

  // (Re)starts the engine with a pool of `pages` pages and registers the shared region; an fp8
  // pool starts with kv_scales_.
  void StartEngine(int64_t pages);
  // fp8 pools with per-layer scales: the scales each layer starts with, drawn once per test.
  // Powers of two here, so that export (scale * fp8 in the model dtype) and import (back to fp8)
  // are exact and the tests comparing transferred KV bitwise hold for fp8 pools too.
  virtual std::vector<kernels::KvScales> StartingScales();
  bool fp8() const { return GetParam().storage == kernels::KvStorage::kFp8E4M3; }
  bool per_token() const { return GetParam().storage == kernels::KvStorage::kFp8E4M3PerToken; }
  // What the pool holds for `value` written at `layer` as K (kv 0) or V (kv 1): the value, or
  // for fp8 pools the layer's scale times fp8(value / scale). Not for per-token pools, whose
  // scales depend on the whole row: use the vector form.
  double Held(double value, int64_t layer, int kv) const;
  // The same for rows of kHeadDim values ([rows][kv_heads][head_dim]); for a per-token pool,
  // each row's scale * fp8(value / scale), the scale max |x| / 448 of its row (1 if all zero).
  std::vector<double> Held(const std::vector<double>& values, int64_t layer, int kv) const;
  // `value` rounded to the model dtype (through float, as the backends' exports compute):
  // what ExportKv writes for a held value. Exact for model-dtype and (with power-of-two scales)
  // per-layer pools; a per-token pool's arbitrary scales make scale * fp8 round.
  double Exported(double value) const;
  // SetKvScales through the wire's conversion; on success the history's scales follow.
  absl::Status SetKvScales(uint32_t layer_begin, const std::vector<kernels::KvScales>& scales);

  const ModelShape& model() const { return config_.model; }
  size_t ElemSize() const { return kernels::DTypeSize(model().dtype); }

  // ---- Memory in the shared region ----

  // Bump allocation in the region, reset before each call: returns a byte offset.
  uint64_t Alloc(uint64_t bytes);
  // Stores values into the region in `dtype` and returns what was stored, as double.
  std::vector<double> Store(uint64_t offset, const std::vector<float>& values, DType dtype);
  void Poison(uint64_t offset, size_t elems, DType dtype);
  std::vector<double> Load(uint64_t offset, size_t elems, DType dtype) const;
  v1::TensorRef Ref(uint64_t offset, v1::DType dtype, std::vector<uint64_t> shape) const;
  std::vector<float> Random(size_t n, float range);
  BatchInputs RandomInputs(int64_t rows);

  // ---- Engine calls ----

  void Create(uint64_t id);
  absl::Status Release(uint64_t id);
  v1::SequenceInfo Fork(uint64_t parent, uint64_t child);
  v1::SequenceInfo Truncate(uint64_t id, uint64_t length);
  v1::SequenceInfo Get(uint64_t id);
  uint64_t FreePages() const;

  // Appends random K/V for the items at `layer` through Append; records them in the history.
  void Append(uint32_t layer, const std::vector<Item>& items);

  // Sends a Prefill (or Decode) of `items` at `layer`, with random inputs or `given` ones, and
  // checks every item's output (and lse) against the dense reference of its own history.
  Outputs Attend(bool decode, uint32_t layer, const std::vector<Item>& items, bool with_lse,
                 const BatchInputs* given = nullptr);

  Outputs Prefill(uint32_t layer, const std::vector<Item>& items, bool with_lse = true);
  Outputs Decode(uint32_t layer, const std::vector<uint64_t>& ids, bool with_lse = true);
  // Prefills every layer.
  void PrefillAll(const std::vector<Item>& items);
  void DecodeAll(const std::vector<uint64_t>& ids);

  // Leaves holes in the free list so new sequences get scattered, non-contiguous pages.
  void FragmentPool();

  void ExpectLengths(uint64_t id, int64_t len0, int64_t len1);

  int64_t PagesFor(int64_t tokens) const;

  uint32_t seed_ = 0;
  std::mt19937 rng_;
  std::unique_ptr<ShmObject> shm_;
  ServerConfig config_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<WireEngine> wire_;  // over engine_
  std::map<uint64_t, History> history_;
  std::vector<kernels::KvScales> kv_scales_;  // fp8 pools: every layer's, as the engine's
  uint64_t cursor_ = 0;
  RequestTrace* trace_ = nullptr;  // passed with every Prefill and Decode when set
};

}  // namespace attnd::engine_test

#endif  // ATTND_TESTS_UNIT_ENGINE_TEST_FIXTURE_H_
