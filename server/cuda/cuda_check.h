// What every file of the CUDA room shares: absl::Status from cudaError_t, and owners that give
// device memory, pinned memory, streams and events back when they go out of scope (so an early
// error return during set-up leaks nothing).
#ifndef ATTND_SERVER_CUDA_CUDA_CHECK_H_
#define ATTND_SERVER_CUDA_CUDA_CHECK_H_

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace attnd {

// INTERNAL naming what was being done; the message carries the error's name and text, which
// is what the log of a sticky fault needs.
inline absl::Status Check(cudaError_t e, absl::string_view what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

// The kernels' launchers say what is wrong but not which launch of the server it was.
inline absl::Status Annotate(const absl::Status& s, absl::string_view what) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(what, ": ", s.message()));
}

#define ATTND_CUDA_RETURN(expr, what)                                       \
  do {                                                                      \
    if (absl::Status s_ = ::attnd::Check((expr), (what)); !s_.ok()) return s_; \
  } while (0)

struct DeviceFree {
  void operator()(void* p) const { cudaFree(p); }
};
using DeviceBuffer = std::unique_ptr<void, DeviceFree>;

struct PinnedFree {
  void operator()(void* p) const { cudaFreeHost(p); }
};
using PinnedBuffer = std::unique_ptr<void, PinnedFree>;

struct StreamDestroy {
  void operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
};
using Stream = std::unique_ptr<CUstream_st, StreamDestroy>;

struct EventDestroy {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};
using Event = std::unique_ptr<CUevent_st, EventDestroy>;

// RESOURCE_EXHAUSTED naming the buffer: running out of device memory at start-up is a
// configuration problem (pool or workspace too large), not a fault. At least 256 bytes, so a
// buffer sized 0 by its planner is still a valid pointer for the kernels' argument checks.
inline absl::StatusOr<DeviceBuffer> AllocateDevice(size_t bytes, absl::string_view what) {
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 256));
  if (e != cudaSuccess) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", bytes,
                                                     " bytes of device memory for ", what, ": ",
                                                     cudaGetErrorString(e)));
  }
  return DeviceBuffer(p);
}

}  // namespace attnd

#endif  // ATTND_SERVER_CUDA_CUDA_CHECK_H_
