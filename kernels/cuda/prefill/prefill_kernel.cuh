// The portable batch prefill kernel (mma.sync, any sm_80+) and the merge kernel of cut tiles,
// which the Hopper kernel shares.
#ifndef ATTND_KERNELS_CUDA_PREFILL_PREFILL_KERNEL_CUH_
#define ATTND_KERNELS_CUDA_PREFILL_PREFILL_KERNEL_CUH_

#include <cstdint>

#include "kernels/cuda/common/device_utils.cuh"
#include "kernels/cuda/common/merge_states.cuh"
#include "kernels/cuda/prefill/prefill_item.cuh"
#include "kernels/cuda/prefill/prefill_params.cuh"
#include "kernels/prefill_plan.h"

namespace attnd::kernels::cuda::detail {

template <typename T, int D>
__global__ void __launch_bounds__(PrefillTraits<D>::kThreads, PrefillTraits<D>::kMinBlocks)
    BatchPrefillKernel(const __grid_constant__ PrefillParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int kvh = blockIdx.x;
  const int num_items = __ldg(p.plan);
  const int4* items = reinterpret_cast<const int4*>(p.plan + p.items_offset);
  GridDependencyWait();  // no-op unless launched as a programmatic dependent
  for (int item = blockIdx.y; item < num_items; item += gridDim.y) {
    const int4 a = __ldg(items + 2 * item);
    const int4 b = __ldg(items + 2 * item + 1);
    const ItemDesc it{a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    if (it.q_len * p.group <= kPrefillDecodeRows) {
      RunItem<T, D, true, 1>(p, it, kvh, 0, smem);
    } else {
      // A wide tile of kPrefillWideRows rows runs in passes of Tr::kRows rows.
      constexpr int kPassRows = PrefillTraits<D>::kRows;
      static_assert(kPrefillWideRows % kPassRows == 0, "wide tile = whole passes");
      const int rows_total = it.q_len * p.group;
#pragma unroll 1
      for (int pr = 0; pr < kPrefillWideRows; pr += kPassRows) {
        ItemDesc pass = it;
        pass.row0 = it.row0 + pr;
        if (pass.row0 >= rows_total) break;
        if (pr > 0) __syncthreads();  // the previous pass's buffers
        RunItem<T, D, false, PrefillTraits<D>::kMT>(p, pass, kvh, pr, smem);
      }
    }
    __syncthreads();  // the next item reuses the shared buffers
  }
  LaunchDependents();
}

// Merges the partials of cut tiles: one CTA per (kv head, merge), a warp per row, key order.
template <typename T, int D>
__global__ void __launch_bounds__(128) PrefillMergeKernel(const __grid_constant__ PrefillParams p) {
  GridDependencyWait();
  const int kvh = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int num_merges = __ldg(p.plan + 1);
  for (int mi = blockIdx.y; mi < num_merges; mi += gridDim.y) {
    const int* mg = p.plan + p.merges_offset + kPrefillMergeInts * mi;
    const int q_start = __ldg(mg), q_len = __ldg(mg + 1), row0 = __ldg(mg + 2);
    const int first = __ldg(mg + 3), n = __ldg(mg + 4);
    const int rows_total = q_len * p.group;
    const int tile_rows = rows_total <= kPrefillDecodeRows ? kPrefillDecodeRows : kPrefillWideRows;
    const int nrows = min(tile_rows, rows_total - row0);
    for (int r = warp; r < nrows; r += 4) {
      int h;
      const int64_t o = OutRowOffset(p, q_start, row0 + r, kvh, p.o_sn, p.o_sh, &h);
      float* lse_out = nullptr;
      if (p.lse != nullptr) {
        lse_out = p.lse + OutRowOffset(p, q_start, row0 + r, kvh, p.num_qo_heads, 1, &h);
      }
      MergeRowWarp<T, D>(p.partial_out, p.partial_lse, p.num_kv_heads * kPrefillWideRows, first,
                         n, kvh * kPrefillWideRows + r, lane,
                         static_cast<T*>(p.out) + o, lse_out);
    }
  }
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_PREFILL_PREFILL_KERNEL_CUH_
