// A kernel that faults on purpose, so tests can check how a server handles a sticky device
// error (DESIGN.md invariant 6). Never launched in normal operation; too small for a kernel
// header of its own.
#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "kernels/cuda/common/launch.h"
#include "kernels/cuda/fault/fault.h"

namespace attnd::kernels::cuda {
namespace {

__global__ void TrapKernel() { __trap(); }

}  // namespace

absl::Status LaunchFaultingKernel(cudaStream_t stream) {
  TrapKernel<<<1, 1, 0, stream>>>();
  return detail::CudaStatus(cudaGetLastError(), "faulting kernel launch");
}

}  // namespace attnd::kernels::cuda
