// The append kernel: scatters new tokens' K and V into their page slots, 16-byte chunks (an fp8
// pool: quantized on the way, with the layer's scales or with each row's own, which it computes
// and stores).
#ifndef ATTND_KERNELS_CUDA_APPEND_APPEND_KERNEL_CUH_
#define ATTND_KERNELS_CUDA_APPEND_APPEND_KERNEL_CUH_

#include <cstdint>

#include "kernels/cuda/append/append_params.cuh"
#include "kernels/cuda/common/device_utils.cuh"

namespace attnd::kernels::cuda::detail {

// Resolves row i of a thread's rows: loads its 16-byte chunk of K and V and returns where it
// goes in the layer (elements of the pool), or -1 for a row past the end or a padded token;
// scale_dst is its K scale's place in the layer's per-token scales.
__device__ __forceinline__ int64_t LoadAppendRow(const AppendParams& p, int64_t row, int ch,
                                                 uint4& kx, uint4& vx, int64_t& scale_dst) {
  if (row >= p.num_rows) return -1;
  uint32_t tok, head;
  p.heads_div.Divmod(static_cast<uint32_t>(row), tok, head);
  const int64_t slot = __ldg(p.slot_mapping + tok);
  if (slot < 0) return -1;
  uint32_t pg, s;
  p.page_div.Divmod(static_cast<uint32_t>(slot), pg, s);
  kx = __ldcs(reinterpret_cast<const uint4*>(p.k + tok * p.k_ts + head * p.head_dim + ch * 8));
  vx = __ldcs(reinterpret_cast<const uint4*>(p.v + tok * p.v_ts + head * p.head_dim + ch * 8));
  scale_dst = pg * p.page_scales + head * p.page_size + s;
  return pg * p.page_stride + s * p.slot_stride + head * p.head_stride + ch * 8;
}

// The largest |x| of eight model values.
template <typename T>
__device__ __forceinline__ float ChunkAmax(const uint4& x) {
  const T* v = reinterpret_cast<const T*>(&x);
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(ToFloat(v[i])));
  return amax;
}

// Eight model values (a 16-byte chunk) as eight e4m3 bytes of value / scale: a true division,
// as the CPU backend's, so that both store the same bytes.
template <typename T>
__device__ __forceinline__ uint2 QuantizeChunk(const uint4& x, float scale) {
  const T* v = reinterpret_cast<const T*>(&x);
  uint16_t q[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    q[i] = FloatsToFp8x2(__fdiv_rn(ToFloat(v[2 * i]), scale),
                         __fdiv_rn(ToFloat(v[2 * i + 1]), scale));
  }
  return make_uint2(q[0] | (uint32_t{q[1]} << 16), q[2] | (uint32_t{q[3]} << 16));
}

// T: the model dtype (read only by an fp8 pool's quantization); KV: the pool's element type
// (T for a model-dtype pool, whose bytes move as they are, __nv_fp8_e4m3 or Fp8TokenScaledKv).
template <typename T, typename KV>
__global__ void __launch_bounds__(kAppendThreads)
    AppendKvKernel(const __grid_constant__ AppendParams p) {
  constexpr bool kFp8 = sizeof(KV) == 1;
  const int chunks = 1 << p.chunks_log2;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * kAppendThreads + threadIdx.x;
  const int ch = static_cast<int>(gid & (chunks - 1));
  const int64_t row_base = (gid >> p.chunks_log2) * kRowsPerThread;
  uint4 kx[kRowsPerThread], vx[kRowsPerThread];
  int64_t dst[kRowsPerThread], scale_dst[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i)
    dst[i] = LoadAppendRow(p, row_base + i, ch, kx[i], vx[i], scale_dst[i]);
  const int layer = p.layer_ptr != nullptr ? __ldg(p.layer_ptr) : p.layer;
  if constexpr (kFp8) {
    uint8_t* base = static_cast<uint8_t*>(p.kv_layer) +
                    (p.layer_ptr != nullptr ? int64_t{layer} * p.layer_elems : 0);
    float k_scale = 1.f, v_scale = 1.f;
    float* layer_scales = nullptr;  // per-token scales of the layer
    if constexpr (kTokenScaledKv<KV>) {
      layer_scales = p.token_scales + layer * p.layer_scales;
    } else {
      k_scale = __ldg(p.scales + 2 * layer);
      v_scale = __ldg(p.scales + 2 * layer + 1);
    }
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      if constexpr (kTokenScaledKv<KV>) {
        // Every lane reduces (the shuffles need the whole warp); a row's chunks are `chunks`
        // consecutive lanes.
        const bool live = dst[i] >= 0;
        k_scale = TokenScaleFromAmax(RowAmax(live ? ChunkAmax<T>(kx[i]) : 0.f, chunks));
        v_scale = TokenScaleFromAmax(RowAmax(live ? ChunkAmax<T>(vx[i]) : 0.f, chunks));
        if (live && ch == 0) {
          layer_scales[scale_dst[i]] = k_scale;
          layer_scales[scale_dst[i] + p.scale_v_offset] = v_scale;
        }
      }
      if (dst[i] < 0) continue;
      *reinterpret_cast<uint2*>(base + dst[i]) = QuantizeChunk<T>(kx[i], k_scale);
      *reinterpret_cast<uint2*>(base + dst[i] + p.v_offset) = QuantizeChunk<T>(vx[i], v_scale);
    }
  } else {
    uint16_t* base = static_cast<uint16_t*>(p.kv_layer) +
                     (p.layer_ptr != nullptr ? int64_t{layer} * p.layer_elems : 0);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      if (dst[i] < 0) continue;
      *reinterpret_cast<uint4*>(base + dst[i]) = kx[i];
      *reinterpret_cast<uint4*>(base + dst[i] + p.v_offset) = vx[i];
    }
  }
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_APPEND_APPEND_KERNEL_CUH_
