#include "server/cuda/device.h"

#include <cuda_runtime_api.h>

#include "absl/strings/str_cat.h"
#include "server/cuda/cuda_check.h"

namespace attnd {

int CudaDeviceCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

absl::Status BindThreadToDevice(int device) {
  return Check(cudaSetDevice(device), absl::StrCat("cudaSetDevice(", device, ")"));
}

absl::Status CheckCudaSupport(const ServerConfig& config, int device) {
  const int count = CudaDeviceCount();
  if (device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("--devices: CUDA device ", device, " does not exist (", count, " found)"));
  }
  const ModelShape& m = config.model;
  if (m.dtype == kernels::DType::kFloat32)
    return absl::InvalidArgumentError("--dtype=fp32: the CUDA backend serves bf16 and fp16");
  if (m.head_dim != 64 && m.head_dim != 128 && m.head_dim != 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("--head_dim=", m.head_dim, ": the CUDA backend serves 64, 128 and 256"));
  }
  return absl::OkStatus();
}

absl::Status RegisterHostMemory(void* data, size_t bytes) {
  const cudaError_t e =
      cudaHostRegister(data, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it, or the next call on this thread reports it
    return absl::FailedPreconditionError(
        absl::StrCat("cannot page-lock the host region for the GPUs: ", cudaGetErrorString(e)));
  }
  return absl::OkStatus();
}

void UnregisterHostMemory(void* data) { cudaHostUnregister(data); }

}  // namespace attnd
