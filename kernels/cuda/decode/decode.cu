// Batch decode over a paged KV cache: split-KV work items from a host plan, tensor cores
// (mma.sync m16n8k16, the GQA group's query heads as rows), a per-warp cp.async pipeline.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>

#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/host_utils.h"
#include "kernels/cuda/kernel_traits.cuh"
#include "kernels/cuda/merge_states.cuh"

namespace attnd::kernels::cuda {
namespace detail {

struct DecodeParams {
  const void* kv_layer;  // pool + layer offset
  const int32_t* layer_ptr;  // non-null: the layer is *layer_ptr, kv_layer the pool
  int64_t layer_elems;
  int64_t page_stride;   // elements between pages
  int64_t v_offset;      // elements from a page's K block to its V block
  int64_t slot_stride;   // elements between slots of a page (one head)
  int64_t head_stride;   // elements between kv heads within a page
  FastDivmod page_div;
  const int32_t* kv_indices;
  const void* q;
  int64_t q_sb, q_sh;
  void* out;
  int64_t o_sb, o_sh;
  float* lse;
  int num_qo_heads;
  int group;
  int m_blocks;
  int soft_cap;      // 0: s = pre * q.k; 1: s = post * tanh(pre * q.k)   (log2 units)
  float scale_pre;
  float scale_post;
  const int32_t* plan;
  int item_indptr_offset;
  int items_offset;
  float* partial_out;
  float* partial_lse;
  int* counters;     // [batch][gridDim.x], zero between launches
  int fused_merge;   // 1: the CTA finishing a request's last item merges it; 0: merge kernel
};

// Offset (elements, within a page-relative frame) of smem element (row, chunk) of a [rows][D]
// tile, 16-byte chunks XOR-swizzled by row so that ldmatrix is conflict-free.
template <int D>
__device__ __forceinline__ int Swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Writes 8 output values of (request b, head h, chunk ch) and, once per row, the lse.
template <typename T>
__device__ __forceinline__ void StoreOut(const DecodeParams& p, int b, int h, int ch,
                                         const float (&o)[8], float lse2) {
  uint4 packed;
  packed.x = PackPair<T>(o[0], o[1]);
  packed.y = PackPair<T>(o[2], o[3]);
  packed.z = PackPair<T>(o[4], o[5]);
  packed.w = PackPair<T>(o[6], o[7]);
  *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + ch * 8) = packed;
  if (ch == 0 && p.lse != nullptr) {
    p.lse[static_cast<int64_t>(b) * p.num_qo_heads + h] = lse2 * 0.69314718055994531f;
  }
}

// Merges request b's partial states for rows [0, nrows) of the CTA's head block, a warp a row.
template <typename T, int D>
__device__ __forceinline__ void MergeRequest(const DecodeParams& p, int b, int first, int n,
                                             int qo_head0, int nrows, int warp, int lane) {
  for (int r = warp; r < nrows; r += DecodeTraits<D>::kWarps) {
    const int h = qo_head0 + r;
    MergeRowWarp<T, D>(p.partial_out, p.partial_lse, p.num_qo_heads, first, n, h, lane,
                       static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh,
                       p.lse != nullptr ? p.lse + static_cast<int64_t>(b) * p.num_qo_heads + h
                                        : nullptr);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(DecodeTraits<D>::kThreads, DecodeTraits<D>::kMinBlocks)
    BatchDecodeKernel(const __grid_constant__ DecodeParams p) {
  using Tr = DecodeTraits<D>;
  constexpr int S = Tr::kStages;
  constexpr int kKSteps = D / 16;  // k-steps of q.k and 16-wide column pairs of p.v
  constexpr int kNTiles = D / 8;   // n8 tiles of the output
  constexpr int kSub = Tr::kSubTiles;
  constexpr int kWT = Tr::kWarpTokens;
  extern __shared__ __align__(128) unsigned char smem[];
  T* pipe = reinterpret_cast<T*>(smem);
  T* q_smem = reinterpret_cast<T*>(smem + Tr::kPipeBytes);
  float* m_smem = reinterpret_cast<float*>(smem + Tr::kPipeBytes + Tr::kQBytes);
  float* l_smem = m_smem + Tr::kWarps * Tr::kRows;
  float* acc_smem = reinterpret_cast<float*>(smem);  // aliases pipe, after the pipeline drains
  __shared__ int last_flag;

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  // blockIdx.x: kv head block (fastest, so that the CTAs of all heads of an item run together
  // and read each page's K/V block at the same time); blockIdx.y: item slot.
  const int kvh = blockIdx.x / p.m_blocks;
  const int row0 = (blockIdx.x - kvh * p.m_blocks) * Tr::kRows;
  const int nrows = min(Tr::kRows, p.group - row0);
  const int qo_head0 = kvh * p.group + row0;
  const T* kv = static_cast<const T*>(p.kv_layer) + kvh * p.head_stride +
                (p.layer_ptr != nullptr ? int64_t{__ldg(p.layer_ptr)} * p.layer_elems : 0);
  T* my_pipe = pipe + warp * S * Tr::kStageElems;

  const int32_t* item_indptr = p.plan + p.item_indptr_offset;
  const int4* items = reinterpret_cast<const int4*>(p.plan + p.items_offset);
  // Column y runs items y, y + gridDim.y, ...; the plan holds at least gridDim.y item slots, so
  // item y is read together with the item count.
  const int num_items = __ldg(p.plan);
  int4 next = __ldg(items + blockIdx.y);

  for (int item = blockIdx.y; item < num_items; item += gridDim.y) {
    const int b = next.x;
    const int t0 = next.y;
    const int t1 = next.z;
    const int32_t* pages = p.kv_indices + next.w;
    if (item + gridDim.y < num_items) next = __ldg(items + item + gridDim.y);  // for later
    const int first_item = __ldg(item_indptr + b);
    const int n_items = __ldg(item_indptr + b + 1) - first_item;
    const int num_tiles = t1 > t0 ? (t1 - t0 + Tr::kTileTokens - 1) / Tr::kTileTokens : 0;

    // Lane l (mod kWT) resolves row l of a warp slice: its K offset and whether it is visible.
    auto resolve = [&](int tile, int64_t& off, bool& valid) {
      const int tok = t0 + tile * Tr::kTileTokens + warp * kWT + (lane & (kWT - 1));
      valid = tok < t1;
      off = 0;
      if (valid) {
        uint32_t pg, slot;
        p.page_div.Divmod(static_cast<uint32_t>(tok), pg, slot);
        off = static_cast<int64_t>(__ldg(pages + pg)) * p.page_stride + slot * p.slot_stride;
      }
    };
    auto issue = [&](int stage, int64_t off, bool valid) {
      T* ks = my_pipe + stage * Tr::kStageElems;
#pragma unroll
      for (int i = 0; i < Tr::kLoadsPerLane; ++i) {
        const int idx = lane + 32 * i;
        const int r = idx / Tr::kChunks, ch = idx % Tr::kChunks;
        const int64_t off_r = __shfl_sync(0xffffffffu, off, r);
        const bool valid_r = __shfl_sync(0xffffffffu, static_cast<int>(valid), r) != 0;
        const T* src = kv + off_r + ch * 8;
        const uint32_t dst = SmemAddr(ks + Swz<D>(r, ch));
        CpAsync16(dst, src, valid_r);
        CpAsync16(dst + kWT * D * 2, src + p.v_offset, valid_r);
      }
    };

    // Page-table entries of the first S tiles (they do not depend on the previous kernel on
    // the stream), then, once that kernel's results are visible (a no-op unless launched as a
    // programmatic dependent), the query rows (rows past the group zero-filled) and the
    // pipeline prologue, all in flight together.
    int64_t offs[S];
    bool valids[S];
#pragma unroll
    for (int s = 0; s < S; ++s) resolve(s, offs[s], valids[s]);
    GridDependencyWait();
    {
      const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + qo_head0 * p.q_sh;
      for (int idx = threadIdx.x; idx < Tr::kRows * Tr::kChunks; idx += Tr::kThreads) {
        const int r = idx / Tr::kChunks, ch = idx % Tr::kChunks;
        const bool ok = r < nrows;
        CpAsync16(SmemAddr(q_smem + Swz<D>(r, ch)), ok ? qb + r * p.q_sh + ch * 8 : qb, ok);
      }
      CpAsyncCommit();
    }
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
      if (s < num_tiles) issue(s, offs[s], valids[s]);
      CpAsyncCommit();
    }
    int64_t off = offs[S - 1];
    bool valid = valids[S - 1];
    CpAsyncWait<S - 1>();  // the query group
    __syncthreads();

    uint32_t qfrag[Tr::kQInRegs ? kKSteps : 1][4];
    auto load_q = [&](uint32_t (&a)[4], int kk) {
      const int mi = lane >> 3;
      const int r = ((mi & 1) << 3) + (lane & 7);
      LdMatrixX4(a, SmemAddr(q_smem + Swz<D>(r, kk * 2 + (mi >> 1))));
    };
    if constexpr (Tr::kQInRegs) {
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) load_q(qfrag[kk], kk);
    }

    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.f, 0.f};
    float acc[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

    for (int k = 0; k < num_tiles; ++k) {
      __syncwarp();
      if (k + S - 1 < num_tiles) issue((k + S - 1) % S, off, valid);
      CpAsyncCommit();
      resolve(k + S, off, valid);  // its page-table load overlaps this tile's math
      CpAsyncWait<S - 1>();
      __syncwarp();

      const int tok_base = t0 + k * Tr::kTileTokens + warp * kWT;
      if (tok_base >= t1) continue;  // this warp's slice is past the chunk (warp-uniform)
      const T* ks = my_pipe + (k % S) * Tr::kStageElems;
      const T* vs = ks + kWT * D;

      // s = q . k for 16 rows x kWT tokens.
      float s[2 * kSub][4];
#pragma unroll
      for (int j = 0; j < 2 * kSub; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        uint32_t a[4];
        if constexpr (Tr::kQInRegs) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[e] = qfrag[kk][e];
        } else {
          load_q(a, kk);
        }
#pragma unroll
        for (int sub = 0; sub < kSub; ++sub) {
          uint32_t kb[4];
          const int mi = lane >> 3;
          LdMatrixX4(kb, SmemAddr(ks + Swz<D>(sub * 16 + ((mi >> 1) << 3) + (lane & 7),
                                              kk * 2 + (mi & 1))));
          Mma16816<T>(s[2 * sub], a, kb[0], kb[1]);
          Mma16816<T>(s[2 * sub + 1], a, kb[2], kb[3]);
        }
      }

      // Logits in log2 units, masked past the chunk.
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < 2 * kSub; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int tok = tok_base + j * 8 + ((lane & 3) << 1) + (e & 1);
          float x = s[j][e];
          x = p.soft_cap ? p.scale_post * tanhf(p.scale_pre * x) : p.scale_pre * x;
          x = tok < t1 ? x : -INFINITY;
          s[j][e] = x;
          mx[e >> 1] = fmaxf(mx[e >> 1], x);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        const float m_new = fmaxf(m[i], mx[i]);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = FastExp2(m[i] - m_use);
        m[i] = m_new;
        l[i] *= alpha;
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) {
          acc[n][2 * i] *= alpha;
          acc[n][2 * i + 1] *= alpha;
        }
#pragma unroll
        for (int j = 0; j < 2 * kSub; ++j) {
          s[j][2 * i] = FastExp2(s[j][2 * i] - m_use);
          s[j][2 * i + 1] = FastExp2(s[j][2 * i + 1] - m_use);
          l[i] += s[j][2 * i] + s[j][2 * i + 1];
        }
      }

