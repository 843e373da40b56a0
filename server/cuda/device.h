// The devices of this machine as the server sees them: how many there are, binding a thread to
// one, whether the configured model runs on one, and page-locking host memory for all of them.
// Every function that touches a device runs on a thread bound to it (BindThreadToDevice); none
// relies on whatever device another thread made current.
#ifndef ATTND_SERVER_CUDA_DEVICE_H_
#define ATTND_SERVER_CUDA_DEVICE_H_

#include <cstddef>

#include "absl/status/status.h"
#include "server/config/config.h"

namespace attnd {

// 0 when there is no driver or no device.
int CudaDeviceCount();

absl::Status BindThreadToDevice(int device);

// INVALID_ARGUMENT naming the flag when the device does not exist or the model does not fit
// the CUDA kernels (fp16/bf16, head_dim 64/128/256).
absl::Status CheckCudaSupport(const ServerConfig& config, int device);

// Page-locks host memory (portable, mapped) so kernels on every device read and write it in
// place: host regions of small tests and of clients without CUDA memory. FAILED_PRECONDITION
// when the driver refuses. Undone by UnregisterHostMemory before the memory is unmapped.
absl::Status RegisterHostMemory(void* data, size_t bytes);
void UnregisterHostMemory(void* data);

}  // namespace attnd

#endif  // ATTND_SERVER_CUDA_DEVICE_H_
