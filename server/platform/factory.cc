#include "server/platform/factory.h"

#include <string>

#include "server/cpu/cpu_platform.h"
#include "spdlog/spdlog.h"
#ifdef ATTND_HAVE_CUDA
#include "server/cuda/cuda_platform.h"
#endif

namespace attnd {

absl::StatusOr<std::unique_ptr<DevicePlatform>> CreateDevicePlatform(const ServerConfig& config) {
  if (config.backend == BackendChoice::kCpu) return CreateCpuPlatform();
#ifdef ATTND_HAVE_CUDA
  auto cuda = CreateCudaPlatform(config);
  if (cuda.ok()) return cuda;
  if (config.backend == BackendChoice::kCuda) return cuda.status();
  spdlog::info("backend=auto: serving on the CPU ({})", std::string(cuda.status().message()));
  return CreateCpuPlatform();
#else
  if (config.backend == BackendChoice::kCuda)
    return absl::FailedPreconditionError("--backend=cuda: this build has no CUDA (ATTND_CUDA=OFF)");
  spdlog::info("backend=auto: this build has no CUDA backend, serving on the CPU");
  return CreateCpuPlatform();
#endif
}

}  // namespace attnd