      // acc += p . v, 16 tokens at a time.
#pragma unroll
      for (int sub = 0; sub < kSub; ++sub) {
        uint32_t a[4];
        a[0] = PackPair<T>(s[2 * sub][0], s[2 * sub][1]);
        a[1] = PackPair<T>(s[2 * sub][2], s[2 * sub][3]);
        a[2] = PackPair<T>(s[2 * sub + 1][0], s[2 * sub + 1][1]);
        a[3] = PackPair<T>(s[2 * sub + 1][2], s[2 * sub + 1][3]);
#pragma unroll
        for (int dd = 0; dd < kKSteps; ++dd) {
          uint32_t vb[4];
          const int mi = lane >> 3;
          LdMatrixX4Trans(vb, SmemAddr(vs + Swz<D>(sub * 16 + ((mi & 1) << 3) + (lane & 7),
                                                   dd * 2 + (mi >> 1))));
          Mma16816<T>(acc[2 * dd], a, vb[0], vb[1]);
          Mma16816<T>(acc[2 * dd + 1], a, vb[2], vb[3]);
        }
      }
    }

    // Merge the 4 warps' states in a fixed order, then write the output or the partial.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
      l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
    CpAsyncWait<0>();
    __syncthreads();
    const int r_lo = lane >> 2;
    if ((lane & 3) == 0) {
      m_smem[warp * Tr::kRows + r_lo] = m[0];
      l_smem[warp * Tr::kRows + r_lo] = l[0];
      m_smem[warp * Tr::kRows + r_lo + 8] = m[1];
      l_smem[warp * Tr::kRows + r_lo + 8] = l[1];
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = r_lo + 8 * i;
      if (r < nrows) {
        float* dst = acc_smem + (warp * Tr::kRows + r) * D + ((lane & 3) << 1);
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) {
          *reinterpret_cast<float2*>(dst + n * 8) = make_float2(acc[n][2 * i], acc[n][2 * i + 1]);
        }
      }
    }
    __syncthreads();
    const bool direct = n_items == 1;
    for (int idx = threadIdx.x; idx < nrows * Tr::kChunks; idx += Tr::kThreads) {
      const int r = idx / Tr::kChunks, ch = idx % Tr::kChunks;
      float mw[Tr::kWarps];
      float mmax = -INFINITY;
#pragma unroll
      for (int w = 0; w < Tr::kWarps; ++w) {
        mw[w] = m_smem[w * Tr::kRows + r];
        mmax = fmaxf(mmax, mw[w]);
      }
      float o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      float lsum = 0.f;
      if (mmax != -INFINITY) {
#pragma unroll
        for (int w = 0; w < Tr::kWarps; ++w) {
          const float sc = FastExp2(mw[w] - mmax);
          lsum += sc * l_smem[w * Tr::kRows + r];
          const float* src = acc_smem + (w * Tr::kRows + r) * D + ch * 8;
          const float4 x0 = *reinterpret_cast<const float4*>(src);
          const float4 x1 = *reinterpret_cast<const float4*>(src + 4);
          o[0] += sc * x0.x; o[1] += sc * x0.y; o[2] += sc * x0.z; o[3] += sc * x0.w;
          o[4] += sc * x1.x; o[5] += sc * x1.y; o[6] += sc * x1.z; o[7] += sc * x1.w;
        }
      }
      const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] *= inv;
      const float lse2 = lsum > 0.f ? __log2f(lsum) + mmax : -INFINITY;
      const int h = qo_head0 + r;
      if (direct) {
        StoreOut<T>(p, b, h, ch, o, lse2);
      } else {
        float* dst = p.partial_out + (static_cast<int64_t>(item) * p.num_qo_heads + h) * D + ch * 8;
        __stcg(reinterpret_cast<float4*>(dst), make_float4(o[0], o[1], o[2], o[3]));
        __stcg(reinterpret_cast<float4*>(dst + 4), make_float4(o[4], o[5], o[6], o[7]));
        if (ch == 0) __stcg(p.partial_lse + static_cast<int64_t>(item) * p.num_qo_heads + h, lse2);
      }
    }

    if (!direct && p.fused_merge) {
      // The CTA that completes a request's last partial (for this kv head block) merges all of
      // them, in item order; it resets the counter for the next launch.
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence();  // cumulative: releases the whole CTA's partial writes (bar.sync above)
        int* counter = p.counters + b * gridDim.x + blockIdx.x;
        const int done = atomicAdd(counter, 1) + 1;
        last_flag = done == n_items;
        if (done == n_items) *counter = 0;
      }
      __syncthreads();
      if (last_flag) {
        __threadfence();
        MergeRequest<T, D>(p, b, first_item, n_items, qo_head0, nrows, warp, lane);
      }
    }
    __syncthreads();  // the next item reuses q_smem and the pipeline buffers
  }
  LaunchDependents();  // lets a programmatic (PDL) merge launch start early
}

