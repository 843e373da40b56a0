// The CUDA platform: worker threads bound to their devices, backends with pools in device
// memory, host regions page-locked for every device, and CUDA IPC memory and events.
#ifndef ATTND_SERVER_CUDA_CUDA_PLATFORM_H_
#define ATTND_SERVER_CUDA_CUDA_PLATFORM_H_

#include <memory>

#include "absl/status/statusor.h"
#include "server/config/config.h"
#include "server/platform/platform.h"

namespace attnd {

// FAILED_PRECONDITION "no CUDA device is visible" when there is none; otherwise the first
// configured device or model shape the CUDA kernels cannot serve, in --devices order
// (INVALID_ARGUMENT naming the flag). The caller decides whether to fall back to the CPU.
absl::StatusOr<std::unique_ptr<DevicePlatform>> CreateCudaPlatform(const ServerConfig& config);

}  // namespace attnd

#endif  // ATTND_SERVER_CUDA_CUDA_PLATFORM_H_
