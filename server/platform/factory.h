// The one place that knows which platforms this build has: --backend=cuda insists on CUDA,
// auto takes it when a device is visible and the model fits the CUDA kernels, cpu never does.
#ifndef ATTND_SERVER_PLATFORM_FACTORY_H_
#define ATTND_SERVER_PLATFORM_FACTORY_H_

#include <memory>

#include "absl/status/statusor.h"
#include "server/config/config.h"
#include "server/platform/platform.h"

namespace attnd {

absl::StatusOr<std::unique_ptr<DevicePlatform>> CreateDevicePlatform(const ServerConfig& config);

}  // namespace attnd

#endif  // ATTND_SERVER_PLATFORM_FACTORY_H_
