// Memory and events other processes share with this one through CUDA IPC handles. Both are
// opened on a thread bound to their device and closed through run_on_device, which posts to
// the device's worker, so the close also runs on a thread bound to the device.
#ifndef ATTND_SERVER_CUDA_IPC_H_
#define ATTND_SERVER_CUDA_IPC_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "server/platform/platform.h"
#include "server/regions/event_registry.h"
#include "server/regions/region.h"

namespace attnd {

// Opens a cudaIpcMemHandle_t (64 raw bytes) and checks byte_size against the allocation's real
// extent, so a client cannot name more memory than it shared. INVALID_ARGUMENT naming
// ipc_handle or byte_size otherwise.
absl::StatusOr<std::unique_ptr<Region>> OpenCudaIpcRegion(std::string name,
                                                          const std::string& ipc_handle,
                                                          int device, uint64_t byte_size,
                                                          RunOnDevice run_on_device);

// Opens a cudaIpcEventHandle_t (64 raw bytes). INVALID_ARGUMENT naming ipc_handle otherwise.
absl::StatusOr<std::unique_ptr<IpcEvent>> OpenCudaIpcEvent(const std::string& ipc_handle,
                                                           int device, RunOnDevice run_on_device);

}  // namespace attnd

#endif  // ATTND_SERVER_CUDA_IPC_H_
