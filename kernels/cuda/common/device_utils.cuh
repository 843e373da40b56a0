// Small device helpers shared by the CUDA kernels: async copies, ldmatrix, mma.sync, dtype
// conversions, a division by a run-time constant and the programmatic-dependent-launch (PDL)
// handshake. Header-only, device code only.
#ifndef ATTND_KERNELS_CUDA_COMMON_DEVICE_UTILS_CUH_
#define ATTND_KERNELS_CUDA_COMMON_DEVICE_UTILS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

namespace attnd::kernels::cuda::detail {

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; with valid == false it writes 16 zero bytes and reads
// nothing.
__device__ __forceinline__ void CpAsync16(uint32_t smem, const void* gmem, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
               "r"(src_size));
}
// The same for 4 bytes (a per-token scale); .ca, the only cache mode of copies under 16 bytes.
__device__ __forceinline__ void CpAsync4(uint32_t smem, const void* gmem, bool valid) {
  const int src_size = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem), "l"(gmem),
               "r"(src_size));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The transpose of the 8x8 matrix of 16-bit values whose row lane / 4, columns 2 (lane % 4) and
// + 1, this lane holds (an mma accumulator fragment's packed pairs, as another mma's operand).
__device__ __forceinline__ uint32_t MovMatrixTrans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// D = A * B + D, m16n8k16, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Packs two floats into a pair of 16-bit values (x in the low half).
template <typename T>
__device__ __forceinline__ uint32_t PackPair(float x, float y) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

template <typename T>
__device__ __forceinline__ T FromFloat(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return __float2half_rn(x);
  }
}

// ---- fp8 e4m3 KV (OCP e4m3fn, saturating) ------------------------------------------------------

// Four e4m3 bytes to two half2: bytes 0,1 into lo, bytes 2,3 into hi (lower byte, lower half).
// Every e4m3 value is exact in fp16.
__device__ __forceinline__ void Fp8x4ToHalf2x2(uint32_t x, uint32_t& lo, uint32_t& hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("{\n .reg .b16 a, b;\n mov.b32 {a, b}, %2;\n cvt.rn.f16x2.e4m3x2 %0, a;\n"
      " cvt.rn.f16x2.e4m3x2 %1, b;\n}\n"
      : "=r"(lo), "=r"(hi)
      : "r"(x));
#else
  const __half2_raw l = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(x), __NV_E4M3);
  const __half2_raw h =
      __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(x >> 16), __NV_E4M3);
  lo = uint32_t{l.x} | (uint32_t{l.y} << 16);
  hi = uint32_t{h.x} | (uint32_t{h.y} << 16);
#endif
}

// The storage type of a pool with per-(token, head) scales (KvStorage::kFp8E4M3PerToken): an
// e4m3 byte like __nv_fp8_e4m3, a type of its own so that kernels instantiate for it.
struct Fp8TokenScaledKv {
  __nv_fp8_e4m3 code;
};
template <typename KV>
inline constexpr bool kTokenScaledKv = std::is_same_v<KV, Fp8TokenScaledKv>;

// A per-token scale from the largest magnitude of the row it quantizes: amax / 448 (a true
// division, as the CPU backend's), 1 for an all-zero row (any scale stores its zeros).
__device__ __forceinline__ float TokenScaleFromAmax(float amax) {
  return amax > 0.f ? __fdiv_rn(amax, 448.f) : 1.f;
}

// The largest |x| of a row spread over `lanes` consecutive lanes (a power of two, <= 32, the
// group aligned to it), every lane of the warp taking part; NaNs are ignored (fmaxf).
__device__ __forceinline__ float RowAmax(float amax, int lanes) {
  for (int off = 1; off < lanes; off <<= 1)
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  return amax;
}

// Two floats to two e4m3 bytes (x in the low byte), round to nearest even, saturating at
// +-448 (NaN stays NaN), as the CPU backend's StoreFromFloat.
__device__ __forceinline__ uint16_t FloatsToFp8x2(float x, float y) {
  return static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(make_float2(x, y), __NV_SATFINITE, __NV_E4M3));
}

// A pair of 16-bit model values as fp16 (the fp8 kernels' mma type); bf16 values round to
// nearest (exact for |x| in [2^-14, 65504], the range attention inputs live in).
template <typename T>
__device__ __forceinline__ uint32_t PairToHalf2(uint32_t x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
    const __half2 h = __float22half2_rn(f);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    return x;
  }
}

template <typename T>
__device__ __forceinline__ float ToFloat(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else {
    return __half2float(x);
  }
}

__device__ __forceinline__ float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// n / d and n % d for a divisor fixed at launch (1 <= d < 2^31), n < 2^31.
struct FastDivmod {
  uint32_t divisor;
  uint32_t multiplier;
  uint32_t shift;
  __device__ __forceinline__ void Divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = divisor == 1 ? n : (__umulhi(n, multiplier) >> shift);
    r = n - q * divisor;
  }
};

// PDL: a kernel launched as a programmatic dependent starts while the previous kernel on the
// stream finishes; it must wait before reading that kernel's results (a no-op when it was not
// launched that way). A kernel lets its own dependents start early by signalling (or exiting).
__device__ __forceinline__ void GridDependencyWait() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}
__device__ __forceinline__ void LaunchDependents() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_COMMON_DEVICE_UTILS_CUH_
