// The Hopper main loop of batch prefill (included by prefill.cu after PrefillParams, ItemDesc and
// OutRowOffset): the same work items, plan, partials and merge as the portable kernel, with the
// two GEMMs on wgmma (kernels/cuda/wgmma.cuh). K/V still arrive through cp.async, because a
// page of a few tokens is too small a box for TMA; the loads of stage k + 1 are in flight while
// the warpgroups compute stage k.
#ifndef ATTND_KERNELS_CUDA_PREFILL_HOPPER_CUH_
#define ATTND_KERNELS_CUDA_PREFILL_HOPPER_CUH_

#include "kernels/cuda/wgmma.cuh"

namespace attnd::kernels::cuda::detail {

template <typename T, int D>
__device__ __forceinline__ void RunItemHopper(const PrefillParams& p, const ItemDesc& it, int kvh,
                                              unsigned char* smem) {
  using Tr = HopperPrefillTraits<D>;
  constexpr int kKeys = Tr::kKeys;
  constexpr int kSN = kKeys / 2;   // S accumulators per thread (m64 x kKeys over a warpgroup)
  constexpr int kON = D / 2;       // O accumulators per thread
  constexpr uint32_t kQAtomBytes = Tr::kRows * 128;
  constexpr uint32_t kKvAtomBytes = kKeys * 128;
  constexpr int kOffSlots = 3;
  const uint32_t q_addr = SmemAddr(smem);
  const uint32_t pipe_addr = q_addr + Tr::kQBytes;
  int64_t* off_smem = reinterpret_cast<int64_t*>(smem + Tr::kQBytes + 2 * Tr::kStageBytes);

  const int tid = threadIdx.x;
  const int wg = tid >> 7;
  const int warp = (tid >> 5) & 3;  // within the warpgroup
  const int lane = tid & 31;
  const int rows_total = it.q_len * p.group;
  const int num_tiles = (it.t1 - it.t0 + kKeys - 1) / kKeys;
  const T* kv = static_cast<const T*>(p.kv_layer) + kvh * p.head_stride;
  const int32_t* pages = p.kv_indices + it.page_off;

  // K and V travel in separate rings because V of a tile is read one step after its K: step k
  // computes S = Q K(k)^T while P(k-1) V(k-1) is still in flight, so it holds K(k) and V(k-1)
  // and loads K(k+1) and V(k) into the slots that step k-1 let go of. Page offsets of a tile's
  // keys are fetched two steps early into a register, stored into a 3-slot ring one step early.
  int pf_page = -1;
  uint32_t pf_slot = 0;
  auto fetch = [&](int tile) {
    if (tid < kKeys) {
      const int tok = it.t0 + tile * kKeys + tid;
      pf_page = -1;
      if (tile < num_tiles && tok < it.t1) {
        uint32_t pg;
        p.page_div.Divmod(static_cast<uint32_t>(tok), pg, pf_slot);
        pf_page = __ldg(pages + pg);
      }
    }
  };
  auto store = [&](int tile) {
    if (tid < kKeys) {
      off_smem[(tile % kOffSlots) * kKeys + tid] =
          pf_page < 0 ? int64_t{-1}
                      : static_cast<int64_t>(pf_page) * p.page_stride + pf_slot * p.slot_stride;
    }
  };
  // Loads K (v == 0) or V (v == 1) of a tile into its ring slot.
  auto issue = [&](int tile, int v) {
    const uint32_t base = pipe_addr + (tile & 1) * Tr::kStageBytes + v * Tr::kTileBytes;
    const int64_t* offs = off_smem + (tile % kOffSlots) * kKeys;
    const T* src0 = kv + (v ? p.v_offset : 0);
#pragma unroll
    for (int i = 0; i < Tr::kLoadsPerThread; ++i) {
      const int idx = tid + Tr::kThreads * i;
      const int r = idx / Tr::kChunks, ch = idx % Tr::kChunks;
      const int64_t off = offs[r];
      const bool valid = off >= 0;
      CpAsync16(base + SwizzledOffset(kKeys, r, ch), src0 + (valid ? off : 0) + ch * 8, valid);
    }
  };

  // Prologue: offsets of tiles 0 and 1, the query rows and K(0).
  fetch(0);
  store(0);
  fetch(1);
  store(1);
  for (int idx = tid; idx < Tr::kRows * Tr::kChunks; idx += Tr::kThreads) {
    const int r = idx / Tr::kChunks, ch = idx % Tr::kChunks;
    const int R = it.row0 + r;
    const bool ok = R < rows_total;
    const T* src = static_cast<const T*>(p.q);
    if (ok) {
      int h;
      src += OutRowOffset(p, it.q_start, R, kvh, p.q_sn, p.q_sh, &h) + ch * 8;
    }
    CpAsync16(q_addr + SwizzledOffset(Tr::kRows, r, ch), src, ok);
  }
  __syncthreads();  // the page offsets
  issue(0, 0);
  CpAsyncCommit();
  fetch(2);

  // This warpgroup's rows and the positions they span (rows grow with the position); this
  // thread's two rows.
  const int wg_row0 = it.row0 + wg * 64;
  const bool wg_has_rows = wg_row0 < rows_total;
  int wg_min_pos = INT_MAX, wg_max_pos = -1;
  if (wg_has_rows) {
    const int last = min(wg_row0 + 63, rows_total - 1);
    uint32_t q0, q1, g;
    p.group_div.Divmod(static_cast<uint32_t>(wg_row0), q0, g);
    p.group_div.Divmod(static_cast<uint32_t>(last), q1, g);
    wg_min_pos = it.pos0 + (p.causal ? static_cast<int>(q0) : 0);
    wg_max_pos = it.pos0 + (p.causal ? static_cast<int>(q1) : 0);
  }
  const int r_lo = wg * 64 + warp * 16 + (lane >> 2);  // row within the tile; +8 for the second
  int qpos[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int R = it.row0 + r_lo + 8 * i;
    qpos[i] = -1;
    if (R < rows_total) {
      uint32_t qi, g;
      p.group_div.Divmod(static_cast<uint32_t>(R), qi, g);
      qpos[i] = it.pos0 + (p.causal ? static_cast<int>(qi) : 0);
    }
  }
  const float sc = p.soft_cap ? 1.f : p.scale_pre;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[kON];
#pragma unroll
  for (int i = 0; i < kON; ++i) o[i] = 0.f;
  float s[kSN];
#pragma unroll
  for (int i = 0; i < kSN; ++i) s[i] = 0.f;
  uint32_t pa[kKeys / 16][4];  // P of the previous tile as mma A fragments
  float alpha[2];
  const uint32_t q_wg_addr = q_addr + wg * 64 * 128;

  // Every warpgroup runs every tile of the item, also tiles none of its rows sees (they come
  // out as zeros): a branch around wgmma makes the compiler serialize them.
  auto wait_tile = [&]() {
    CpAsyncWait<0>();
    FenceProxyAsync();  // this thread's cp.async writes, before wgmma reads them
    __syncthreads();
  };
  auto qk = [&](int k) {  // s = Q K(k)^T
    const uint32_t k_addr = pipe_addr + (k & 1) * Tr::kStageBytes;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t step = (kk & 3) * 32u;  // 16 columns into the atom's 128-byte rows
      const uint64_t a = SmemDescriptor(q_wg_addr + (kk >> 2) * kQAtomBytes + step, 16, 1024);
      const uint64_t b = SmemDescriptor(k_addr + (kk >> 2) * kKvAtomBytes + step, 16, 1024);
      Wgmma<T, kKeys>::SS(s, a, b, kk > 0);
    }
    WgmmaCommit();
  };
  auto pv = [&](int k) {  // o += P(k) V(k)
    const uint32_t v_addr = pipe_addr + (k & 1) * Tr::kStageBytes + Tr::kTileBytes;
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      // V is [keys][D], D contiguous: an N-major B; 16 keys = two 8-row groups.
      const uint64_t b = SmemDescriptor(v_addr + kk * 16 * 128, kKvAtomBytes, 1024);
      Wgmma<T, D>::RS(o, pa[kk], b, 1);
    }
    WgmmaCommit();
  };
  // Online softmax of tile k's scores: masks, sets alpha (the rescale of what came before),
  // leaves the probabilities in s.
  auto softmax = [&](int k) {
    const int key_first = it.t0 + k * kKeys;
    const int key_last = key_first + kKeys - 1;
    const bool need_mask = !wg_has_rows || key_last >= it.t1 || key_last > wg_min_pos ||
                           (p.window_left >= 0 && wg_max_pos - key_first > p.window_left);
    // s[4 t + e]: row r_lo + 8 (e >> 1), key key_first + 8 t + 2 (lane & 3) + (e & 1).
    if (p.soft_cap) {
#pragma unroll
      for (int i = 0; i < kSN; ++i) s[i] = p.scale_post * tanhf(p.scale_pre * s[i]);
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int t = 0; t < kSN / 4; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[4 * t + e];
        if (need_mask) {
          const int tok = key_first + t * 8 + ((lane & 3) << 1) + (e & 1);
          const int qp = qpos[e >> 1];
          const bool vis =
              tok < it.t1 && tok <= qp && (p.window_left < 0 || qp - tok <= p.window_left);
          x = vis ? x : -INFINITY;
        }
        s[4 * t + e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      const float m_new = fmaxf(m[i], mx[i] * sc);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[i] = FastExp2(m[i] - m_use);
      m[i] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int t = 0; t < kSN / 4; ++t) {
        s[4 * t + 2 * i] = FastExp2(fmaf(s[4 * t + 2 * i], sc, -m_use));
        s[4 * t + 2 * i + 1] = FastExp2(fmaf(s[4 * t + 2 * i + 1], sc, -m_use));
        sum += s[4 * t + 2 * i] + s[4 * t + 2 * i + 1];
      }
      l[i] = l[i] * alpha[i] + sum;
    }
  };
  auto pack_p = [&]() {  // keys 16 kk .. 16 kk + 15 are S tiles 2 kk and 2 kk + 1
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      pa[kk][0] = PackPair<T>(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = PackPair<T>(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = PackPair<T>(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = PackPair<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  // Loads of step k: K(k + 1) and V(k) into the slots step k - 1 let go of.
  auto load_step = [&](int k) {
    if (k + 1 < num_tiles) issue(k + 1, 0);
    if (k < num_tiles) issue(k, 1);
    CpAsyncCommit();
    store(k + 2);
    fetch(k + 3);
  };

  if (num_tiles > 0) {
    wait_tile();  // Q and K(0)
    load_step(0);
    FenceRegisters(s);
    WgmmaFence();
    qk(0);
    WgmmaWait<0>();
    FenceRegisters(s);
    softmax(0);
    pack_p();
    for (int k = 1; k < num_tiles; ++k) {
      wait_tile();  // K(k) and V(k-1) are in; nobody reads K(k-1) or V(k-2) any more
      load_step(k);
      FenceRegisters(s);
      FenceRegisters(o);
      WgmmaFence();
      qk(k);
      pv(k - 1);
      WgmmaWait<1>();  // S(k); P(k-1) V(k-1) may still run
      FenceRegisters(s);
      softmax(k);
      WgmmaWait<0>();
      FenceRegisters(o);
      // O was in the scale of the old maximum.
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[4 * n + 0] *= alpha[0];
        o[4 * n + 1] *= alpha[0];
        o[4 * n + 2] *= alpha[1];
        o[4 * n + 3] *= alpha[1];
      }
      pack_p();
    }
    wait_tile();  // V(last)
    FenceRegisters(o);
    WgmmaFence();
    pv(num_tiles - 1);
    WgmmaWait<0>();
    FenceRegisters(o);
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
  CpAsyncWait<0>();
  __syncthreads();  // the pipeline and the query tile are free

  const bool direct = it.slot < 0;
  const int64_t part_row0 =
      (static_cast<int64_t>(it.slot) * p.num_kv_heads + kvh) * kPrefillWideRows;
  if (wg_has_rows) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = r_lo + 8 * i;
      const int R = it.row0 + r;
      const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
      const float lse2 = l[i] > 0.f ? __log2f(l[i]) + m[i] : -INFINITY;
      if (direct) {
        unsigned char* q_bytes = smem;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          *reinterpret_cast<uint32_t*>(q_bytes + SwizzledOffset(Tr::kRows, r, n) +
                                       ((lane & 3) << 2)) =
              PackPair<T>(o[4 * n + 2 * i] * inv, o[4 * n + 2 * i + 1] * inv);
        }
        if ((lane & 3) == 0 && R < rows_total && p.lse != nullptr) {
          int h;
          const int64_t off = OutRowOffset(p, it.q_start, R, kvh, p.num_qo_heads, 1, &h);
          p.lse[off] = lse2 * 0.69314718055994531f;
        }
      } else if (R < rows_total) {
        float* dst = p.partial_out + (part_row0 + r) * D + ((lane & 3) << 1);
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          __stcg(reinterpret_cast<float2*>(dst + n * 8),
                 make_float2(o[4 * n + 2 * i] * inv, o[4 * n + 2 * i + 1] * inv));
        }
        if ((lane & 3) == 0) __stcg(p.partial_lse + part_row0 + r, lse2);
      }
    }
  }
  if (direct) {
    __syncthreads();
    const int nrows = min(Tr::kRows, rows_total - it.row0);
    for (int idx = tid; idx < nrows * Tr::kChunks; idx += Tr::kThreads) {
      const int r = idx / Tr::kChunks, ch = idx % Tr::kChunks;
      int h;
      const int64_t off = OutRowOffset(p, it.q_start, it.row0 + r, kvh, p.o_sn, p.o_sh, &h);
      *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + off + ch * 8) =
          *reinterpret_cast<const uint4*>(smem + SwizzledOffset(Tr::kRows, r, ch));
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(HopperPrefillTraits<D>::kThreads, 1)
    BatchPrefillHopperKernel(const __grid_constant__ PrefillParams p) {
#if ATTND_WGMMA_AVAILABLE
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // Swizzle atoms need 1024-byte alignment, which the dynamic window does not promise.
  const uint32_t raw = SmemAddr(smem_raw);
  unsigned char* smem = smem_raw + (((raw + 1023u) & ~1023u) - raw);
  const int kvh = blockIdx.x;
  const int num_items = __ldg(p.plan);
  const int4* items = reinterpret_cast<const int4*>(p.plan + p.items_offset);
  GridDependencyWait();
  for (int item = blockIdx.y; item < num_items; item += gridDim.y) {
    const int4 a = __ldg(items + 2 * item);
    const int4 b = __ldg(items + 2 * item + 1);
    const ItemDesc it{a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    if (it.q_len * p.group <= kPrefillDecodeRows) {
      RunItem<T, D, true, 1, HopperNarrowTraits<D>>(p, it, kvh, 0, smem);
    } else {
      RunItemHopper<T, D>(p, it, kvh, smem);
    }
    __syncthreads();  // the next item reuses the shared buffers
  }
  LaunchDependents();
#else
  __trap();  // built without sm_90a code: the host never picks this kernel then
#endif
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_PREFILL_HOPPER_CUH_
