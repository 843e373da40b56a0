// A kernel that faults on purpose, so tests can check how a server handles a sticky device
// error (DESIGN.md invariant 6). Never launched in normal operation.
#include "kernels/cuda/attention_cuda.h"

namespace attnd::kernels::cuda {
namespace {

__global__ void TrapKernel() { __trap(); }

}  // namespace

cudaError_t LaunchFaultingKernel(cudaStream_t stream) {
  TrapKernel<<<1, 1, 0, stream>>>();
  return cudaGetLastError();
}

}  // namespace attnd::kernels::cuda
