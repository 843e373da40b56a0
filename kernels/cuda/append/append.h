// Append: scatter new tokens' K and V into their page slots.
#ifndef ATTND_KERNELS_CUDA_APPEND_APPEND_H_
#define ATTND_KERNELS_CUDA_APPEND_APPEND_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/common/paged_kv_args.h"

namespace attnd::kernels::cuda {

// Writes num_tokens tokens' K and V, each [num_tokens][kv_heads][head_dim] (heads contiguous,
// tokens `*_token_stride` elements apart, a multiple of 8), into their page slots. slot_mapping
// [num_tokens] holds page * page_size + slot for each token; a negative entry skips the token
// (padding in a graph bucket). Two tokens must not name the same slot.
struct AppendArgs {
  PagedKv kv;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t k_token_stride = 0;
  int64_t v_token_stride = 0;
  const int64_t* slot_mapping = nullptr;
  int64_t num_tokens = 0;
};

// InvalidArgumentError naming the argument and its limit for arguments the kernel cannot take;
// InternalError for a failed launch.
absl::Status LaunchAppendKv(const AppendArgs& args, cudaStream_t stream);

}  // namespace attnd::kernels::cuda

#endif  // ATTND_KERNELS_CUDA_APPEND_APPEND_H_
