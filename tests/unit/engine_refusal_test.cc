// Engine refusals and lifecycle: all-or-nothing batches when pages run out, request traces of
// served and refused requests, and shutdown answering every queued call (see
// engine_test_fixture.h).
#include "tests/unit/engine_test_fixture.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace attnd::engine_test {
namespace {

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

// ---- Shutdown ----

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

}  // namespace
}  // namespace attnd::engine_test
