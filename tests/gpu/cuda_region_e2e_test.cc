// A client process shares real device buffers with attnd through CUDA IPC: attnd (another
// process, CUDA backend) opens the handle, checks its extent, and prefill/decode read q/k/v and
// write out/lse in the client's device memory. Outputs are compared with the client's fp64
// reference. Skips without a GPU.
#include <cuda_runtime_api.h>

#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/reference.h"
#include "client/tensor.h"
#include "gtest/gtest.h"
#include "tests/e2e/server_process.h"

namespace attnd::testing {
namespace {

constexpr uint32_t kLayers = 2, kQo = 8, kKv = 2, kDim = 64;

class CudaRegionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) GTEST_SKIP() << "no CUDA device";
    ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
    auto server = ServerProcess::Start(
        {"--backend=cuda", "--devices=0", absl::StrCat("--num_layers=", kLayers),
         absl::StrCat("--num_qo_heads=", kQo), absl::StrCat("--num_kv_heads=", kKv),
         absl::StrCat("--head_dim=", kDim), "--dtype=bf16", "--page_size=16",
         "--pages_per_device=4096", "--max_seq_len=8192"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    auto c = client::Client::Connect(server_->unix_target());
    ASSERT_TRUE(c.ok()) << c.status();
    client_ = *std::move(c);
    ASSERT_EQ(cudaMalloc(&device_buffer_, kBytes), cudaSuccess);
    cudaIpcMemHandle_t handle;
    ASSERT_EQ(cudaIpcGetMemHandle(&handle, device_buffer_), cudaSuccess);
    handle_.assign(reinterpret_cast<const char*>(&handle), sizeof(handle));
  }

  void TearDown() override {
    if (client_ != nullptr) (void)client_->UnregisterRegion("gpu");
    client_.reset();
    if (server_ != nullptr) EXPECT_EQ(server_->Terminate(), 0) << server_->Log();
    if (device_buffer_ != nullptr) cudaFree(device_buffer_);
  }

  static constexpr uint64_t kBytes = 64 << 20;
  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<client::Client> client_;
  void* device_buffer_ = nullptr;
  std::string handle_;
};

TEST_F(CudaRegionTest, RegionLargerThanTheAllocationIsRejectedNamingByteSize) {
  const absl::Status s = client_->RegisterCudaRegion("gpu", handle_, 0, kBytes + 4096);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("byte_size"), absl::string_view::npos) << s;
  auto regions = client_->ListRegions();
  ASSERT_TRUE(regions.ok());
  EXPECT_EQ(regions->regions_size(), 0);
}

