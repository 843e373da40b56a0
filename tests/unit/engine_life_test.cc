// A data call that expired or was cancelled while it waited for the device changes nothing
// (DESIGN.md invariant 8): a client that retries after DEADLINE_EXCEEDED must not append twice.
// See engine_test_fixture.h.
#include "tests/unit/engine_test_fixture.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <limits>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"

namespace attnd::engine_test {
namespace {

class EngineLifeTest : public EngineTest {
 protected:
  // A one-token Decode of sequence `id` at layer 0 with fresh random inputs and a poisoned
  // output, in the engine's own terms.
  AttentionCall DecodeOf(uint64_t id, uint64_t* out_offset) {
    cursor_ = 0;
    const uint64_t q = Alloc(kQoHeads * kHeadDim * ElemSize());
    const uint64_t k = Alloc(kKvHeads * kHeadDim * ElemSize());
    const uint64_t v = Alloc(kKvHeads * kHeadDim * ElemSize());
    *out_offset = Alloc(kQoHeads * kHeadDim * ElemSize());
    Store(q, Random(kQoHeads * kHeadDim, 1.0f), model().dtype);
    Store(k, Random(kKvHeads * kHeadDim, 1.0f), model().dtype);
    Store(v, Random(kKvHeads * kHeadDim, 1.0f), model().dtype);
    Poison(*out_offset, kQoHeads * kHeadDim, model().dtype);
    v1::AttentionRequest req;
    req.set_layer(0);
    v1::BatchItem* item = req.add_items();
    item->set_seq_id(id);
    item->set_num_new_tokens(1);
    const v1::DType dt = wire::ToWire(model().dtype);
    *req.mutable_q() = Ref(q, dt, {1, kQoHeads, kHeadDim});
    *req.mutable_k_new() = Ref(k, dt, {1, kKvHeads, kHeadDim});
    *req.mutable_v_new() = Ref(v, dt, {1, kKvHeads, kHeadDim});
    *req.mutable_out() = Ref(*out_offset, dt, {1, kQoHeads, kHeadDim});
    return wire::ToAttentionCall(req);
  }

  absl::Status Run(AttentionCall call) {
    return Await([&](Engine::Done d) {
      engine_->Decode(std::move(call), [d = std::move(d)](absl::StatusOr<DataResult> r) mutable {
        std::move(d)(r.status());
      });
    });
  }

  bool OutputStillPoisoned(uint64_t out_offset) const {
    for (double x : Load(out_offset, kQoHeads * kHeadDim, model().dtype))
      if (!std::isnan(x)) return false;
    return true;
  }
};

TEST_P(EngineLifeTest, ADecodeThatExpiredBeforeItsTurnChangesNothing) {
  Create(1);
  PrefillAll({{1, 5}});
  const uint64_t pages = FreePages();
  uint64_t out = 0;
  AttentionCall call = DecodeOf(1, &out);
  call.life.deadline = absl::Now() - absl::Milliseconds(1);
  const absl::Status s = Run(std::move(call));
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_NE(s.message().find("nothing was changed"), absl::string_view::npos) << s;
  ExpectLengths(1, 5, 5);
  EXPECT_EQ(FreePages(), pages);
  EXPECT_TRUE(OutputStillPoisoned(out));
}

TEST_P(EngineLifeTest, ADecodeCancelledBeforeItsTurnChangesNothing) {
  Create(1);
  PrefillAll({{1, 3}});
  uint64_t out = 0;
  AttentionCall call = DecodeOf(1, &out);
  call.life.is_cancelled = [] { return true; };
  const absl::Status s = Run(std::move(call));
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled) << s;
  ExpectLengths(1, 3, 3);
  EXPECT_TRUE(OutputStillPoisoned(out));
}

TEST_P(EngineLifeTest, ADecodeWithinItsDeadlineIsServed) {
  Create(1);
  PrefillAll({{1, 4}});
  uint64_t out = 0;
  AttentionCall call = DecodeOf(1, &out);
  call.life.deadline = absl::Now() + absl::Minutes(1);
  call.life.is_cancelled = [] { return false; };
  ASSERT_TRUE(Run(std::move(call)).ok());
  const v1::SequenceInfo info = Get(1);
  EXPECT_EQ(info.layer_lengths(0), 5u);
  EXPECT_EQ(info.layer_lengths(1), 4u);
  EXPECT_FALSE(OutputStillPoisoned(out));
}

TEST_P(EngineLifeTest, AnAppendThatExpiredBeforeItsTurnChangesNothing) {
  Create(1);
  const uint64_t pages = FreePages();
  cursor_ = 0;
  const uint64_t k = Alloc(2 * kKvHeads * kHeadDim * ElemSize());
  const uint64_t v = Alloc(2 * kKvHeads * kHeadDim * ElemSize());
  v1::AppendRequest req;
  req.set_layer(1);
  v1::BatchItem* item = req.add_items();
  item->set_seq_id(1);
  item->set_num_new_tokens(2);
  const v1::DType dt = wire::ToWire(model().dtype);
  *req.mutable_k_new() = Ref(k, dt, {2, kKvHeads, kHeadDim});
  *req.mutable_v_new() = Ref(v, dt, {2, kKvHeads, kHeadDim});
  AppendCall call = wire::ToAppendCall(req);
  call.life.deadline = absl::InfinitePast();
  const absl::Status s = Await([&](Engine::Done d) {
    engine_->Append(std::move(call), [d = std::move(d)](absl::StatusOr<DataResult> r) mutable {
      std::move(d)(r.status());
    });
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  ExpectLengths(1, 0, 0);
  EXPECT_EQ(FreePages(), pages);
}

INSTANTIATE_TEST_SUITE_P(
    Models, EngineLifeTest,
    ::testing::Values(ModelCase{"Bf16Nhd", DType::kBFloat16, KvLayout::kNHD, 16, 0.0f, -1, 1e-2},
                      ModelCase{"Fp32HndPageSize3", DType::kFloat32, KvLayout::kHND, 3, 0.0f, -1,
                                1e-5}),
    [](const ::testing::TestParamInfo<ModelCase>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace attnd::engine_test
