// Helpers shared by the CUDA benchmarks: error checks, random fill, timing through graphs.
#ifndef ATTND_BENCH_BENCH_UTIL_CUH_
#define ATTND_BENCH_BENCH_UTIL_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define CK(x)                                                                                 \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

// The same for the kernels' launchers and configs (absl::Status).
#define CK_OK(x)                                                                              \
  do {                                                                                        \
    const absl::Status s_ = (x);                                                              \
    if (!s_.ok()) {                                                                           \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, s_.ToString().c_str()); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

namespace attnd::bench {

// The value, or exit with the error.
template <typename T>
T ValueOrExit(absl::StatusOr<T> v, const char* what) {
  if (!v.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, v.status().ToString().c_str());
    std::exit(1);
  }
  return *std::move(v);
}

// Values in [-1.7, 1.7) from a hash of the index: never zeros, the same for a given seed.
__global__ inline void FillRandom(uint16_t* p, size_t n, uint32_t seed, bool bf16) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 15; x *= 2246822519u; x ^= x >> 13; x *= 3266489917u; x ^= x >> 16;
    const float f = (static_cast<float>(x & 0xffff) / 65536.f - 0.5f) * 3.4f;
    if (bf16) {
      __nv_bfloat16 b = __float2bfloat16(f);
      p[i] = *reinterpret_cast<uint16_t*>(&b);
    } else {
      __half h = __float2half(f);
      p[i] = *reinterpret_cast<uint16_t*>(&h);
    }
  }
}

inline float Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Times `body` (enqueueing `per_graph` operations) through a graph: median ms per operation.
template <typename F>
float TimeGraph(cudaStream_t s, int per_graph, F body, int reps = 30) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  body();
  CK(cudaStreamEndCapture(s, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) CK(cudaGraphLaunch(ge, s));
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(a, s));
    CK(cudaGraphLaunch(ge, s));
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms / per_graph);
  }
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return Median(t);
}

}  // namespace attnd::bench

#endif  // ATTND_BENCH_BENCH_UTIL_CUH_
