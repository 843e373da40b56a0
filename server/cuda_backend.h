// The CUDA side of the server: device discovery, binding a worker thread to its device, the
// CUDA backend (pool in device memory, kernels from kernels/cuda), CUDA IPC regions, and host
// regions registered with the driver so kernels can read them. Built only with ATTND_CUDA.
// Every function that touches a device must run on a thread bound to it (BindThreadToDevice);
// none relies on whatever device another thread made current.
#ifndef ATTND_SERVER_CUDA_BACKEND_H_
#define ATTND_SERVER_CUDA_BACKEND_H_

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/backend.h"
#include "server/config.h"
#include "server/region.h"

namespace attnd {

// 0 when there is no driver or no device (the CPU backend is used then).
int CudaDeviceCount();
absl::Status BindThreadToDevice(int device);
// Checks that the device exists and the model fits the CUDA kernels (fp16/bf16, head_dim
// 64/128/256, page size 1..64).
absl::Status CheckCudaSupport(const ServerConfig& config, int device);

// On a thread bound to `device`.
absl::StatusOr<std::unique_ptr<DeviceBackend>> CreateCudaDeviceBackend(const ServerConfig& config,
                                                                        int device);

// Opens a cudaIpcMemHandle_t (64 raw bytes) on a thread bound to `device` and checks byte_size
// against the allocation's real extent. `close` runs the unmapping; the caller makes it post
// to the device's worker, so the handle is closed from a thread bound to the device.
absl::StatusOr<std::unique_ptr<Region>> OpenCudaIpcRegion(
    std::string name, const std::string& ipc_handle, int device, uint64_t byte_size,
    std::function<void(std::function<void()>)> run_on_device);

// A cudaIpcEventHandle_t (64 raw bytes) opened on a thread bound to `device`; destroyed on the
// device's worker through run_on_device.
class CudaIpcEvent {
 public:
  virtual ~CudaIpcEvent() = default;
  virtual int device() const = 0;
  virtual void* event() const = 0;  // a cudaEvent_t
};
absl::StatusOr<std::unique_ptr<CudaIpcEvent>> OpenCudaIpcEvent(
    const std::string& ipc_handle, int device,
    std::function<void(std::function<void()>)> run_on_device);

// Page-locks a host region's memory so kernels on every device can read and write it (small
// tests and clients without CUDA memory). Undone by UnregisterHostMemory.
absl::Status RegisterHostMemory(void* data, size_t bytes);
void UnregisterHostMemory(void* data);

}  // namespace attnd

#endif  // ATTND_SERVER_CUDA_BACKEND_H_
