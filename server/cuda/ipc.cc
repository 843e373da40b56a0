#include "server/cuda/ipc.h"

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace attnd {
namespace {

class CudaIpcRegion final : public Region {
 public:
  CudaIpcRegion(std::string name, int device, uint8_t* base, uint64_t byte_size,
                RunOnDevice run_on_device)
      : Region(std::move(name), Kind::kCuda, device, base, byte_size),
        run_on_device_(std::move(run_on_device)) {}
  ~CudaIpcRegion() override {
    void* base = this->base();
    run_on_device_([base] { cudaIpcCloseMemHandle(base); });
  }
  std::string source() const override { return "cuda-ipc"; }

 private:
  const RunOnDevice run_on_device_;
};

class CudaIpcEvent final : public IpcEvent {
 public:
  CudaIpcEvent(int device, cudaEvent_t event, RunOnDevice run_on_device)
      : device_(device), event_(event), run_on_device_(std::move(run_on_device)) {}
  ~CudaIpcEvent() override {
    cudaEvent_t e = event_;
    run_on_device_([e] { cudaEventDestroy(e); });
  }
  int device() const override { return device_; }
  void* event() const override { return event_; }

 private:
  const int device_;
  const cudaEvent_t event_;
  const RunOnDevice run_on_device_;
};

using MemGetAddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);

// Bytes of the allocation from ptr to its end, from the driver; 0 when the driver cannot say.
// The entry point is fetched at run time: attnd links no libcuda.
uint64_t AllocationExtent(void* ptr) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found;
  if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault,
                                       &found) != cudaSuccess ||
      found != cudaDriverEntryPointSuccess || fn == nullptr)
    return 0;
  CUdeviceptr base = 0;
  size_t size = 0;
  const auto at = reinterpret_cast<CUdeviceptr>(ptr);
  if (reinterpret_cast<MemGetAddressRange>(fn)(&base, &size, at) != CUDA_SUCCESS) return 0;
  return size - (at - base);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Region>> OpenCudaIpcRegion(std::string name,
                                                          const std::string& ipc_handle,
                                                          int device, uint64_t byte_size,
                                                          RunOnDevice run_on_device) {
  cudaIpcMemHandle_t handle;
  if (ipc_handle.size() != sizeof(handle)) {
    return absl::InvalidArgumentError(absl::StrCat("ipc_handle: ", ipc_handle.size(),
                                                   " bytes, a cudaIpcMemHandle_t has ",
                                                   sizeof(handle)));
  }
  if (byte_size == 0) return absl::InvalidArgumentError("byte_size: must be > 0");
  std::memcpy(&handle, ipc_handle.data(), sizeof(handle));
  void* ptr = nullptr;
  const cudaError_t e = cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it
    return absl::InvalidArgumentError(absl::StrCat("ipc_handle: cannot open on device ", device,
                                                   ": ", cudaGetErrorString(e)));
  }
  const uint64_t extent = AllocationExtent(ptr);
  if (extent == 0 || byte_size > extent) {
    cudaIpcCloseMemHandle(ptr);
    return absl::InvalidArgumentError(
        extent == 0 ? std::string("ipc_handle: cannot read the allocation's extent")
                    : absl::StrCat("byte_size: ", byte_size, " exceeds the ", extent,
                                   " bytes of the shared allocation"));
  }
  return std::unique_ptr<Region>(new CudaIpcRegion(std::move(name), device,
                                                   static_cast<uint8_t*>(ptr), byte_size,
                                                   std::move(run_on_device)));
}

absl::StatusOr<std::unique_ptr<IpcEvent>> OpenCudaIpcEvent(const std::string& ipc_handle,
                                                           int device, RunOnDevice run_on_device) {
  cudaIpcEventHandle_t handle;
  if (ipc_handle.size() != sizeof(handle)) {
    return absl::InvalidArgumentError(absl::StrCat("ipc_handle: ", ipc_handle.size(),
                                                   " bytes, a cudaIpcEventHandle_t has ",
                                                   sizeof(handle)));
  }
  std::memcpy(&handle, ipc_handle.data(), sizeof(handle));
  cudaEvent_t event = nullptr;
  const cudaError_t e = cudaIpcOpenEventHandle(&event, handle);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it
    return absl::InvalidArgumentError(absl::StrCat("ipc_handle: cannot open the event on device ",
                                                   device, ": ", cudaGetErrorString(e)));
  }
  return std::unique_ptr<IpcEvent>(new CudaIpcEvent(device, event, std::move(run_on_device)));
}

}  // namespace attnd
