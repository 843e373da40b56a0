// Append: scatter new tokens' K and V into their page slots. Moves 16-byte chunks; one thread
// copies kRowsPerThread (token, head) rows' chunk c of K and of V, loads first.
#include <cuda_runtime.h>

#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/host_utils.h"

namespace attnd::kernels::cuda {
namespace detail {

struct AppendParams {
  void* kv_layer;
  const int32_t* layer_ptr;  // non-null: add *layer_ptr * layer_elems to kv_layer
  int64_t layer_elems;
  int64_t page_stride, v_offset, slot_stride, head_stride;
  FastDivmod page_div;
  FastDivmod heads_div;
  const uint16_t* k;
  const uint16_t* v;
  int64_t k_ts, v_ts;
  const int64_t* slot_mapping;
  int64_t num_rows;  // tokens * kv heads
  int chunks_log2;   // log2(head_dim / 8)
  int head_dim;
};

constexpr int kAppendThreads = 256;
constexpr int kRowsPerThread = 2;

__global__ void __launch_bounds__(kAppendThreads)
    AppendKvKernel(const __grid_constant__ AppendParams p) {
  const int chunks = 1 << p.chunks_log2;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * kAppendThreads + threadIdx.x;
  const int ch = static_cast<int>(gid & (chunks - 1));
  const int64_t row_base = (gid >> p.chunks_log2) * kRowsPerThread;
  uint4 kx[kRowsPerThread], vx[kRowsPerThread];
  int64_t dst[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = row_base + i;
    dst[i] = -1;
    if (row >= p.num_rows) continue;
    uint32_t tok, head;
    p.heads_div.Divmod(static_cast<uint32_t>(row), tok, head);
    const int64_t slot = __ldg(p.slot_mapping + tok);
    if (slot < 0) continue;
    uint32_t pg, s;
    p.page_div.Divmod(static_cast<uint32_t>(slot), pg, s);
    dst[i] = pg * p.page_stride + s * p.slot_stride + head * p.head_stride + ch * 8;
    kx[i] = __ldcs(reinterpret_cast<const uint4*>(p.k + tok * p.k_ts + head * p.head_dim + ch * 8));
    vx[i] = __ldcs(reinterpret_cast<const uint4*>(p.v + tok * p.v_ts + head * p.head_dim + ch * 8));
  }
  uint16_t* base = static_cast<uint16_t*>(p.kv_layer) +
                   (p.layer_ptr != nullptr ? int64_t{__ldg(p.layer_ptr)} * p.layer_elems : 0);
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    if (dst[i] < 0) continue;
    *reinterpret_cast<uint4*>(base + dst[i]) = kx[i];
    *reinterpret_cast<uint4*>(base + dst[i] + p.v_offset) = vx[i];
  }
}

}  // namespace detail

cudaError_t LaunchAppendKv(const AppendArgs& a, cudaStream_t stream) {
  const KvCacheShape& sh = a.kv.shape;
  const int64_t d = sh.head_dim, h = sh.num_kv_heads;
  if (a.num_tokens < 0 || h <= 0 || sh.page_size <= 0 || DTypeSize(sh.dtype) != 2 ||
      (d != 64 && d != 128 && d != 256) || a.slot_mapping == nullptr || a.k == nullptr ||
      a.v == nullptr || a.kv.pool == nullptr || a.k_token_stride < h * d ||
      a.v_token_stride < h * d || a.num_tokens * h >= (int64_t{1} << 31) ||
      sh.num_pages * sh.page_size >= (int64_t{1} << 31)) {
    return cudaErrorInvalidValue;
  }
  if (!detail::Aligned16(a.k) || !detail::Aligned16(a.v) || !detail::Aligned16(a.kv.pool) ||
      a.k_token_stride % 8 || a.v_token_stride % 8) {
    return cudaErrorMisalignedAddress;
  }
  if (a.num_tokens == 0) return cudaSuccess;
  detail::AppendParams p{};
  p.layer_ptr = a.kv.layer_in_device;
  p.layer_elems = sh.LayerElems();
  p.kv_layer = static_cast<char*>(a.kv.pool) +
               (p.layer_ptr != nullptr ? 0 : a.kv.layer * sh.LayerElems() * 2);
  p.page_stride = sh.PageElems();
  p.v_offset = sh.BlockElems();
  p.slot_stride = sh.SlotStride();
  p.head_stride = sh.HeadStride();
  p.page_div = detail::MakeFastDivmod(static_cast<uint32_t>(sh.page_size));
  p.heads_div = detail::MakeFastDivmod(static_cast<uint32_t>(h));
  p.k = static_cast<const uint16_t*>(a.k);
  p.v = static_cast<const uint16_t*>(a.v);
  p.k_ts = a.k_token_stride;
  p.v_ts = a.v_token_stride;
  p.slot_mapping = a.slot_mapping;
  p.num_rows = a.num_tokens * h;
  p.chunks_log2 = d == 64 ? 3 : d == 128 ? 4 : 5;
  p.head_dim = static_cast<int>(d);
  const int64_t threads =
      ((p.num_rows + detail::kRowsPerThread - 1) / detail::kRowsPerThread) << p.chunks_log2;
  const int64_t blocks = (threads + detail::kAppendThreads - 1) / detail::kAppendThreads;
  detail::AppendKvKernel<<<static_cast<unsigned>(blocks), detail::kAppendThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace attnd::kernels::cuda
