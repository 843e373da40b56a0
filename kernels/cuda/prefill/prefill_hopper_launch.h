// Host side of the Hopper prefill kernel, which lives in its own translation unit
// (prefill_hopper.cu) so that the wgmma code compiles apart from the portable kernel. For the
// launcher (prefill.cu) only.
#ifndef ATTND_KERNELS_CUDA_PREFILL_PREFILL_HOPPER_LAUNCH_H_
#define ATTND_KERNELS_CUDA_PREFILL_PREFILL_HOPPER_LAUNCH_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/prefill/prefill_params.cuh"

namespace attnd::kernels::cuda::detail {

// Launches BatchPrefillHopperKernel<T, D> (D 64 or 128; instantiated in prefill_hopper.cu) on
// `device`, the current device.
// wide_items false: the batch has narrow items only (the kernel without the ping-pong).
template <typename T, int D>
cudaError_t LaunchHopperPrefill(const PrefillParams& p, dim3 grid, bool wide_items, int device,
                                cudaStream_t stream);

// The Hopper kernel's resident CTAs per SM on `device`, the current device.
template <typename T, int D>
cudaError_t HopperPrefillOccupancy(int device, int* blocks);

// Why the Hopper kernel cannot run for (device, head_dim): UnimplementedError when the build or
// head_dim rules it out, FailedPreconditionError when the device does.
absl::Status HopperPrefillUnavailable(int device, int64_t head_dim);

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_PREFILL_PREFILL_HOPPER_LAUNCH_H_
