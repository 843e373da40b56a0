// Testing aid: a kernel that faults on purpose.
#ifndef ATTND_KERNELS_CUDA_FAULT_FAULT_H_
#define ATTND_KERNELS_CUDA_FAULT_FAULT_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"

namespace attnd::kernels::cuda {

// Launches a kernel that traps: the device's context takes a sticky error. Only for tests of
// fault handling (the launch itself succeeds; the error shows at the next synchronization).
absl::Status LaunchFaultingKernel(cudaStream_t stream);

}  // namespace attnd::kernels::cuda

#endif  // ATTND_KERNELS_CUDA_FAULT_FAULT_H_
