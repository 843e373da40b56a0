// The CUDA backend of one device: the KV pool in device memory, attention through the kernels
// of kernels/cuda, launched eagerly or replayed through captured decode graphs, on the
// device's own stream.
#ifndef ATTND_SERVER_CUDA_BACKEND_H_
#define ATTND_SERVER_CUDA_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "server/config/config.h"
#include "server/platform/backend.h"

namespace attnd {

// On a thread bound to `device`; the backend's calls come from that thread too. Sizes the
// workspaces first, then gives the pool its share of the memory left, then captures the
// graphs (with --cuda_graphs).
absl::StatusOr<std::unique_ptr<DeviceBackend>> CreateCudaDeviceBackend(const ServerConfig& config,
                                                                        int device);

}  // namespace attnd

#endif  // ATTND_SERVER_CUDA_BACKEND_H_
