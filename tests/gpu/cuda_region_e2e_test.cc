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
#include "testing/server_process.h"

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

// With IPC events the call replies once the work is enqueued: the server's stream waits on
// the client's "inputs ready" event and records "outputs written", which the client's stream
// waits on before reading the output.
// Events a client never unregisters are closed at shutdown while their device's worker still
// runs (closing one posts to it): the server stops with status 0 (TearDown checks it).
// A client that frees (or loses, by exiting) the allocation it registered must not be able to
// fault the GPU that every other client shares: attnd's IPC mapping holds the memory until the
// region is unregistered, so calls naming it read stale bytes at worst.
TEST_F(CudaRegionTest, AnAllocationFreedAfterRegistrationNeverFaultsTheDevice) {
  ASSERT_TRUE(client_->RegisterCudaRegion("gpu", handle_, 0, kBytes).ok());
  ASSERT_EQ(cudaFree(device_buffer_), cudaSuccess);
  device_buffer_ = nullptr;
  // Something else takes the freed addresses in the client, as a caching allocator would.
  void* reuse = nullptr;
  ASSERT_EQ(cudaMalloc(&reuse, kBytes), cudaSuccess);
  ASSERT_TRUE(client_->CreateSequence(0, 1).ok());
  constexpr uint64_t n = 64;
  v1::AttentionRequest req;
  req.set_device(0);
  req.set_layer(0);
  auto* item = req.add_items();
  item->set_seq_id(1);
  item->set_num_new_tokens(n);
  *req.mutable_q() = client::MakeTensorRef("gpu", 0, v1::DTYPE_BFLOAT16, {n, kQo, kDim});
  *req.mutable_k_new() = client::MakeTensorRef("gpu", 8 << 20, v1::DTYPE_BFLOAT16, {n, kKv, kDim});
  *req.mutable_v_new() = client::MakeTensorRef("gpu", 16 << 20, v1::DTYPE_BFLOAT16, {n, kKv, kDim});
  *req.mutable_out() = client::MakeTensorRef("gpu", 24 << 20, v1::DTYPE_BFLOAT16, {n, kQo, kDim});
  for (int call = 0; call < 3; ++call) {
    auto resp = call == 0 ? client_->Prefill(req) : client_->Decode([&] {
      v1::AttentionRequest d = req;
      d.mutable_items(0)->set_num_new_tokens(1);
      for (v1::TensorRef* t : {d.mutable_q(), d.mutable_k_new(), d.mutable_v_new(), d.mutable_out()})
        t->set_shape(0, 1);
      return d;
    }());
    EXPECT_TRUE(resp.ok()) << "call " << call << ": " << resp.status();
  }
  EXPECT_EQ(*client_->Health("attnd.v1.Attention/device/0"),
            grpc::health::v1::HealthCheckResponse::SERVING);
  ASSERT_TRUE(client_->UnregisterRegion("gpu").ok());
  EXPECT_EQ(cudaFree(reuse), cudaSuccess);
  EXPECT_EQ(*client_->Health("attnd.v1.Attention/device/0"),
            grpc::health::v1::HealthCheckResponse::SERVING);
}

TEST_F(CudaRegionTest, ServerStopsCleanlyWithEventsStillRegistered) {
  std::vector<cudaEvent_t> events(8);
  for (size_t i = 0; i < events.size(); ++i) {
    ASSERT_EQ(cudaEventCreateWithFlags(&events[i], cudaEventInterprocess | cudaEventDisableTiming),
              cudaSuccess);
    cudaIpcEventHandle_t h;
    ASSERT_EQ(cudaIpcGetEventHandle(&h, events[i]), cudaSuccess);
    const absl::Status s = client_->RegisterCudaEvent(
        absl::StrCat("e", i), std::string(reinterpret_cast<const char*>(&h), sizeof(h)), 0);
    ASSERT_TRUE(s.ok()) << s;
  }
  client_.reset();
  ASSERT_EQ(server_->Terminate(), 0) << server_->Log();
  server_.reset();
  for (cudaEvent_t e : events) cudaEventDestroy(e);
}

