// Tests of server/engine/limits.h: what one request may ask, with messages that name the field
// and the limit. The limits come from a real ServerConfig, changed per test.
#include "server/engine/limits.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace attnd {
namespace {

bool Names(const absl::Status& s, absl::string_view word) {
  return s.message().find(word) != absl::string_view::npos;
}

class LimitsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_.model.num_layers = 3;
    config_.model.num_kv_heads = 4;
    config_.max_batch_size = 8;
    config_.max_tokens_per_request = 100;
    config_.max_seq_len = 1000;
    ASSERT_TRUE(config_.Validate().ok()) << config_.Validate();
  }
  KvTransferCall Transfer() const {
    KvTransferCall call;
    call.layer_begin = 0;
    call.layer_end = 3;
    call.head_begin = 1;
    call.head_end = 3;
    call.num_tokens = 7;
    return call;
  }
  ServerConfig config_;
};

TEST_F(LimitsTest, ALayerPastTheModelIsInvalidArgumentNamingTheRange) {
  EXPECT_TRUE(CheckLayer(2, config_).ok());
  const absl::Status s = CheckLayer(3, config_);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Names(s, "layer: 3")) << s;
  EXPECT_TRUE(Names(s, "[0, 3)")) << s;
}

TEST_F(LimitsTest, ItemsReturnTheTotalOfNewTokens) {
  std::mt19937 rng(std::random_device{}());
  std::vector<AppendItem> items;
  int64_t total = 0;
  for (uint64_t i = 0; i < 5; ++i) {
    const int64_t n = 1 + static_cast<int64_t>(rng() % 20);
    items.push_back({i, n});
    total += n;
  }
  auto r = CheckItems(items, config_, /*decode=*/false);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, static_cast<uint64_t>(total));
}

TEST_F(LimitsTest, AnEmptyBatchIsInvalidArgument) {
  EXPECT_TRUE(Names(CheckItems({}, config_, false).status(), "items: empty"));
}

TEST_F(LimitsTest, MoreItemsThanMaxBatchSizeAreRefusedNamingTheLimit) {
  std::vector<AppendItem> items(9, AppendItem{0, 1});
  for (uint64_t i = 0; i < items.size(); ++i) items[i].seq_id = i;
  const absl::Status s = CheckItems(items, config_, false).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Names(s, "max_batch_size 8")) << s;
}

TEST_F(LimitsTest, AnItemWithoutNewTokensIsRefusedNamingTheItem) {
  const absl::Status s = CheckItems({{1, 2}, {2, 0}}, config_, false).status();
  EXPECT_TRUE(Names(s, "items[1].num_new_tokens")) << s;
}

TEST_F(LimitsTest, DecodeTakesExactlyOneTokenPerItem) {
  EXPECT_TRUE(CheckItems({{1, 1}, {2, 1}}, config_, /*decode=*/true).ok());
  const absl::Status s = CheckItems({{1, 1}, {2, 2}}, config_, /*decode=*/true).status();
  EXPECT_TRUE(Names(s, "items[1].num_new_tokens: 2; Decode takes exactly 1")) << s;
}

TEST_F(LimitsTest, MoreNewTokensThanMaxTokensPerRequestAreRefused) {
  const absl::Status s = CheckItems({{1, 60}, {2, 41}}, config_, false).status();
  EXPECT_TRUE(Names(s, "101 new tokens exceed max_tokens_per_request 100")) << s;
}

TEST_F(LimitsTest, ATransferGivesTheDenseBufferShape) {
  auto shape = CheckTransfer(Transfer(), config_);
  ASSERT_TRUE(shape.ok()) << shape.status();
  EXPECT_EQ(*shape, (std::vector<uint64_t>{3, 2, 7, 2, static_cast<uint64_t>(config_.model.head_dim)}));
}

TEST_F(LimitsTest, TransferRangesMustBeNonEmptyAndInsideTheModel) {
  KvTransferCall layers = Transfer();
  layers.layer_end = 4;
  EXPECT_TRUE(Names(CheckTransfer(layers, config_).status(), "layer_begin, layer_end"));
  KvTransferCall heads = Transfer();
  heads.head_begin = heads.head_end = 2;
  EXPECT_TRUE(Names(CheckTransfer(heads, config_).status(), "head_begin, head_end"));
  KvTransferCall tokens = Transfer();
  tokens.num_tokens = 1001;
  EXPECT_TRUE(Names(CheckTransfer(tokens, config_).status(), "max_seq_len 1000"));
}

TEST_F(LimitsTest, TransfersWithEventsAreNotImplementedYet) {
  KvTransferCall call = Transfer();
  call.sync.signal_event = "e";
  EXPECT_EQ(CheckTransfer(call, config_).status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace attnd
