// What a client can do to attnd's process through the memory it shares: shrink the POSIX shm
// object behind a registered region, so that attnd's next access to the cut part would raise
// SIGBUS. attnd must live on: the abusive calls are refused (FAILED_PRECONDITION, "shrank"),
// the server stays SERVING, and another client's work is still computed correctly.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/client.h"
#include "client/shm_buffer.h"
#include "client/tensor.h"
#include "testing/harness.h"
#include "testing/server_process.h"

namespace attnd::testing {
namespace {

constexpr uint32_t kQoHeads = 8, kKvHeads = 2, kHeadDim = 64;
constexpr uint64_t kRegionBytes = 64 * 1024;
constexpr uint64_t kVictim = 1, kBystander = 2;

// One decode token's tensors, all in the region's second half, which every cut below removes.
struct VictimLayout {
  static constexpr uint64_t q = kRegionBytes / 2;
  static constexpr uint64_t k = q + 4096;
  static constexpr uint64_t v = k + 4096;
  static constexpr uint64_t out = v + 4096;
};

class RegionAbuseTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto server = ServerProcess::Start(
        {"--backend=cpu", "--num_layers=1", absl::StrCat("--num_qo_heads=", kQoHeads),
         absl::StrCat("--num_kv_heads=", kKvHeads), absl::StrCat("--head_dim=", kHeadDim),
         "--dtype=bf16", "--page_size=16", "--pages_per_device=64"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    for (auto* c : {&victim_, &bystander_}) {
      auto connected = client::Client::Connect(server_->unix_target());
      ASSERT_TRUE(connected.ok()) << connected.status();
      *c = *std::move(connected);
    }
    // The bystander: its own region and sequence, with some history to attend over.
    const uint64_t seed = std::random_device{}();
    SCOPED_TRACE(absl::StrCat("seed ", seed));
    auto harness = Harness::Create(bystander_.get(), "bystander", 0, 16, seed);
    ASSERT_TRUE(harness.ok()) << harness.status();
    harness_ = *std::move(harness);
    ASSERT_TRUE(harness_->CreateSequence(kBystander).ok());
    ASSERT_TRUE(harness_->Attend(0, {{kBystander, 5}}, /*decode=*/false).ok());

    // The victim's region, filled with its inputs (bf16 1.0) while the object is whole.
    auto buffer = client::SharedMemoryBuffer::Create(
        client::SharedMemoryBuffer::UniqueKey("e2e-abuse"), kRegionBytes);
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    buffer_ = *std::move(buffer);
    auto* halves = static_cast<uint16_t*>(buffer_->data());
    for (uint64_t i = 0; i < kRegionBytes / 2; ++i) halves[i] = 0x3f80;
    ASSERT_TRUE(victim_->RegisterHostRegion("victim", buffer_->key(), 0, kRegionBytes).ok());
    ASSERT_TRUE(victim_->CreateSequence(0, kVictim).ok());
  }

  void TearDown() override {
    harness_.reset();
    victim_.reset();
    bystander_.reset();
    // Still there to stop: a server killed by the fault would have exited with 128 + SIGBUS.
    if (server_ != nullptr) EXPECT_EQ(server_->Terminate(), 0) << server_->Log();
    buffer_.reset();
  }

  // What the abusive client does after registering: cut its object to `bytes`. From here on the
  // test never touches the cut part of its own mapping either.
  void ShrinkVictimObject(uint64_t bytes) {
    const int fd = shm_open(buffer_->key().c_str(), O_RDWR, 0);
    ASSERT_GE(fd, 0) << std::strerror(errno);
    ASSERT_EQ(ftruncate(fd, static_cast<off_t>(bytes)), 0) << std::strerror(errno);
    close(fd);
  }

  v1::AppendRequest VictimAppend() const {
    v1::AppendRequest req;
    req.set_device(0);
    req.set_layer(0);
    v1::BatchItem* item = req.add_items();
    item->set_seq_id(kVictim);
    item->set_num_new_tokens(1);
    *req.mutable_k_new() = client::MakeTensorRef("victim", VictimLayout::k, v1::DTYPE_BFLOAT16,
                                                 {1, kKvHeads, kHeadDim});
    *req.mutable_v_new() = client::MakeTensorRef("victim", VictimLayout::v, v1::DTYPE_BFLOAT16,
                                                 {1, kKvHeads, kHeadDim});
    return req;
  }

  v1::AttentionRequest VictimDecode() const {
    const v1::AppendRequest append = VictimAppend();
    v1::AttentionRequest req;
    req.set_device(0);
    req.set_layer(0);
    *req.mutable_items() = append.items();
    *req.mutable_q() = client::MakeTensorRef("victim", VictimLayout::q, v1::DTYPE_BFLOAT16,
                                             {1, kQoHeads, kHeadDim});
    *req.mutable_k_new() = append.k_new();
    *req.mutable_v_new() = append.v_new();
    *req.mutable_out() = client::MakeTensorRef("victim", VictimLayout::out, v1::DTYPE_BFLOAT16,
                                               {1, kQoHeads, kHeadDim});
    return req;
  }

  // The server is alive, healthy, and computes the other client's Decode correctly.
  void ExpectServerServesOn() {
    EXPECT_TRUE(server_->Running()) << server_->Log();
    auto health = bystander_->Health("");
    ASSERT_TRUE(health.ok()) << health.status();
    EXPECT_EQ(*health, grpc::health::v1::HealthCheckResponse::SERVING);
    EXPECT_TRUE(harness_->Attend(0, {{kBystander, 1}}, /*decode=*/true).ok());
  }

  // The refused call was taken back: the victim's sequence holds nothing.
  void ExpectRefusedAsShrunk(const absl::Status& s) {
    if (E2eBackend() == "cuda") {
      // attnd page-locked the region at registration and only the GPU reads it: the pages stay
      // pinned when the object shrinks, so there is no fault to guard and the call may succeed.
      EXPECT_TRUE(s.ok() || s.code() == absl::StatusCode::kFailedPrecondition) << s;
      return;
    }
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "shrank")) << s;
    auto seq = victim_->GetSequence(0, kVictim);
    ASSERT_TRUE(seq.ok()) << seq.status();
    EXPECT_EQ(seq->layer_lengths(0), 0u);
  }

  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<client::Client> victim_, bystander_;
  std::unique_ptr<Harness> harness_;
  std::unique_ptr<client::SharedMemoryBuffer> buffer_;
};


