// KV export and import on the CUDA backend: a sequence's positions of some layers and a head
// range, between the pool's pages and a client's dense buffer ([layers][K, V][tokens][heads]
// [head_dim] of the model dtype, device memory or mapped host memory, only element-aligned),
// on the device's stream. An fp8 pool converts on the way, through its staging's scratch.
#ifndef ATTND_SERVER_CUDA_POOL_TRANSFER_H_
#define ATTND_SERVER_CUDA_POOL_TRANSFER_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/paged_kv.h"
#include "server/cuda/kv_staging.h"
#include "server/platform/backend.h"

namespace attnd {

class PoolTransfer {
 public:
  // `pool` holds shape.TotalBytes(); `staging` is the backend's (fp8 pools; else unused).
  PoolTransfer(void* pool, const kernels::KvCacheShape& shape, cudaStream_t stream,
               KvStaging* staging)
      : pool_(static_cast<uint8_t*>(pool)), shape_(shape), stream_(stream), staging_(staging) {}

  // Returns once the copies are done (the buffer is the client's again).
  absl::Status Run(const KvTransferWork& w);

 private:
  uint8_t* PoolAt(int64_t element) const { return pool_ + element * shape_.ElemBytes(); }
  float* ScalesAt(int64_t index) const {
    return reinterpret_cast<float*>(pool_ + shape_.ScalesByteOffset()) + index;
  }
  absl::Status CopyKvBlock(int64_t layer, int kv, const KvTransferWork& w, uint8_t* dense,
                           size_t elem_bytes);
  absl::Status CopyScaleBlock(int64_t layer, int kv, const KvTransferWork& w, float* dense);
  absl::Status RunFp8(const KvTransferWork& w);

  uint8_t* const pool_;
  const kernels::KvCacheShape shape_;
  const cudaStream_t stream_;
  KvStaging* const staging_;
};

}  // namespace attnd

#endif  // ATTND_SERVER_CUDA_POOL_TRANSFER_H_
