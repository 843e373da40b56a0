// The engine tests' fixture (see engine_test_fixture.h): its helpers, the dense fp64 reference,
// and the one instantiation of the EngineTest suite over every model case, which covers the
// TEST_Ps of every engine_*_test.cc linked into engine_test.
#include "tests/unit/engine_test_fixture.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cpu_attention.h"
#include "server/config/config.h"
#include "server/cpu/cpu_platform.h"
#include "server/metrics/metrics.h"
#include "server/wire/convert.h"
#include "spdlog/spdlog.h"
#include "tests/unit/unit_test_util.h"

namespace attnd::engine_test {

void PrintTo(const ModelCase& c, std::ostream* os) { *os << c.name; }

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

void EngineTest::SetUp() {
  spdlog::set_level(spdlog::level::warn);
  seed_ = testing_util::TestSeed();
  rng_.seed(seed_);
  shm_ = std::make_unique<ShmObject>(kShmBytes);
  if (fp8()) kv_scales_ = StartingScales();
  StartEngine(/*pages=*/512);
}

void EngineTest::TearDown() {
  engine_.reset();
  metrics_.reset();
}

void EngineTest::StartEngine(int64_t pages) {
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
  config_.model.kv_storage = c.storage;
  if (fp8()) config_.model.kv_scales = kv_scales_;
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

std::vector<kernels::KvScales> EngineTest::StartingScales() {
  std::uniform_int_distribution<int> exponent(-4, 0);
  std::vector<kernels::KvScales> scales(kLayers);
  for (kernels::KvScales& s : scales)
    s = {std::ldexp(1.0f, exponent(rng_)), std::ldexp(1.0f, exponent(rng_))};
  return scales;
}

double EngineTest::Held(double value, int64_t layer, int kv) const {
  EXPECT_FALSE(per_token()) << "a per-token pool's values are held by rows";
  if (!fp8()) return value;
  const float scale = kv == 0 ? kv_scales_[layer].k : kv_scales_[layer].v;
  uint8_t byte = 0;
  kernels::StoreFromFloat(&byte, 0, DType::kFloat8E4M3, static_cast<float>(value) / scale);
  return static_cast<double>(scale * kernels::LoadAsFloat(&byte, 0, DType::kFloat8E4M3));
}

std::vector<double> EngineTest::Held(const std::vector<double>& values, int64_t layer,
                                     int kv) const {
  std::vector<double> held(values.size());
  if (!per_token()) {
    for (size_t i = 0; i < values.size(); ++i) held[i] = Held(values[i], layer, kv);
    return held;
  }
  // The per-token rule, row by row (the values are already the model dtype's, exact in float).
  for (size_t row = 0; row < values.size(); row += kHeadDim) {
    float amax = 0.0f;
    for (int64_t x = 0; x < kHeadDim; ++x)
      amax = std::max(amax, std::fabs(static_cast<float>(values[row + x])));
    const float scale = amax > 0.0f ? amax / 448.0f : 1.0f;
    for (int64_t x = 0; x < kHeadDim; ++x) {
      uint8_t byte = 0;
      kernels::StoreFromFloat(&byte, 0, DType::kFloat8E4M3,
                              static_cast<float>(values[row + x]) / scale);
      held[row + x] = static_cast<double>(scale) *
                      static_cast<double>(kernels::LoadAsFloat(&byte, 0, DType::kFloat8E4M3));
    }
  }
  return held;
}

double EngineTest::Exported(double value) const {
  uint32_t bits = 0;  // room for any model dtype
  kernels::StoreFromFloat(&bits, 0, model().dtype, static_cast<float>(value));
  return kernels::LoadAsFloat(&bits, 0, model().dtype);
}

absl::Status EngineTest::SetKvScales(uint32_t layer_begin,
                                     const std::vector<kernels::KvScales>& scales) {
  v1::SetKvScalesRequest req;
  req.set_layer_begin(layer_begin);
  for (const kernels::KvScales& s : scales) {
    req.add_k_scales(s.k);
    req.add_v_scales(s.v);
  }
  absl::Status status = Await([&](Engine::Done d) { wire_->SetKvScales(req, std::move(d)); });
  if (status.ok())
    std::copy(scales.begin(), scales.end(), kv_scales_.begin() + layer_begin);
  return status;
}

uint64_t EngineTest::Alloc(uint64_t bytes) {
  const uint64_t at = cursor_;
  cursor_ = (cursor_ + bytes + 255) / 256 * 256;
  EXPECT_LE(cursor_, kShmBytes) << "test region too small";
  return at;
}

std::vector<double> EngineTest::Store(uint64_t offset, const std::vector<float>& values,
                                      DType dtype) {
  std::vector<double> stored(values.size());
  uint8_t* base = shm_->data() + offset;
  for (size_t i = 0; i < values.size(); ++i) {
    kernels::StoreFromFloat(base, static_cast<int64_t>(i), dtype, values[i]);
    stored[i] = kernels::LoadAsFloat(base, static_cast<int64_t>(i), dtype);
  }
  return stored;
}

void EngineTest::Poison(uint64_t offset, size_t elems, DType dtype) {
  Store(offset, std::vector<float>(elems, std::numeric_limits<float>::quiet_NaN()), dtype);
}

std::vector<double> EngineTest::Load(uint64_t offset, size_t elems, DType dtype) const {
  std::vector<double> out(elems);
  for (size_t i = 0; i < elems; ++i)
    out[i] = kernels::LoadAsFloat(shm_->data() + offset, static_cast<int64_t>(i), dtype);
  return out;
}

v1::TensorRef EngineTest::Ref(uint64_t offset, v1::DType dtype, std::vector<uint64_t> shape) const {
  v1::TensorRef ref;
  ref.set_region(kRegion);
  ref.set_offset(offset);
  ref.set_dtype(dtype);
  for (uint64_t d : shape) ref.add_shape(d);
  return ref;
}

std::vector<float> EngineTest::Random(size_t n, float range) {
  std::uniform_real_distribution<float> dist(-range, range);
  std::vector<float> out(n);
  for (float& x : out) x = dist(rng_);
  return out;
}

BatchInputs EngineTest::RandomInputs(int64_t rows) {
  // q spans a wider range so the softmax is far from uniform.
  return BatchInputs{Random(rows * kQoHeads * kHeadDim, 3.0f),
                     Random(rows * kKvHeads * kHeadDim, 1.0f),
                     Random(rows * kKvHeads * kHeadDim, 1.0f)};
}

void EngineTest::Create(uint64_t id) {
  v1::CreateSequenceRequest req;
  req.set_seq_id(id);
  v1::SequenceInfo info;
  ASSERT_TRUE(Await([&](Engine::Done d) { wire_->CreateSequence(req, &info, std::move(d)); }).ok());
  history_[id] = History();
}

absl::Status EngineTest::Release(uint64_t id) {
  v1::ReleaseSequenceRequest req;
  req.set_seq_id(id);
  v1::ReleaseSequenceResponse resp;
  absl::Status s =
      Await([&](Engine::Done d) { wire_->ReleaseSequence(req, &resp, std::move(d)); });
  if (s.ok()) history_.erase(id);
  return s;
}

v1::SequenceInfo EngineTest::Fork(uint64_t parent, uint64_t child) {
  v1::ForkSequenceRequest req;
  req.set_parent_id(parent);
  req.set_child_id(child);
  v1::SequenceInfo info;
  EXPECT_TRUE(Await([&](Engine::Done d) { wire_->ForkSequence(req, &info, std::move(d)); }).ok());
  history_[child] = history_[parent];
  return info;
}

v1::SequenceInfo EngineTest::Truncate(uint64_t id, uint64_t length) {
  v1::TruncateSequenceRequest req;
  req.set_seq_id(id);
  req.set_length(length);
  v1::SequenceInfo info;
  EXPECT_TRUE(
      Await([&](Engine::Done d) { wire_->TruncateSequence(req, &info, std::move(d)); }).ok());
  history_[id].Truncate(static_cast<int64_t>(length));
  return info;
}

v1::SequenceInfo EngineTest::Get(uint64_t id) {
  v1::GetSequenceRequest req;
  req.set_seq_id(id);
  v1::SequenceInfo info;
  EXPECT_TRUE(Await([&](Engine::Done d) { wire_->GetSequence(req, &info, std::move(d)); }).ok());
  return info;
}

uint64_t EngineTest::FreePages() const {
  v1::ServerInfo info;
  wire_->GetServerInfo(&info);
  return info.devices(0).free_pages();
}

void EngineTest::Append(uint32_t layer, const std::vector<Item>& items) {
  int64_t rows = 0;
  for (const Item& it : items) rows += it.n;
  cursor_ = 0;
  const size_t kv_elems = rows * kKvHeads * kHeadDim;
  const uint64_t k_off = Alloc(kv_elems * ElemSize());
  const uint64_t v_off = Alloc(kv_elems * ElemSize());
  const std::vector<double> k =
      Held(Store(k_off, Random(kv_elems, 1.0f), model().dtype), layer, 0);
  const std::vector<double> v =
      Held(Store(v_off, Random(kv_elems, 1.0f), model().dtype), layer, 1);
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

Outputs EngineTest::Attend(bool decode, uint32_t layer, const std::vector<Item>& items,
                           bool with_lse, const BatchInputs* given) {
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
  const std::vector<double> k = Held(Store(k_off, inputs.k, dtype), layer, 0);
  const std::vector<double> v = Held(Store(v_off, inputs.v, dtype), layer, 1);
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

Outputs EngineTest::Prefill(uint32_t layer, const std::vector<Item>& items, bool with_lse) {
  return Attend(false, layer, items, with_lse);
}

Outputs EngineTest::Decode(uint32_t layer, const std::vector<uint64_t>& ids, bool with_lse) {
  std::vector<Item> items;
  for (uint64_t id : ids) items.push_back({id, 1});
  return Attend(true, layer, items, with_lse);
}

void EngineTest::PrefillAll(const std::vector<Item>& items) {
  for (uint32_t layer = 0; layer < kLayers; ++layer) Prefill(layer, items);
}

void EngineTest::DecodeAll(const std::vector<uint64_t>& ids) {
  for (uint32_t layer = 0; layer < kLayers; ++layer) Decode(layer, ids);
}

void EngineTest::FragmentPool() {
  for (uint64_t id = 1000; id < 1008; ++id) Create(id);
  std::vector<Item> fillers;
  for (uint64_t id = 1000; id < 1008; ++id) fillers.push_back({id, model().page_size});
  Append(0, fillers);
  for (uint64_t id = 1000; id < 1008; id += 2) ASSERT_TRUE(Release(id).ok());
}

void EngineTest::ExpectLengths(uint64_t id, int64_t len0, int64_t len1) {
  const v1::SequenceInfo info = Get(id);
  ASSERT_EQ(info.layer_lengths_size(), kLayers);
  EXPECT_EQ(info.layer_lengths(0), static_cast<uint64_t>(len0)) << "seq " << id;
  EXPECT_EQ(info.layer_lengths(1), static_cast<uint64_t>(len1)) << "seq " << id;
}

int64_t EngineTest::PagesFor(int64_t tokens) const {
  return (tokens + model().page_size - 1) / model().page_size;
}

// The one instantiation of the suite: it covers every TEST_P(EngineTest, ...) linked into
// engine_test, whichever engine_*_test.cc defines it.
INSTANTIATE_TEST_SUITE_P(
    Models, EngineTest,
    ::testing::Values(
        ModelCase{"Bf16Nhd", DType::kBFloat16, KvLayout::kNHD, 16, 0.0f, -1, 1e-2},
        ModelCase{"Fp16Hnd", DType::kFloat16, KvLayout::kHND, 5, 0.0f, -1, 2e-3},
        ModelCase{"Fp32NhdPageSize1", DType::kFloat32, KvLayout::kNHD, 1, 0.0f, -1, 1e-5},
        ModelCase{"Bf16HndSoftCapWindow", DType::kBFloat16, KvLayout::kHND, 8, 1.5f, 6, 1e-2},
        ModelCase{"Fp32HndSoftCapWindow", DType::kFloat32, KvLayout::kHND, 3, 2.0f, 10, 1e-5},
        // fp8 pools, scales powers of two (StartingScales) so exported KV is exact.
        ModelCase{"Bf16NhdFp8Kv", DType::kBFloat16, KvLayout::kNHD, 16, 0.0f, -1, 1e-2,
                  kernels::KvStorage::kFp8E4M3},
        ModelCase{"Fp16HndFp8KvSoftCapWindow", DType::kFloat16, KvLayout::kHND, 5, 1.5f, 6, 2e-3,
                  kernels::KvStorage::kFp8E4M3},
        // fp8 pools with per-token scales: copy-on-write, export/import, truncation and the
        // rest carry each row's scale.
        ModelCase{"Bf16HndFp8PerTokenKv", DType::kBFloat16, KvLayout::kHND, 16, 0.0f, -1, 1e-2,
                  kernels::KvStorage::kFp8E4M3PerToken},
        ModelCase{"Fp16NhdFp8PerTokenKvSoftCapWindow", DType::kFloat16, KvLayout::kNHD, 5, 1.5f,
                  6, 2e-3, kernels::KvStorage::kFp8E4M3PerToken}),
    [](const ::testing::TestParamInfo<ModelCase>& info) { return std::string(info.param.name); });

}  // namespace attnd::engine_test
