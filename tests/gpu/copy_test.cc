// The runs copy of same-node KV pulls: random runs (16 B .. 64 KiB, some adjacent) from a random
// source to a poisoned destination; every run's bytes arrive and nothing else changes.
#include <gtest/gtest.h>

#include <cstdint>
#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "tests/gpu/gpu_test_util.h"

namespace attnd::kernels::testing {
namespace {

using cuda::ByteRun;

TEST(RunsCopyTest, RandomRunsArriveAndTheRestStaysPoisoned) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(20261129);
  constexpr size_t kBytes = 8 << 20;
  std::vector<uint8_t> src(kBytes);
  for (auto& b : src) b = static_cast<uint8_t>(rng());
  // Runs over disjoint 128 KiB slots of the destination, in random order, of random lengths.
  std::vector<ByteRun> runs;
  std::vector<size_t> slots(kBytes / (128 << 10));
  for (size_t i = 0; i < slots.size(); ++i) slots[i] = i;
  std::shuffle(slots.begin(), slots.end(), rng);
  for (size_t slot : slots) {
    const uint64_t bytes = 16 * (1 + rng() % (cuda::kMaxRunBytes / 16));
    const uint64_t src_offset = 16 * (rng() % ((kBytes - bytes) / 16));
    runs.push_back({src_offset, slot * (128 << 10), bytes});
  }
  DeviceBuffer<uint8_t> d_src(kBytes), d_dst(kBytes);
  DeviceBuffer<ByteRun> d_runs(runs.size());
  d_src.Upload(src);
  d_runs.Upload(runs);
  d_dst.Fill(0xEE);
  ATTND_STATUS_OK(cuda::LaunchRunsCopy(d_src.get(), d_dst.get(), d_runs.get(),
                                       static_cast<int64_t>(runs.size()), nullptr));
  ATTND_CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint8_t> want(kBytes, 0xEE);
  for (const ByteRun& r : runs)
    std::copy(src.begin() + r.src_offset, src.begin() + r.src_offset + r.bytes,
              want.begin() + r.dst_offset);
  EXPECT_EQ(d_dst.Download(), want);
}

TEST(RunsCopyTest, MisalignedPointersAreRefusedNamingThem) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer<uint8_t> d(64);
  DeviceBuffer<ByteRun> runs(1);
  const absl::Status s = cuda::LaunchRunsCopy(d.get() + 8, d.get(), runs.get(), 1, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("src"), std::string::npos);
}

}  // namespace
}  // namespace attnd::kernels::testing