TEST_F(RegionAbuseTest, AnAppendFromAnObjectCutToZeroIsRefusedAndTheServerServesOn) {
  ShrinkVictimObject(0);
  ExpectRefusedAsShrunk(victim_->Append(VictimAppend()).status());
  ExpectServerServesOn();
}

TEST_F(RegionAbuseTest, ADecodeOnAnObjectCutToZeroIsRefusedAndTheServerServesOn) {
  ShrinkVictimObject(0);
  ExpectRefusedAsShrunk(victim_->Decode(VictimDecode()).status());
  ExpectServerServesOn();
}

TEST_F(RegionAbuseTest, AnAppendFromTheCutHalfOfAnObjectIsRefusedAndTheServerServesOn) {
  ShrinkVictimObject(kRegionBytes / 2);
  ExpectRefusedAsShrunk(victim_->Append(VictimAppend()).status());
  ExpectServerServesOn();
}

TEST_F(RegionAbuseTest, ADecodeOnTheCutHalfOfAnObjectIsRefusedAndTheServerServesOn) {
  ShrinkVictimObject(kRegionBytes / 2);
  ExpectRefusedAsShrunk(victim_->Decode(VictimDecode()).status());
  ExpectServerServesOn();
}

TEST_F(RegionAbuseTest, TheShrunkRegionCanBeUnregisteredAndItsNameUsedForAWholeObject) {
  ShrinkVictimObject(0);
  (void)victim_->Decode(VictimDecode());  // damages the region, whatever it answers
  ASSERT_TRUE(victim_->UnregisterRegion("victim").ok());
  auto fresh = client::SharedMemoryBuffer::Create(
      client::SharedMemoryBuffer::UniqueKey("e2e-abuse"), kRegionBytes);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  ASSERT_TRUE(victim_->RegisterHostRegion("victim", (*fresh)->key(), 0, kRegionBytes).ok());
  EXPECT_TRUE(victim_->Decode(VictimDecode()).ok());
  EXPECT_TRUE(victim_->UnregisterRegion("victim").ok());
  ExpectServerServesOn();
}

}  // namespace
}  // namespace attnd::testing