// Raises the kernel's dynamic shared memory limit once per device.
template <typename T, int D>
cudaError_t PrepareDecodeKernel(int device) {
  static std::atomic<uint64_t> done_mask{0};
  const uint64_t bit = device < 64 ? (1ull << device) : 0;
  if (bit != 0 && (done_mask.load(std::memory_order_acquire) & bit)) return cudaSuccess;
  cudaError_t e = cudaFuncSetAttribute(&BatchDecodeKernel<T, D>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       DecodeTraits<D>::kSmemBytes);
  if (e == cudaSuccess && bit != 0) done_mask.fetch_or(bit, std::memory_order_acq_rel);
  return e;
}

template <typename T, int D>
cudaError_t LaunchDecodeTyped(const DecodeParams& p, dim3 grid, bool overlap, cudaStream_t stream) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if ((e = PrepareDecodeKernel<T, D>(device)) != cudaSuccess) return e;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(DecodeTraits<D>::kThreads);
  cfg.dynamicSmemBytes = DecodeTraits<D>::kSmemBytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = overlap ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, BatchDecodeKernel<T, D>, p);
}

template <typename T, int D>
cudaError_t OccupancyTyped(int device, int* blocks) {
  cudaError_t e = PrepareDecodeKernel<T, D>(device);
  if (e != cudaSuccess) return e;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, &BatchDecodeKernel<T, D>,
                                                       DecodeTraits<D>::kThreads,
                                                       DecodeTraits<D>::kSmemBytes);
}