TEST_F(CudaRegionTest, PrefillAndDecodeReadAndWriteTheClientsDeviceMemory) {
  ASSERT_TRUE(client_->RegisterCudaRegion("gpu", handle_, 0, kBytes).ok());
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto info = client_->GetServerInfo();
  ASSERT_TRUE(info.ok());
  ASSERT_EQ(info->backend(), v1::BACKEND_CUDA);
  const client::AttentionParams params = client::ParamsFromModel(info->model());

  const std::vector<uint32_t> prompts = {1, 15, 17, 300};
  std::map<uint64_t, std::vector<std::vector<float>>> hist_k, hist_v;  // [seq][layer]
  for (uint64_t id = 0; id < prompts.size(); ++id) {
    ASSERT_TRUE(client_->CreateSequence(0, id).ok());
    hist_k[id].assign(kLayers, {});
    hist_v[id].assign(kLayers, {});
  }
  const uint64_t q_off = 0, k_off = 8 << 20, v_off = 16 << 20, out_off = 24 << 20, lse_off = 32 << 20;
  auto step = [&](uint32_t layer, const std::vector<uint32_t>& counts, bool decode) {
    uint64_t total = 0;
    for (uint32_t n : counts) total += n;
    std::vector<float> q(total * kQo * kDim), k(total * kKv * kDim), v(total * kKv * kDim);
    for (auto* t : {&q, &k, &v})
      for (float& x : *t) x = client::RoundToDType(v1::DTYPE_BFLOAT16, normal(rng));
    std::vector<uint16_t> staging(std::max(q.size(), k.size()));
    auto upload = [&](const std::vector<float>& src, uint64_t off) {
      client::EncodeFloats(v1::DTYPE_BFLOAT16, src, staging.data());
      ASSERT_EQ(cudaMemcpy(static_cast<uint8_t*>(device_buffer_) + off, staging.data(), src.size() * 2,
                           cudaMemcpyHostToDevice), cudaSuccess);
    };
    upload(q, q_off);
    upload(k, k_off);
    upload(v, v_off);
    ASSERT_EQ(cudaMemset(static_cast<uint8_t*>(device_buffer_) + out_off, 0xff, q.size() * 2), cudaSuccess);
    v1::AttentionRequest req;
    req.set_device(0);
    req.set_layer(layer);
    for (uint64_t id = 0; id < counts.size(); ++id) {
      auto* item = req.add_items();
      item->set_seq_id(id);
      item->set_num_new_tokens(counts[id]);
    }
    *req.mutable_q() = client::MakeTensorRef("gpu", q_off, v1::DTYPE_BFLOAT16, {total, kQo, kDim});
    *req.mutable_k_new() = client::MakeTensorRef("gpu", k_off, v1::DTYPE_BFLOAT16, {total, kKv, kDim});
    *req.mutable_v_new() = client::MakeTensorRef("gpu", v_off, v1::DTYPE_BFLOAT16, {total, kKv, kDim});
    *req.mutable_out() = client::MakeTensorRef("gpu", out_off, v1::DTYPE_BFLOAT16, {total, kQo, kDim});
    *req.mutable_lse() = client::MakeTensorRef("gpu", lse_off, v1::DTYPE_FLOAT32, {total, kQo});
    auto resp = decode ? client_->Decode(req) : client_->Prefill(req);
    ASSERT_TRUE(resp.ok()) << resp.status();
    std::vector<uint16_t> out_bits(q.size());
    ASSERT_EQ(cudaMemcpy(out_bits.data(), static_cast<uint8_t*>(device_buffer_) + out_off,
                         q.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    std::vector<float> out(q.size());
    client::DecodeFloats(v1::DTYPE_BFLOAT16, out_bits.data(), absl::MakeSpan(out));
    uint64_t row = 0;
    for (uint64_t id = 0; id < counts.size(); ++id) {
      auto& hk = hist_k[id][layer];
      auto& hv = hist_v[id][layer];
      hk.insert(hk.end(), k.begin() + row * kKv * kDim, k.begin() + (row + counts[id]) * kKv * kDim);
      hv.insert(hv.end(), v.begin() + row * kKv * kDim, v.begin() + (row + counts[id]) * kKv * kDim);
      const int64_t kv_len = static_cast<int64_t>(hk.size() / (kKv * kDim));
      std::vector<double> ref(counts[id] * kQo * kDim), ref_lse(counts[id] * kQo);
      client::DenseAttentionReference(params, q.data() + row * kQo * kDim, counts[id], hk.data(),
                                      hv.data(), kv_len, ref.data(), ref_lse.data());
      const double err = client::RelativeL2Error(
          absl::MakeConstSpan(out.data() + row * kQo * kDim, counts[id] * kQo * kDim), ref);
      EXPECT_LT(err, 1e-2) << "seq " << id << " layer " << layer;
      row += counts[id];
    }
  };
  for (uint32_t layer = 0; layer < kLayers; ++layer) step(layer, prompts, false);
  for (int s = 0; s < 4; ++s)
    for (uint32_t layer = 0; layer < kLayers; ++layer) step(layer, {1, 1, 1, 1}, true);
  ASSERT_TRUE(client_->UnregisterRegion("gpu").ok());
  auto regions = client_->ListRegions();
  ASSERT_TRUE(regions.ok());
  EXPECT_EQ(regions->regions_size(), 0);
}

}  // namespace
}  // namespace attnd::testing
