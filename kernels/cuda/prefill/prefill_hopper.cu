// The Hopper prefill kernel's translation unit: its instantiations (bf16 and fp16, head_dim 64
// and 128) and their host side. The kernel body is sm_90a code only (ATTND_WGMMA_AVAILABLE);
// ATTND_BUILT_FOR_SM90A tells the host whether the build has it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/common/launch.h"
#include "kernels/cuda/prefill/prefill.h"
#include "kernels/cuda/prefill/prefill_hopper.cuh"
#include "kernels/cuda/prefill/prefill_hopper_launch.h"
#include "kernels/cuda/prefill/prefill_params.cuh"

namespace attnd::kernels::cuda {
namespace detail {

namespace {

template <typename T, int D, bool kPingPong>
cudaError_t PrepareHopperKernel(int device) {
  static OncePerDevice once;
  return AllowDynamicSmem(
      once, device, reinterpret_cast<const void*>(&BatchPrefillHopperKernel<T, D, kPingPong>),
      HopperPrefillTraits<D>::kSmemBytes);
}

template <typename T, int D, bool kPingPong>
cudaError_t LaunchHopperPrefillKernel(const PrefillParams& p, dim3 grid, int device,
                                      cudaStream_t stream) {
  using Tr = HopperPrefillTraits<D>;
  cudaError_t e = PrepareHopperKernel<T, D, kPingPong>(device);
  if (e != cudaSuccess) return e;
  if (p.work_counters != nullptr) {  // persistent: a CTA per slot, no more than the units' grid
    static ResidentCtas resident;
    int ctas = 0;
    e = resident.Get(device,
                     reinterpret_cast<const void*>(&BatchPrefillHopperKernel<T, D, kPingPong>),
                     Tr::kThreads, Tr::kSmemBytes, &ctas);
    if (e != cudaSuccess) return e;
    grid = dim3(std::min(static_cast<unsigned>(ctas), grid.x * grid.y));
  }
  BatchPrefillHopperKernel<T, D, kPingPong><<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

template <typename T, int D>
cudaError_t LaunchHopperPrefill(const PrefillParams& p, dim3 grid, bool wide_items, int device,
                                cudaStream_t stream) {
  return wide_items ? LaunchHopperPrefillKernel<T, D, true>(p, grid, device, stream)
                    : LaunchHopperPrefillKernel<T, D, false>(p, grid, device, stream);
}

template <typename T, int D>
cudaError_t HopperPrefillOccupancy(int device, int* blocks) {
  using Tr = HopperPrefillTraits<D>;
  const cudaError_t e = PrepareHopperKernel<T, D, true>(device);
  if (e != cudaSuccess) return e;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      blocks, &BatchPrefillHopperKernel<T, D, true>, Tr::kThreads, Tr::kSmemBytes);
}

#define ATTND_INSTANTIATE_HOPPER_PREFILL(T, D)                                               \
  template cudaError_t LaunchHopperPrefill<T, D>(const PrefillParams&, dim3, bool, int,     \
                                                 cudaStream_t);                             \
  template cudaError_t HopperPrefillOccupancy<T, D>(int, int*);
ATTND_INSTANTIATE_HOPPER_PREFILL(__nv_bfloat16, 64)
ATTND_INSTANTIATE_HOPPER_PREFILL(__nv_bfloat16, 128)
ATTND_INSTANTIATE_HOPPER_PREFILL(__half, 64)
ATTND_INSTANTIATE_HOPPER_PREFILL(__half, 128)
#undef ATTND_INSTANTIATE_HOPPER_PREFILL

absl::Status HopperPrefillUnavailable(int device, int64_t head_dim) {
#if !defined(ATTND_BUILT_FOR_SM90A)
  (void)device;
  (void)head_dim;
  return absl::UnimplementedError(
      "prefill: the Hopper kernel is not in this build (CMAKE_CUDA_ARCHITECTURES lacks 90a)");
#else
  if (head_dim != 64 && head_dim != 128) {
    return absl::UnimplementedError(absl::StrCat("prefill: the Hopper kernel has no head_dim ",
                                                 head_dim, " (64 or 128)"));
  }
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return absl::FailedPreconditionError(absl::StrCat(
        "prefill: the Hopper kernel needs compute capability 9.0; device ", device,
        " could not be queried"));
  }
  if (major == 9 && minor == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "prefill: the Hopper kernel runs on devices 0 to 63 only; device ", device));
  }
  return absl::FailedPreconditionError(
      absl::StrCat("prefill: the Hopper kernel needs compute capability 9.0 (wgmma is sm_90a "
                   "only); device ",
                   device, " has ", major, ".", minor));
#endif
}

}  // namespace detail

bool HopperPrefillAvailable(int device, int64_t head_dim) {
#if defined(ATTND_BUILT_FOR_SM90A)
  if (head_dim != 64 && head_dim != 128) return false;
  // wgmma is sm_90a only: later majors run the portable kernel.
  static std::atomic<uint64_t> known{0}, yes{0};
  const uint64_t bit = device >= 0 && device < 64 ? (1ull << device) : 0;
  if (bit == 0) return false;
  if (known.load(std::memory_order_acquire) & bit) {
    return (yes.load(std::memory_order_acquire) & bit) != 0;
  }
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return false;
  }
  if (major == 9 && minor == 0) yes.fetch_or(bit, std::memory_order_acq_rel);
  known.fetch_or(bit, std::memory_order_acq_rel);
  return major == 9 && minor == 0;
#else
  (void)device;
  (void)head_dim;
  return false;
#endif
}

}  // namespace attnd::kernels::cuda
