// Shared-memory layout of the mma.sync kernels' [rows][D] 16-bit tiles: 16-byte chunks
// XOR-swizzled by row, so that the 8 rows an ldmatrix reads hit 8 different bank groups. (The
// Hopper kernel's wgmma operands use the 128-byte swizzle atoms of wgmma.cuh instead.)
#ifndef ATTND_KERNELS_CUDA_COMMON_SWIZZLE_CUH_
#define ATTND_KERNELS_CUDA_COMMON_SWIZZLE_CUH_

namespace attnd::kernels::cuda::detail {

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][D] tile (D >= 64:
// eight chunks per row at least).
template <int D>
__device__ __forceinline__ int Swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_COMMON_SWIZZLE_CUH_