template <typename T, int D>
struct LaunchFn {
  static cudaError_t Run(const DecodeParams& p, dim3 grid, bool overlap, cudaStream_t s) {
    return LaunchDecodeTyped<T, D>(p, grid, overlap, s);
  }
};
template <typename T, int D>
struct OccupancyFn {
  static cudaError_t Run(int device, int* blocks) { return OccupancyTyped<T, D>(device, blocks); }
};

}  // namespace detail

cudaError_t MakeDecodePlanConfig(int device, DType dtype, int64_t head_dim, int64_t num_qo_heads,
                                 int64_t num_kv_heads, int64_t window_left,
                                 DecodePlanConfig* cfg) {
  if (cfg == nullptr || num_kv_heads <= 0 || num_qo_heads % num_kv_heads != 0) {
    return cudaErrorInvalidValue;
  }
  int old = 0;
  cudaError_t e = cudaGetDevice(&old);
  if (e != cudaSuccess) return e;
  if (old != device && (e = cudaSetDevice(device)) != cudaSuccess) return e;
  int sms = 0, blocks = 0;
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess) e = detail::DispatchDTypeHeadDim<detail::OccupancyFn>(dtype, head_dim, device, &blocks);
  if (old != device) cudaSetDevice(old);
  if (e != cudaSuccess) return e;
  const int64_t group = num_qo_heads / num_kv_heads;
  cfg->num_sms = sms;
  cfg->ctas_per_sm = std::max(blocks, 1);
  cfg->kv_head_blocks = static_cast<int>(num_kv_heads * ((group + 15) / 16));
  cfg->tile_tokens = head_dim == 64 ? detail::DecodeTraits<64>::kTileTokens
                    : head_dim == 128 ? detail::DecodeTraits<128>::kTileTokens
                                      : detail::DecodeTraits<256>::kTileTokens;
  cfg->window_left = window_left;
  return cudaSuccess;
}

