// The CPU backend: a device's KV pool in host memory, attention computed in fp32
// (kernels/cpu_attention.h) on a pool of threads. The reference the CUDA backend is compared
// with, and what lets attnd serve on a machine without a GPU. Work is synchronous: a call
// returns once its outputs are written.
#ifndef ATTND_SERVER_CPU_CPU_BACKEND_H_
#define ATTND_SERVER_CPU_CPU_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "server/config/config.h"
#include "server/platform/backend.h"

namespace attnd {

// The pool holds --pages_per_device pages, or --memory_fraction of physical memory (reserved,
// not touched: pages cost memory once written). Runs --cpu_threads threads (the caller's
// included).
absl::StatusOr<std::unique_ptr<DeviceBackend>> CreateCpuDeviceBackend(const ServerConfig& config,
                                                                       int device);

}  // namespace attnd

#endif  // ATTND_SERVER_CPU_CPU_BACKEND_H_
