#include "server/cuda/cuda_platform.h"

#include <utility>

#include "server/cuda/backend.h"
#include "server/cuda/device.h"
#include "server/cuda/ipc.h"

namespace attnd {
namespace {

class CudaPlatform final : public DevicePlatform {
 public:
  Kind kind() const override { return Kind::kCuda; }
  bool SupportsIpc() const override { return true; }
  // The worker already spins through every GPU wait (cudaStreamSynchronize under the default
  // schedule); polling a little for the next call saves a thread wake-up per call.
  std::chrono::microseconds DefaultWorkerSpin() const override {
    return std::chrono::microseconds(200);
  }
  std::vector<int> VisibleDevices() const override {
    std::vector<int> all(static_cast<size_t>(CudaDeviceCount()));
    for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int>(i);
    return all;
  }
  absl::Status BindWorkerThread(int device) override { return BindThreadToDevice(device); }
  absl::StatusOr<std::unique_ptr<DeviceBackend>> CreateBackend(const ServerConfig& config,
                                                               int device) override {
    return CreateCudaDeviceBackend(config, device);
  }
  // A device's kernels read its own memory, and host memory page-locked for every device.
  Placement PlacementFor(int device) const override { return Placement{true, device}; }
  // Kernels reach host memory only once the driver has page-locked it.
  bool PinsHostMemory() const override { return true; }
  absl::Status PinHostMemory(void* data, size_t bytes) override {
    return RegisterHostMemory(data, bytes);
  }
  // The pointer names the registration: no device needs to be current.
  void UnpinHostMemory(void* data) override { UnregisterHostMemory(data); }
  absl::StatusOr<std::unique_ptr<Region>> OpenIpcRegion(std::string name,
                                                        const std::string& handle, int device,
                                                        uint64_t byte_size,
                                                        RunOnDevice run_on_device) override {
    return OpenCudaIpcRegion(std::move(name), handle, device, byte_size,
                             std::move(run_on_device));
  }
  absl::StatusOr<std::unique_ptr<IpcEvent>> OpenIpcEvent(const std::string& handle, int device,
                                                         RunOnDevice run_on_device) override {
    return OpenCudaIpcEvent(handle, device, std::move(run_on_device));
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<DevicePlatform>> CreateCudaPlatform(const ServerConfig& config) {
  if (CudaDeviceCount() == 0) return absl::FailedPreconditionError("no CUDA device is visible");
  auto platform = std::make_unique<CudaPlatform>();
  const std::vector<int> devices =
      config.devices.empty() ? platform->VisibleDevices() : config.devices;
  for (int d : devices) {
    if (absl::Status s = CheckCudaSupport(config, d); !s.ok()) return s;
  }
  return platform;
}

}  // namespace attnd
