// Constants of the kernels' log2-domain softmax, shared by host and device code: the kernels
// keep logits and lse in log2 units so that every exponential is one ex2.approx.
#ifndef ATTND_KERNELS_CUDA_COMMON_CONSTANTS_H_
#define ATTND_KERNELS_CUDA_COMMON_CONSTANTS_H_

namespace attnd::kernels::cuda::detail {

inline constexpr float kLn2 = 0.69314718055994531f;   // log2-units lse -> natural log
inline constexpr float kLog2e = 1.4426950408889634f;  // natural-log logits -> log2 units

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_COMMON_CONSTANTS_H_
