#include "server/cpu/cpu_platform.h"

#include "server/cpu/cpu_backend.h"

namespace attnd {
namespace {

class CpuPlatform final : public DevicePlatform {
 public:
  Kind kind() const override { return Kind::kCpu; }
  bool SupportsIpc() const override { return false; }
  // The backend needs every core for attention; a polling worker would take one.
  std::chrono::microseconds DefaultWorkerSpin() const override {
    return std::chrono::microseconds(0);
  }
  std::vector<int> VisibleDevices() const override { return {0}; }
  absl::Status BindWorkerThread(int) override { return absl::OkStatus(); }
  absl::StatusOr<std::unique_ptr<DeviceBackend>> CreateBackend(const ServerConfig& config,
                                                               int device) override {
    return CreateCpuDeviceBackend(config, device);
  }
  Placement PlacementFor(int) const override { return Placement{true, -1}; }
  // Host regions are read in place by the backend's threads: nothing to pin.
  bool PinsHostMemory() const override { return false; }
  absl::Status PinHostMemory(void*, size_t) override { return absl::OkStatus(); }
  void UnpinHostMemory(void*) override {}
  absl::StatusOr<std::unique_ptr<Region>> OpenIpcRegion(std::string, const std::string&, int,
                                                        uint64_t, RunOnDevice) override {
    return absl::FailedPreconditionError(
        "this server runs the CPU backend, which cannot open CUDA IPC handles; register host "
        "(POSIX shared-memory) regions with RegisterHostRegion");
  }
  absl::StatusOr<std::unique_ptr<IpcEvent>> OpenIpcEvent(const std::string&, int,
                                                         RunOnDevice) override {
    return absl::FailedPreconditionError(
        "this server runs the CPU backend, which has no CUDA events; calls reply once outputs "
        "are written");
  }
};

}  // namespace

std::unique_ptr<DevicePlatform> CreateCpuPlatform() { return std::make_unique<CpuPlatform>(); }

}  // namespace attnd