cudaError_t LaunchBatchDecode(const DecodeArgs& a, cudaStream_t stream) {
  const KvCacheShape& sh = a.kv.shape;
  const int64_t qo = a.opts.num_qo_heads, kvh = sh.num_kv_heads, d = sh.head_dim;
  if (a.batch < 0 || kvh <= 0 || qo <= 0 || qo % kvh != 0 || sh.page_size <= 0 ||
      sh.page_size >= (1 << 30) || a.ws.plan == nullptr || a.ws.grid_x < a.batch || a.ws.grid_x > a.ws.layout.max_items ||
      a.ws.grid_x > 65535 ||
      a.batch > a.ws.layout.max_batch || (!a.deterministic && a.ws.counters == nullptr) ||
      a.q == nullptr || a.out == nullptr ||
      a.kv.pool == nullptr || a.kv_indices == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (!detail::Aligned16(a.q) || !detail::Aligned16(a.out) || !detail::Aligned16(a.kv.pool) ||
      a.q_stride_b % 8 || a.q_stride_h % 8 || a.out_stride_b % 8 || a.out_stride_h % 8) {
    return cudaErrorMisalignedAddress;
  }
  if (a.batch == 0) return cudaSuccess;
  const int64_t group = qo / kvh;
  const int m_blocks = static_cast<int>((group + 15) / 16);

  detail::DecodeParams p{};
  p.layer_ptr = a.kv.layer_in_device;
  p.layer_elems = sh.LayerElems();
  p.kv_layer = static_cast<const char*>(a.kv.pool) +
               (p.layer_ptr != nullptr
                    ? 0
                    : a.kv.layer * sh.LayerElems() * static_cast<int64_t>(DTypeSize(sh.dtype)));
  p.page_stride = sh.PageElems();
  p.v_offset = sh.BlockElems();
  p.slot_stride = sh.SlotStride();
  p.head_stride = sh.HeadStride();
  p.page_div = detail::MakeFastDivmod(static_cast<uint32_t>(sh.page_size));
  p.kv_indices = a.kv_indices;
  p.q = a.q;
  p.q_sb = a.q_stride_b;
  p.q_sh = a.q_stride_h;
  p.out = a.out;
  p.o_sb = a.out_stride_b;
  p.o_sh = a.out_stride_h;
  p.lse = a.lse;
  p.num_qo_heads = static_cast<int>(qo);
  p.group = static_cast<int>(group);
  p.m_blocks = m_blocks;
  const detail::LogitScales scales = detail::MakeLogitScales(a.opts);
  p.soft_cap = scales.soft_cap;
  p.scale_pre = scales.pre;
  p.scale_post = scales.post;
  p.plan = a.ws.plan;
  p.item_indptr_offset = static_cast<int>(a.ws.layout.ItemIndptrOffset());
  p.items_offset = static_cast<int>(a.ws.layout.ItemsOffset());
  p.partial_out = a.ws.partial_out;
  p.partial_lse = a.ws.partial_lse;
  p.counters = a.ws.counters;
  p.fused_merge = a.deterministic ? 0 : 1;

  const dim3 grid(static_cast<unsigned>(kvh * m_blocks), a.ws.grid_x);
  cudaError_t e =
      detail::DispatchDTypeHeadDim<detail::LaunchFn>(sh.dtype, d, p, grid, a.overlap_previous, stream);
  if (e != cudaSuccess || !a.deterministic) return e;
  // Deterministic mode: partials of every split request, merged by a separate kernel launched
  // as a programmatic dependent so its launch overlaps the decode's tail.
  MergeArgs m;
  m.batch = a.batch;
  m.num_heads = qo;
  m.head_dim = d;
  m.dtype = sh.dtype;
  m.indptr = a.ws.plan + a.ws.layout.ItemIndptrOffset();
  m.partial_out = a.ws.partial_out;
  m.partial_lse = a.ws.partial_lse;
  m.out = a.out;
  m.out_stride_b = a.out_stride_b;
  m.out_stride_h = a.out_stride_h;
  m.lse = a.lse;
  m.programmatic = true;
  return LaunchMergeStates(m, stream);

  return cudaSuccess;
}

}  // namespace attnd::kernels::cuda
