// The platform seam (LevelDB's Env is the model): everything the engine needs from the machine
// a device lives on. The CPU platform (server/cpu) serves host memory only; the CUDA platform
// (server/cuda) binds worker threads to devices, page-locks host regions, opens CUDA IPC
// memory and events, and makes CUDA backends. The engine never names CUDA; the one factory
// (server/platform/factory.h) picks the platform.
#ifndef ATTND_SERVER_PLATFORM_PLATFORM_H_
#define ATTND_SERVER_PLATFORM_PLATFORM_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/config/config.h"
#include "server/platform/backend.h"
#include "server/regions/event_registry.h"
#include "server/regions/region.h"
#include "server/regions/tensor_ref.h"

namespace attnd {

// Posts a function to a device's worker thread (which is bound to the device): where the
// platform's objects are closed, so every CUDA call stays on the owning device's thread.
using RunOnDevice = std::function<void(std::function<void()>)>;

class DevicePlatform {
 public:
  enum class Kind { kCpu, kCuda };

  virtual ~DevicePlatform() = default;
  virtual Kind kind() const = 0;
  // Whether clients may share device memory and events (RegisterCudaRegion/Event, sync).
  virtual bool SupportsIpc() const = 0;
  // How long a device worker polls for work before it sleeps, when --worker_spin_us is unset.
  virtual std::chrono::microseconds DefaultWorkerSpin() const = 0;
  // The devices --devices=all serves.
  virtual std::vector<int> VisibleDevices() const = 0;
  // Runs first on each device's worker thread, which then serves only that device.
  virtual absl::Status BindWorkerThread(int device) = 0;
  // On the device's worker.
  virtual absl::StatusOr<std::unique_ptr<DeviceBackend>> CreateBackend(const ServerConfig& config,
                                                                       int device) = 0;
  // Where the tensors of requests that run on `device` may live.
  virtual Placement PlacementFor(int device) const = 0;
  // Whether host regions must be pinned before kernels use them. If so, PinHostMemory makes a
  // mapping reachable by every device's kernels (CUDA: page-locks it), called from the first
  // device's worker, and UnpinHostMemory undoes it before the mapping goes.
  virtual bool PinsHostMemory() const = 0;
  virtual absl::Status PinHostMemory(void* data, size_t bytes) = 0;
  virtual void UnpinHostMemory(void* data) = 0;
  // On the device's worker. `handle` is the client's raw IPC handle (64 bytes); the region is
  // closed through run_on_device. FAILED_PRECONDITION where the platform has no IPC.
  virtual absl::StatusOr<std::unique_ptr<Region>> OpenIpcRegion(std::string name,
                                                                const std::string& handle,
                                                                int device, uint64_t byte_size,
                                                                RunOnDevice run_on_device) = 0;
  virtual absl::StatusOr<std::unique_ptr<IpcEvent>> OpenIpcEvent(const std::string& handle,
                                                                 int device,
                                                                 RunOnDevice run_on_device) = 0;
};

}  // namespace attnd

#endif  // ATTND_SERVER_PLATFORM_PLATFORM_H_
