// The same-run ceiling of a KV pull within one GPU, and the pull's kernel against it, for the
// issue's sequence: 32 layers x 4096 tokens x 8 kv heads x 128, bf16, pages of 16, scattered
// page tables in pools of 1280 pages. Pulled whole (512 MiB) and as kv heads [0, 4) (256 MiB,
// into a 4-head pool), NHD and HND; each against cudaMemcpy of the same bytes device to device
// (what UCX's cuda_ipc does for one large request). GPU time (events), median of 10 after 2
// warm-ups; page lists already on the device.
//   copy_ceiling
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cuda/copy/copy.h"

namespace {

template <typename F>
float MedianMs(F&& launch) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    cudaEventRecord(start);
    launch();
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float t = 0;
    cudaEventElapsedTime(&t, start, stop);
    if (i >= 2) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main() {
  constexpr int64_t kLayers = 32, kTokens = 4096, kHeads = 8, kDim = 128, kPage = 16;
  constexpr int64_t kPool = 1280, kPages = kTokens / kPage;
  const size_t pool_bytes = size_t{kLayers} * kPool * 2 * kPage * kHeads * kDim * 2;
  void *src = nullptr, *dst = nullptr, *a = nullptr, *b = nullptr;
  if (cudaMalloc(&src, pool_bytes) != cudaSuccess || cudaMalloc(&dst, pool_bytes) != cudaSuccess)
    return 1;
  cudaMemset(src, 1, pool_bytes);
  std::mt19937 rng(1);
  std::vector<int32_t> ids(kPool);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  std::vector<int32_t> lists(ids.begin(), ids.begin() + 2 * kPages);  // source, then destination
  int32_t* d_lists = nullptr;
  cudaMalloc(&d_lists, lists.size() * sizeof(int32_t));
  cudaMemcpy(d_lists, lists.data(), lists.size() * sizeof(int32_t), cudaMemcpyHostToDevice);
  for (int layout = 0; layout < 2; ++layout) {
    for (int64_t heads : {kHeads, kHeads / 2}) {
      const size_t bytes = size_t{kLayers} * 2 * kTokens * heads * kDim * 2;
      cudaMalloc(&a, bytes);
      cudaMalloc(&b, bytes);
      const float memcpy_ms =
          MedianMs([&] { cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice); });
      attnd::kernels::cuda::PagedPullParams p;
      p.src = static_cast<const uint8_t*>(src);
      p.dst = static_cast<uint8_t*>(dst);
      p.src_pages = d_lists;
      p.dst_pages = d_lists + kPages;
      p.src_pool_pages = p.dst_pool_pages = kPool;
      p.src_heads = kHeads;
      p.dst_heads = heads;
      p.layer_end = kLayers;
      p.num_tokens = kTokens;
      p.page_size = kPage;
      p.head_dim = kDim;
      p.elem_bytes = 2;
      p.hnd = layout == 1;
      const float pull_ms =
          MedianMs([&] { (void)attnd::kernels::cuda::LaunchPagedPull(p, nullptr); });
      printf("copy_ceiling layout=%s heads=%lld bytes=%zu memcpy_ms=%.3f memcpy_GBps=%.1f "
             "pull_ms=%.3f pull_GBps=%.1f of_memcpy=%.2f\n",
             layout ? "HND" : "NHD", static_cast<long long>(heads), bytes, memcpy_ms,
             bytes / (memcpy_ms * 1e-3) / 1e9, pull_ms, bytes / (pull_ms * 1e-3) / 1e9,
             memcpy_ms / pull_ms);
      cudaFree(a);
      cudaFree(b);
    }
  }
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
