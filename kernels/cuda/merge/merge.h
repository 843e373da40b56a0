// Merge of partial attention states (split-KV).
#ifndef ATTND_KERNELS_CUDA_MERGE_MERGE_H_
#define ATTND_KERNELS_CUDA_MERGE_MERGE_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/paged_kv.h"

namespace attnd::kernels::cuda {

// out[b][h] = merge over items i in [indptr[b], indptr[b+1]) (in that order) of the fp32
// partial states (partial_out[i][h][:], partial_lse[i][h] in log2 units). Requests with fewer
// than two items are left alone. Used by batch decode; exposed for prefill.
struct MergeArgs {
  int batch = 0;
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  DType dtype = DType::kBFloat16;
  const int32_t* indptr = nullptr;
  const float* partial_out = nullptr;
  const float* partial_lse = nullptr;
  void* out = nullptr;
  int64_t out_stride_b = 0, out_stride_h = 0;
  float* lse = nullptr;  // natural log, optional
  // Launch as a programmatic dependent of the previous kernel on the stream (which must call
  // griddepcontrol.launch_dependents or exit); the merge waits for it before reading.
  bool programmatic = false;
};

// InvalidArgumentError naming the argument for arguments the kernel cannot take;
// InternalError for a failed launch.
absl::Status LaunchMergeStates(const MergeArgs& args, cudaStream_t stream);

}  // namespace attnd::kernels::cuda

#endif  // ATTND_KERNELS_CUDA_MERGE_MERGE_H_
