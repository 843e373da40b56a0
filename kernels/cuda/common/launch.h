// Host helpers every launcher shares: CUDA errors as absl::Status, kernel launches with or
// without programmatic dependent launch (PDL), the once-per-device kernel attribute, and the
// current device for a scope. Included by the launchers (.cu) only.
#ifndef ATTND_KERNELS_CUDA_COMMON_LAUNCH_H_
#define ATTND_KERNELS_CUDA_COMMON_LAUNCH_H_

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace attnd::kernels::cuda::detail {

// InternalError("what: cudaErrorXxx (text)") for a failed CUDA call; OK for cudaSuccess.
inline absl::Status CudaStatus(cudaError_t e, absl::string_view what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

// InvalidArgumentError("family: ...") for an argument a kernel cannot take; the message names the
// argument, its value and the limit.
template <typename... Args>
absl::Status InvalidArg(absl::string_view family, const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat(family, ": ", args...));
}

// kernel<<<grid, block, smem_bytes, stream>>>(args...), through cudaLaunchKernelEx so that it
// can carry the PDL attribute: with `programmatic` the kernel's CTAs may start while the
// previous kernel on the stream finishes, and the kernel waits for it (GridDependencyWait)
// before reading its results.
template <typename... Params, typename... Args>
cudaError_t LaunchKernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                         cudaStream_t stream, bool programmatic, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// A set-up step that is per device context (a kernel attribute), run until it succeeds once
// per device and process rather than on every launch, where it would cost a driver call.
// Devices past 63 run it every time.
class OncePerDevice {
 public:
  template <typename F>
  cudaError_t Run(int device, F&& step) {
    const uint64_t bit = device >= 0 && device < 64 ? (uint64_t{1} << device) : 0;
    if (bit != 0 && (done_.load(std::memory_order_acquire) & bit)) return cudaSuccess;
    const cudaError_t e = step();
    if (e == cudaSuccess && bit != 0) done_.fetch_or(bit, std::memory_order_acq_rel);
    return e;
  }

 private:
  std::atomic<uint64_t> done_{0};
};

// The CTAs of one kernel configuration that the device holds at once (SMs x occupancy): whether
// a grid runs in one wave, or a persistent grid's size. Asked once per device (the first 64),
// not on every launch; `device` must be current.
class ResidentCtas {
 public:
  cudaError_t Get(int device, const void* kernel, int threads, size_t smem_bytes, int* ctas) {
    const bool cached = device >= 0 && device < 64;
    if (cached && (*ctas = known_[device].load(std::memory_order_relaxed)) > 0) {
      return cudaSuccess;
    }
    int sms = 0, blocks = 0;
    cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess) {
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem_bytes);
    }
    if (e != cudaSuccess) return e;
    *ctas = sms * blocks > 0 ? sms * blocks : 1;
    if (cached) known_[device].store(*ctas, std::memory_order_relaxed);
    return cudaSuccess;
  }

 private:
  std::atomic<int> known_[64] = {};
};

// Lets `kernel` take `bytes` of dynamic shared memory (over the 48 KiB default) on `device`,
// which must be current.
inline cudaError_t AllowDynamicSmem(OncePerDevice& once, int device, const void* kernel,
                                    int bytes) {
  return once.Run(device, [&] {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  });
}

// Makes `device` current for the object's life, then restores the caller's device: the plan
// configs query a device from whatever thread (and current device) the caller has.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) {
    error_ = cudaGetDevice(&previous_);
    if (error_ == cudaSuccess && previous_ != device) {
      error_ = cudaSetDevice(device);
      switched_ = error_ == cudaSuccess;
    }
  }
  ~ScopedDevice() {
    if (switched_) cudaSetDevice(previous_);
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

  // cudaSuccess when `device` is current.
  cudaError_t error() const { return error_; }

 private:
  int previous_ = 0;
  bool switched_ = false;
  cudaError_t error_ = cudaSuccess;
};

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_COMMON_LAUNCH_H_
