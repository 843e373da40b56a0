// The fp8 conversion kernels: 16 fp8 bytes (or 8 model values) a thread.
#ifndef ATTND_KERNELS_CUDA_CONVERT_CONVERT_KERNEL_CUH_
#define ATTND_KERNELS_CUDA_CONVERT_CONVERT_KERNEL_CUH_

#include <cstdint>

#include "kernels/cuda/common/device_utils.cuh"

namespace attnd::kernels::cuda::detail {

constexpr int kConvertThreads = 256;

struct DequantizePagesParams {
  const uint8_t* src_layer;  // the pool's layer
  const int32_t* pages;
  int64_t num_pages;
  int64_t page_elems, block_elems;  // a page's K + V, and one of them (multiples of 16)
  const float* scales;              // device [layers][2]
  int layer;
  void* dst;
  // Per-token scales (else null): the layer's [pages][2][kv_heads][page_size].
  const float* token_scales;
  int64_t page_scales;
  int heads, page_size, head_dim;
  bool hnd;
};

// The per-token scale of element e (a multiple of 16: a chunk never spans two rows) of page
// `page`'s K (e < block_elems) or V block.
__device__ __forceinline__ float PageElemScale(const DequantizePagesParams& p, int64_t page,
                                               int64_t e) {
  const int kv = e < p.block_elems ? 0 : 1;
  const int64_t row = (e - kv * p.block_elems) / p.head_dim;
  const int64_t head = p.hnd ? row / p.page_size : row % p.heads;
  const int64_t slot = p.hnd ? row % p.page_size : row / p.heads;
  return __ldg(p.token_scales + page * p.page_scales + (kv * p.heads + head) * p.page_size + slot);
}

// Sixteen e4m3 values times `scale`, as sixteen model values (two 16-byte stores).
template <typename T>
__device__ __forceinline__ void DequantizeChunk(uint4 x, float scale, T* dst) {
  const uint32_t w[4] = {x.x, x.y, x.z, x.w};
  float o[8];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      uint32_t lo, hi;
      Fp8x4ToHalf2x2(w[2 * half + i], lo, hi);
      const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&lo));
      const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&hi));
      o[4 * i] = scale * a.x;
      o[4 * i + 1] = scale * a.y;
      o[4 * i + 2] = scale * b.x;
      o[4 * i + 3] = scale * b.y;
    }
    uint4 packed;
    packed.x = PackPair<T>(o[0], o[1]);
    packed.y = PackPair<T>(o[2], o[3]);
    packed.z = PackPair<T>(o[4], o[5]);
    packed.w = PackPair<T>(o[6], o[7]);
    *reinterpret_cast<uint4*>(dst + 8 * half) = packed;
  }
}

template <typename T>
__global__ void __launch_bounds__(kConvertThreads)
    DequantizePagesKernel(const __grid_constant__ DequantizePagesParams p) {
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kConvertThreads + threadIdx.x;
  const int64_t per_page = p.page_elems / 16;
  const int64_t i = chunk / per_page;
  if (i >= p.num_pages) return;
  const int64_t e = (chunk - i * per_page) * 16;
  const int64_t page = __ldg(p.pages + i);
  const float scale = p.token_scales != nullptr
                          ? PageElemScale(p, page, e)
                          : __ldg(p.scales + 2 * p.layer + (e < p.block_elems ? 0 : 1));
  const uint4 x = __ldg(reinterpret_cast<const uint4*>(p.src_layer + page * p.page_elems + e));
  DequantizeChunk<T>(x, scale, static_cast<T*>(p.dst) + i * p.page_elems + e);
}

struct ConvertKvParams {
  const void* src;
  void* dst;
  int64_t n;
  float scale;
  // Per-row scales (else null): row r = element / head_dim is (token r / heads, head
  // r % heads), its scale at row_scales[head * tokens + token].
  float* row_scales;
  int head_dim, heads;
  int64_t tokens;
};

__device__ __forceinline__ float* RowScale(const ConvertKvParams& p, int64_t element) {
  const int64_t row = element / p.head_dim;
  return p.row_scales + (row % p.heads) * p.tokens + row / p.heads;
}

// to fp8: 8 model values a thread; from fp8: 16 bytes a thread.
template <typename T, bool kToFp8>
__global__ void __launch_bounds__(kConvertThreads)
    ConvertKvKernel(const __grid_constant__ ConvertKvParams p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kConvertThreads + threadIdx.x;
  if constexpr (kToFp8) {
    const bool live = t * 8 < p.n;
    const uint4 x = live ? reinterpret_cast<const uint4*>(p.src)[t] : make_uint4(0, 0, 0, 0);
    const T* v = reinterpret_cast<const T*>(&x);
    float scale = p.scale;
    if (p.row_scales != nullptr) {
      // A row's chunks are head_dim / 8 consecutive threads (n counts whole rows, so a group
      // is live or not as a whole); every lane takes part in the reduction.
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(ToFloat(v[i])));
      scale = TokenScaleFromAmax(RowAmax(amax, p.head_dim / 8));
      if (live && (t * 8) % p.head_dim == 0) *RowScale(p, t * 8) = scale;
    }
    if (!live) return;
    uint16_t q[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      q[i] = FloatsToFp8x2(__fdiv_rn(ToFloat(v[2 * i]), scale),
                           __fdiv_rn(ToFloat(v[2 * i + 1]), scale));
    }
    reinterpret_cast<uint2*>(p.dst)[t] =
        make_uint2(q[0] | (uint32_t{q[1]} << 16), q[2] | (uint32_t{q[3]} << 16));
  } else {
    if (t * 16 >= p.n) return;
    // Rows of head_dim >= 64 elements: a 16-element chunk is within one row.
    const float scale = p.row_scales != nullptr ? *RowScale(p, t * 16) : p.scale;
    if (t * 16 + 16 <= p.n) {
      DequantizeChunk<T>(reinterpret_cast<const uint4*>(p.src)[t], scale,
                         static_cast<T*>(p.dst) + t * 16);
      return;
    }
    // The last 8 of an n that is a multiple of 8 only.
    const uint2 x = reinterpret_cast<const uint2*>(p.src)[2 * t];
    __align__(16) T out[16];
    DequantizeChunk<T>(make_uint4(x.x, x.y, 0, 0), scale, out);
    *reinterpret_cast<uint4*>(static_cast<T*>(p.dst) + t * 16) =
        *reinterpret_cast<const uint4*>(out);
  }
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_CONVERT_CONVERT_KERNEL_CUH_
