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
};

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
  const float scale = __ldg(p.scales + 2 * p.layer + (e < p.block_elems ? 0 : 1));
  const uint4 x = __ldg(reinterpret_cast<const uint4*>(
      p.src_layer + static_cast<int64_t>(__ldg(p.pages + i)) * p.page_elems + e));
  DequantizeChunk<T>(x, scale, static_cast<T*>(p.dst) + i * p.page_elems + e);
}

struct ConvertKvParams {
  const void* src;
  void* dst;
  int64_t n;
  float scale;
};

// to fp8: 8 model values a thread; from fp8: 16 bytes a thread.
template <typename T, bool kToFp8>
__global__ void __launch_bounds__(kConvertThreads)
    ConvertKvKernel(const __grid_constant__ ConvertKvParams p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kConvertThreads + threadIdx.x;
  if constexpr (kToFp8) {
    if (t * 8 >= p.n) return;
    const uint4 x = reinterpret_cast<const uint4*>(p.src)[t];
    const T* v = reinterpret_cast<const T*>(&x);
    uint16_t q[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      q[i] = FloatsToFp8x2(__fdiv_rn(ToFloat(v[2 * i]), p.scale),
                           __fdiv_rn(ToFloat(v[2 * i + 1]), p.scale));
    }
    reinterpret_cast<uint2*>(p.dst)[t] =
        make_uint2(q[0] | (uint32_t{q[1]} << 16), q[2] | (uint32_t{q[3]} << 16));
  } else {
    if (t * 16 >= p.n) return;
    if (t * 16 + 16 <= p.n) {
      DequantizeChunk<T>(reinterpret_cast<const uint4*>(p.src)[t], p.scale,
                         static_cast<T*>(p.dst) + t * 16);
      return;
    }
    // The last 8 of an n that is a multiple of 8 only.
    const uint2 x = reinterpret_cast<const uint2*>(p.src)[2 * t];
    __align__(16) T out[16];
    DequantizeChunk<T>(make_uint4(x.x, x.y, 0, 0), p.scale, out);
    *reinterpret_cast<uint4*>(static_cast<T*>(p.dst) + t * 16) =
        *reinterpret_cast<const uint4*>(out);
  }
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_CONVERT_CONVERT_KERNEL_CUH_
