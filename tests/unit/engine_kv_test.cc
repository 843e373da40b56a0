// Engine K/V transfer: append-only import, and export/import by layer and head range, into new
// sequences and into forks (see engine_test_fixture.h).
#include "tests/unit/engine_test_fixture.h"

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace attnd::engine_test {
namespace {

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
            ASSERT_EQ(got[at], Exported(src[(t * kKvHeads + head) * kHeadDim + x]))
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
      const auto row = fresh.begin() + (kv * kTokens + t) * kHeadDim;
      const std::vector<double> held = Held(std::vector<double>(row, row + kHeadDim), 0, kv);
      std::copy(held.begin(), held.end(), dst.begin() + (t * kKvHeads + 1) * kHeadDim);
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

}  // namespace
}  // namespace attnd::engine_test