TEST_F(CudaRegionTest, IpcEventsOrderAnAsynchronousDecodeWithTheClientsStream) {
  ASSERT_TRUE(client_->RegisterCudaRegion("gpu", handle_, 0, kBytes).ok());
  cudaEvent_t ready, written;
  const unsigned flags = cudaEventInterprocess | cudaEventDisableTiming;
  ASSERT_EQ(cudaEventCreateWithFlags(&ready, flags), cudaSuccess);
  ASSERT_EQ(cudaEventCreateWithFlags(&written, flags), cudaSuccess);
  for (auto [name, ev] : {std::pair{"ready", ready}, std::pair{"written", written}}) {
    cudaIpcEventHandle_t h;
    ASSERT_EQ(cudaIpcGetEventHandle(&h, ev), cudaSuccess);
    const absl::Status s =
        client_->RegisterCudaEvent(name, std::string(reinterpret_cast<const char*>(&h), sizeof(h)), 0);
    ASSERT_TRUE(s.ok()) << s;
  }
  EXPECT_EQ(client_->RegisterCudaEvent("ready", std::string(64, '\0'), 0).code(),
            absl::StatusCode::kAlreadyExists);

  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto info = client_->GetServerInfo();
  ASSERT_TRUE(info.ok());
  const client::AttentionParams params = client::ParamsFromModel(info->model());
  ASSERT_TRUE(client_->CreateSequence(0, 1).ok());
  cudaStream_t stream;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  std::vector<float> hk, hv;
  const uint64_t q_off = 0, k_off = 1 << 20, v_off = 2 << 20, out_off = 3 << 20;
  // Prefill 40 tokens, then 3 decodes, every call asynchronous.
  for (uint32_t n : {40u, 1u, 1u, 1u}) {
    std::vector<float> q(n * kQo * kDim), k(n * kKv * kDim), v(n * kKv * kDim);
    for (auto* t : {&q, &k, &v})
      for (float& x : *t) x = client::RoundToDType(v1::DTYPE_BFLOAT16, normal(rng));
    std::vector<uint16_t> qb(q.size()), kb(k.size()), vb(v.size()), ob(q.size());
    client::EncodeFloats(v1::DTYPE_BFLOAT16, q, qb.data());
    client::EncodeFloats(v1::DTYPE_BFLOAT16, k, kb.data());
    client::EncodeFloats(v1::DTYPE_BFLOAT16, v, vb.data());
    auto* base = static_cast<uint8_t*>(device_buffer_);
    // Inputs are written on the client's stream and may still be in flight when the call goes.
    ASSERT_EQ(cudaMemsetAsync(base + out_off, 0xff, q.size() * 2, stream), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(base + q_off, qb.data(), q.size() * 2, cudaMemcpyHostToDevice, stream), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(base + k_off, kb.data(), k.size() * 2, cudaMemcpyHostToDevice, stream), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(base + v_off, vb.data(), v.size() * 2, cudaMemcpyHostToDevice, stream), cudaSuccess);
    ASSERT_EQ(cudaEventRecord(ready, stream), cudaSuccess);
    v1::AttentionRequest req;
    req.set_layer(0);
    auto* item = req.add_items();
    item->set_seq_id(1);
    item->set_num_new_tokens(n);
    *req.mutable_q() = client::MakeTensorRef("gpu", q_off, v1::DTYPE_BFLOAT16, {n, kQo, kDim});
    *req.mutable_k_new() = client::MakeTensorRef("gpu", k_off, v1::DTYPE_BFLOAT16, {n, kKv, kDim});
    *req.mutable_v_new() = client::MakeTensorRef("gpu", v_off, v1::DTYPE_BFLOAT16, {n, kKv, kDim});
    *req.mutable_out() = client::MakeTensorRef("gpu", out_off, v1::DTYPE_BFLOAT16, {n, kQo, kDim});
    req.mutable_sync()->set_wait_event("ready");
    req.mutable_sync()->set_signal_event("written");
    auto resp = n == 1 ? client_->Decode(req) : client_->Prefill(req);
    ASSERT_TRUE(resp.ok()) << resp.status();
    ASSERT_EQ(cudaStreamWaitEvent(stream, written, 0), cudaSuccess);
    ASSERT_EQ(cudaMemcpyAsync(ob.data(), base + out_off, q.size() * 2, cudaMemcpyDeviceToHost, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    hk.insert(hk.end(), k.begin(), k.end());
    hv.insert(hv.end(), v.begin(), v.end());
    std::vector<float> out(q.size());
    client::DecodeFloats(v1::DTYPE_BFLOAT16, ob.data(), absl::MakeSpan(out));
    std::vector<double> ref(q.size()), ref_lse(n * kQo);
    client::DenseAttentionReference(params, q.data(), n, hk.data(), hv.data(),
                                    static_cast<int64_t>(hk.size() / (kKv * kDim)), ref.data(),
                                    ref_lse.data());
    EXPECT_LT(client::RelativeL2Error(out, ref), 1e-2) << n << " new tokens";
  }
  // An event on another device or an unknown one is refused by name.
  v1::AttentionRequest bad;
  bad.mutable_sync()->set_signal_event("nope");
  auto* item = bad.add_items();
  item->set_seq_id(1);
  item->set_num_new_tokens(1);
  *bad.mutable_q() = client::MakeTensorRef("gpu", q_off, v1::DTYPE_BFLOAT16, {1, kQo, kDim});
  *bad.mutable_k_new() = client::MakeTensorRef("gpu", k_off, v1::DTYPE_BFLOAT16, {1, kKv, kDim});
  *bad.mutable_v_new() = client::MakeTensorRef("gpu", v_off, v1::DTYPE_BFLOAT16, {1, kKv, kDim});
  *bad.mutable_out() = client::MakeTensorRef("gpu", out_off, v1::DTYPE_BFLOAT16, {1, kQo, kDim});
  const auto r = client_->Decode(bad);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
  EXPECT_TRUE(client_->UnregisterCudaEvent("ready").ok());
  EXPECT_TRUE(client_->UnregisterCudaEvent("written").ok());
  cudaStreamDestroy(stream);
  cudaEventDestroy(ready);
  cudaEventDestroy(written);
}

}  // namespace
}  // namespace attnd::testing
