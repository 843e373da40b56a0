// Deadlines through a real attnd: a data call whose deadline passes while it waits behind other
// work for the device is answered DEADLINE_EXCEEDED and changes nothing, so a client that retries
// it does not append twice (DESIGN.md invariant 8).
#include <gtest/gtest.h>

#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "testing/harness.h"
#include "testing/server_process.h"

namespace attnd::testing {
namespace {

TEST(Deadlines, DecodesThatExpireBehindALongPrefillChangeNothing) {
  if (E2eBackend() != "cpu")
    GTEST_SKIP() << "needs a call that holds the device worker for seconds: one CPU thread's "
                    "4096-token prefill does, a GPU's takes milliseconds";
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  // One CPU thread: a 4096-token prefill then takes seconds, far past the decodes' deadline.
  auto server = ServerProcess::Start(
      {"--backend=cpu", "--cpu_threads=1", "--num_layers=1", "--num_qo_heads=8",
       "--num_kv_heads=2", "--head_dim=64", "--dtype=bf16", "--page_size=16",
       "--pages_per_device=1024"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto connected = client::Client::Connect((*server)->unix_target());
  ASSERT_TRUE(connected.ok()) << connected.status();
  client::Client& c = **connected;
  auto h = Harness::Create(&c, "main", 0, 4096, seed);
  ASSERT_TRUE(h.ok()) << h.status();
  Harness& harness = **h;
  ASSERT_TRUE(harness.CreateSequence(1).ok());
  ASSERT_TRUE(harness.CreateSequence(2).ok());
  ASSERT_TRUE(harness.Attend(0, {{2, 5}}, /*decode=*/false).ok());

  const v1::AttentionRequest prefill = harness.BuildAttention(0, {{1, 4096}}, false);
  absl::Status prefilled;
  std::thread long_call([&] { prefilled = c.Prefill(prefill).status(); });
  absl::SleepFor(absl::Milliseconds(200));  // the prefill is on the device worker by now

  // A Decode of sequence 2 that only reads the region (its inputs are the prefill's rows 0..).
  v1::AttentionRequest decode = prefill;
  decode.clear_items();
  v1::BatchItem* item = decode.add_items();
  item->set_seq_id(2);
  item->set_num_new_tokens(1);
  for (v1::TensorRef* t : {decode.mutable_q(), decode.mutable_k_new(), decode.mutable_v_new(),
                           decode.mutable_out()})
    t->set_shape(0, 1);
  client::CallOptions short_deadline;
  short_deadline.timeout = absl::Milliseconds(5);
  for (int i = 0; i < 20; ++i) {
    const absl::Status s = c.Decode(decode, short_deadline).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << "call " << i << ": " << s;
  }
  long_call.join();
  ASSERT_TRUE(prefilled.ok()) << prefilled;
  auto info = c.GetSequence(0, 2);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->layer_lengths(0), 5u) << "a Decode that expired while queued was applied";
  h->reset();
  connected->reset();
  EXPECT_EQ((*server)->Terminate(), 0) << (*server)->Log();
}

}  // namespace
}  // namespace attnd::testing
