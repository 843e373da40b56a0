// The CPU platform: backends with pools in host memory, serving tensors in host (POSIX
// shared-memory) regions only. It has no IPC: clients register host regions and calls reply
// once their outputs are written.
#ifndef ATTND_SERVER_CPU_CPU_PLATFORM_H_
#define ATTND_SERVER_CPU_CPU_PLATFORM_H_

#include <memory>

#include "server/platform/platform.h"

namespace attnd {

std::unique_ptr<DevicePlatform> CreateCpuPlatform();

}  // namespace attnd

#endif  // ATTND_SERVER_CPU_CPU_PLATFORM_H_
