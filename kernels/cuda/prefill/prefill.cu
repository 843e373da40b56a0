// Batch prefill over a paged KV cache: ragged queries, causal, mixed prefill + decode items from
// a host plan (kernels/prefill_plan.h), tensor cores (mma.sync m16n8k16, fp32 accumulation,
// online softmax, FlashAttention-2 style), K/V stages through a CTA-wide cp.async pipeline, and
// a merge kernel for tiles cut along the keys.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>

#include "kernels/cuda/attention_cuda.h"
#include "kernels/cuda/device_utils.cuh"
#include "kernels/cuda/host_utils.h"
#include "kernels/cuda/kernel_traits.cuh"
#include "kernels/cuda/merge_states.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace attnd::kernels::cuda {
namespace detail {

struct PrefillParams {
  const void* kv_layer;  // pool + layer offset
  int64_t page_stride;
  int64_t v_offset;
  int64_t slot_stride;
  int64_t head_stride;
  FastDivmod page_div;
  FastDivmod group_div;
  const int32_t* kv_indices;
  const void* q;
  int64_t q_sn, q_sh;
  void* out;
  int64_t o_sn, o_sh;
  float* lse;
  int num_qo_heads;
  int num_kv_heads;
  int group;
  int causal;
  int window_left;   // < 0: none
  int soft_cap;
  float scale_pre;
  float scale_post;
  const int32_t* plan;
  int items_offset;
  int merges_offset;
  float* partial_out;  // [slot][kv_head][kPrefillWideRows][D]
  float* partial_lse;  // [slot][kv_head][kPrefillWideRows], log2 units
};

// Element offset of (row, 16-byte chunk) in a [rows][D] tile, chunks XOR-swizzled by row.
template <int D>
__device__ __forceinline__ int PSwz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

struct ItemDesc {
  int q_start, q_len, pos0, row0, t0, t1, page_off, slot;
};

// Output row of packed row R (query R / group, head R % group of kv head kvh).
__device__ __forceinline__ int64_t OutRowOffset(const PrefillParams& p, int q_start, int R,
                                                int kvh, int64_t sn, int64_t sh, int* head) {
  uint32_t qi, g;
  p.group_div.Divmod(static_cast<uint32_t>(R), qi, g);
  *head = kvh * p.group + static_cast<int>(g);
  return (static_cast<int64_t>(q_start) + qi) * sn + static_cast<int64_t>(*head) * sh;
}

// One pass of a work item over its keys. Wide (kNarrow false): the 4 warps split the pass's
// Tr::kRows rows, kMT 16-row m-tiles each, and every warp runs every key of a stage; a K (or V)
// fragment read from shared memory feeds kMT MMAs. Narrow: the warps share 16 rows and each
// takes 16 keys of a stage. slot_row: the pass's first row within the item's partial slot.
template <typename T, int D, bool kNarrow, int kMT, typename Tr = PrefillTraits<D>>
__device__ __forceinline__ void RunItem(const PrefillParams& p, const ItemDesc& it, int kvh,
                                        int slot_row, unsigned char* smem) {
  constexpr int S = Tr::kStages;
  constexpr int kKSteps = D / 16;
  constexpr int kNTiles = D / 8;
  constexpr int kSub = kNarrow ? 1 : 4;  // 16-key blocks per warp per stage
  constexpr int kQRows = kNarrow ? 16 : Tr::kRows;
  constexpr int kWarpRows = 16 * kMT;
  constexpr bool kQRegs = Tr::kQInRegs && !kNarrow;
  static_assert(kNarrow ? kMT == 1 : kMT == Tr::kMT, "m-tiles per warp");
  T* pipe = reinterpret_cast<T*>(smem);
  T* q_smem = reinterpret_cast<T*>(smem + Tr::kPipeBytes);
  int64_t* off_smem = reinterpret_cast<int64_t*>(smem + Tr::kPipeBytes + Tr::kQBytes);
  float* m_smem = reinterpret_cast<float*>(smem + Tr::kPipeBytes + Tr::kQBytes + Tr::kOffBytes);
  float* l_smem = m_smem + Tr::kWarps * 16;
  float* acc_smem = reinterpret_cast<float*>(smem);  // narrow merge, after the pipeline drains

  const int tid = static_cast<int>(threadIdx.x) - Tr::kThreadBase;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int rows_total = it.q_len * p.group;
  const int num_tiles = (it.t1 - it.t0 + Tr::kKeys - 1) / Tr::kKeys;
  const T* kv = static_cast<const T*>(p.kv_layer) + kvh * p.head_stride;
  const int32_t* pages = p.kv_indices + it.page_off;

  // Threads 0..63 resolve the page offsets of a tile's 64 keys: fetch() loads the page index
  // into a register early, store() writes the offset into the tile's stage slot late, so that
  // the global load's latency hides behind a stage of MMAs.
  int pf_page = -1;
  uint32_t pf_slot = 0;
  auto fetch = [&](int tile) {
    if (tid < Tr::kKeys) {
      const int tok = it.t0 + tile * Tr::kKeys + tid;
      pf_page = -1;
      if (tile < num_tiles && tok < it.t1) {
        uint32_t pg;
        p.page_div.Divmod(static_cast<uint32_t>(tok), pg, pf_slot);
        pf_page = __ldg(pages + pg);
      }
    }
  };
  auto store = [&](int tile) {
    if (tid < Tr::kKeys) {
      off_smem[(tile % S) * Tr::kKeys + tid] =
          pf_page < 0 ? int64_t{-1}
                      : static_cast<int64_t>(pf_page) * p.page_stride + pf_slot * p.slot_stride;
    }
  };
  auto issue = [&](int tile) {
    const int stage = tile % S;
    T* ks = pipe + stage * Tr::kStageElems;
#pragma unroll
    for (int i = 0; i < Tr::kLoadsPerThread; ++i) {
      const int idx = tid + Tr::kThreads * i;
      const int r = idx / Tr::kChunks, ch = idx % Tr::kChunks;
      const int64_t off = off_smem[stage * Tr::kKeys + r];
      const bool valid = off >= 0;
      const T* src = kv + (valid ? off : 0) + ch * 8;
      const uint32_t dst = SmemAddr(ks + PSwz<D>(r, ch));
      CpAsync16(dst, src, valid);
      CpAsync16(dst + Tr::kKeys * D * 2, src + p.v_offset, valid);
    }
  };

  // Prologue: page offsets of the first S tiles, the query rows, the first S - 1 stages.
#pragma unroll
  for (int s = 0; s < S; ++s) {
    fetch(s);
    store(s);
  }
  {
    for (int idx = tid; idx < kQRows * Tr::kChunks; idx += Tr::kThreads) {
      const int r = idx / Tr::kChunks, ch = idx % Tr::kChunks;
      const int R = it.row0 + r;
      const bool ok = R < rows_total;
      const T* src = static_cast<const T*>(p.q);
      if (ok) {
        int h;
        src += OutRowOffset(p, it.q_start, R, kvh, p.q_sn, p.q_sh, &h) + ch * 8;
      }
      CpAsync16(SmemAddr(q_smem + PSwz<D>(r, ch)), src, ok);
    }
    CpAsyncCommit();
  }
  Tr::Sync();  // the page offsets
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < num_tiles) issue(s);
    CpAsyncCommit();
  }
  CpAsyncWait<S - 1>();  // the query group
  Tr::Sync();

  const int qr0 = kNarrow ? 0 : warp * kWarpRows;  // this warp's rows within the tile
  auto load_q = [&](uint32_t (&a)[4], int kk, int mt) {
    const int mi = lane >> 3;
    const int r = qr0 + mt * 16 + ((mi & 1) << 3) + (lane & 7);
    LdMatrixX4(a, SmemAddr(q_smem + PSwz<D>(r, kk * 2 + (mi >> 1))));
  };
  uint32_t qfrag[kQRegs ? kMT : 1][kQRegs ? kKSteps : 1][4];
  if constexpr (kQRegs) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) load_q(qfrag[mt][kk], kk, mt);
    }
  }

  // Positions of this thread's rows (-1: padding row, sees nothing) and the warp's span.
  const int r_lo = lane >> 2;
  int qpos[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int R = it.row0 + qr0 + mt * 16 + r_lo + 8 * i;
      qpos[mt][i] = -1;
      if (R < rows_total) {
        uint32_t qi, g;
        p.group_div.Divmod(static_cast<uint32_t>(R), qi, g);
        qpos[mt][i] = it.pos0 + (p.causal ? static_cast<int>(qi) : 0);
      }
    }
  }
  const bool warp_has_rows = it.row0 + qr0 < rows_total;
  int warp_max_pos = -1;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) warp_max_pos = max(warp_max_pos, max(qpos[mt][0], qpos[mt][1]));
  // Rows grow with the position: the first valid row has the smallest.
  int warp_min_pos = qpos[0][0] < 0 ? INT_MAX : qpos[0][0];
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    warp_max_pos = max(warp_max_pos, __shfl_xor_sync(0xffffffffu, warp_max_pos, o));
    warp_min_pos = min(warp_min_pos, __shfl_xor_sync(0xffffffffu, warp_min_pos, o));
  }

  // Scores stay raw (no soft cap) and are scaled inside the exponent's FFMA; with the soft cap
  // they are capped in place, already in log2 units.
  const float sc = p.soft_cap ? 1.f : p.scale_pre;
  float m[kMT][2], l[kMT][2];
  float acc[kMT][kNTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.f;
  }

  for (int k = 0; k < num_tiles; ++k) {
    CpAsyncWait<S - 2>();
    Tr::Sync();  // tile k is in; every warp is done with tile k - 1
    if (k + S - 1 < num_tiles) issue(k + S - 1);
    CpAsyncCommit();
    fetch(k + S);

    const int krow0 = kNarrow ? warp * 16 : 0;  // this warp's keys within the stage
    const int key_first = it.t0 + k * Tr::kKeys + krow0;
    const int key_last = key_first + kSub * 16 - 1;
    const bool active = warp_has_rows && key_first < it.t1 && key_first <= warp_max_pos &&
                        !(p.window_left >= 0 && key_last < warp_min_pos - p.window_left);
    if (active) {
      const bool need_mask = key_last >= it.t1 || key_last > warp_min_pos ||
                             (p.window_left >= 0 && warp_max_pos - key_first > p.window_left);

      const T* ks = pipe + (k % S) * Tr::kStageElems;
      const T* vs = ks + Tr::kKeys * D;

      float s[kMT][2 * kSub][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int j = 0; j < 2 * kSub; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          if constexpr (kQRegs) {
#pragma unroll
            for (int e = 0; e < 4; ++e) a[mt][e] = qfrag[mt][kk][e];
          } else {
            load_q(a[mt], kk, mt);
          }
        }
#pragma unroll
        for (int sub = 0; sub < kSub; ++sub) {
          uint32_t kb[4];
          const int mi = lane >> 3;
          LdMatrixX4(kb, SmemAddr(ks + PSwz<D>(krow0 + sub * 16 + ((mi >> 1) << 3) + (lane & 7),
                                               kk * 2 + (mi & 1))));
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            Mma16816<T>(s[mt][2 * sub], a[mt], kb[0], kb[1]);
            Mma16816<T>(s[mt][2 * sub + 1], a[mt], kb[2], kb[3]);
          }
        }
      }

      if (p.soft_cap) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
          for (int j = 0; j < 2 * kSub; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[mt][j][e] = p.scale_post * tanhf(p.scale_pre * s[mt][j][e]);
          }
        }
      }
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < 2 * kSub; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float x = s[mt][j][e];
            if (need_mask) {
              const int tok = key_first + j * 8 + ((lane & 3) << 1) + (e & 1);
              const int qp = qpos[mt][e >> 1];
              const bool vis = tok < it.t1 && tok <= qp &&
                               (p.window_left < 0 || qp - tok <= p.window_left);
              x = vis ? x : -INFINITY;
            }
            s[mt][j][e] = x;
            mx[e >> 1] = fmaxf(mx[e >> 1], x);
          }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
          mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
          const float m_new = fmaxf(m[mt][i], mx[i] * sc);
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          const float alpha = FastExp2(m[mt][i] - m_use);
          m[mt][i] = m_new;
          l[mt][i] *= alpha;
#pragma unroll
          for (int n = 0; n < kNTiles; ++n) {
            acc[mt][n][2 * i] *= alpha;
            acc[mt][n][2 * i + 1] *= alpha;
          }
#pragma unroll
          for (int j = 0; j < 2 * kSub; ++j) {
            s[mt][j][2 * i] = FastExp2(fmaf(s[mt][j][2 * i], sc, -m_use));
            s[mt][j][2 * i + 1] = FastExp2(fmaf(s[mt][j][2 * i + 1], sc, -m_use));
            l[mt][i] += s[mt][j][2 * i] + s[mt][j][2 * i + 1];
          }
        }
      }

#pragma unroll
      for (int sub = 0; sub < kSub; ++sub) {
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          a[mt][0] = PackPair<T>(s[mt][2 * sub][0], s[mt][2 * sub][1]);
          a[mt][1] = PackPair<T>(s[mt][2 * sub][2], s[mt][2 * sub][3]);
          a[mt][2] = PackPair<T>(s[mt][2 * sub + 1][0], s[mt][2 * sub + 1][1]);
          a[mt][3] = PackPair<T>(s[mt][2 * sub + 1][2], s[mt][2 * sub + 1][3]);
        }
#pragma unroll
        for (int dd = 0; dd < kKSteps; ++dd) {
          uint32_t vb[4];
          const int mi = lane >> 3;
          LdMatrixX4Trans(vb, SmemAddr(vs + PSwz<D>(krow0 + sub * 16 + ((mi & 1) << 3) + (lane & 7),
                                                    dd * 2 + (mi >> 1))));
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            Mma16816<T>(acc[mt][2 * dd], a[mt], vb[0], vb[1]);
            Mma16816<T>(acc[mt][2 * dd + 1], a[mt], vb[2], vb[3]);
          }
        }
      }
    }
    store(k + S);
  }

#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l[mt][i] += __shfl_xor_sync(0xffffffffu, l[mt][i], 1);
      l[mt][i] += __shfl_xor_sync(0xffffffffu, l[mt][i], 2);
    }
  }
  CpAsyncWait<0>();
  Tr::Sync();  // the pipeline and the query tile are free

  const bool direct = it.slot < 0;
  const int64_t part_row0 =
      (static_cast<int64_t>(it.slot) * p.num_kv_heads + kvh) * kPrefillWideRows + slot_row;

  if constexpr (!kNarrow) {
    // Each warp finishes its own rows.
    if (!warp_has_rows) return;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = qr0 + mt * 16 + r_lo + 8 * i;
        const int R = it.row0 + r;
        const float inv = l[mt][i] > 0.f ? 1.f / l[mt][i] : 0.f;
        const float lse2 = l[mt][i] > 0.f ? __log2f(l[mt][i]) + m[mt][i] : -INFINITY;
        if (direct) {
#pragma unroll
          for (int n = 0; n < kNTiles; ++n) {
            *reinterpret_cast<uint32_t*>(q_smem + PSwz<D>(r, n) + ((lane & 3) << 1)) =
                PackPair<T>(acc[mt][n][2 * i] * inv, acc[mt][n][2 * i + 1] * inv);
          }
          if ((lane & 3) == 0 && R < rows_total && p.lse != nullptr) {
            int h;
            const int64_t o = OutRowOffset(p, it.q_start, R, kvh, p.num_qo_heads, 1, &h);
            p.lse[o] = lse2 * 0.69314718055994531f;
          }
        } else if (R < rows_total) {
          float* dst = p.partial_out + (part_row0 + r) * D + ((lane & 3) << 1);
#pragma unroll
          for (int n = 0; n < kNTiles; ++n) {
            __stcg(reinterpret_cast<float2*>(dst + n * 8),
                   make_float2(acc[mt][n][2 * i] * inv, acc[mt][n][2 * i + 1] * inv));
          }
          if ((lane & 3) == 0) __stcg(p.partial_lse + part_row0 + r, lse2);
        }
      }
    }
    if (direct) {
      __syncwarp();
      for (int idx = lane; idx < kWarpRows * Tr::kChunks; idx += 32) {
        const int r = qr0 + idx / Tr::kChunks, ch = idx % Tr::kChunks;
        const int R = it.row0 + r;
        if (R >= rows_total) continue;
        int h;
        const int64_t o = OutRowOffset(p, it.q_start, R, kvh, p.o_sn, p.o_sh, &h);
        *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + o + ch * 8) =
            *reinterpret_cast<const uint4*>(q_smem + PSwz<D>(r, ch));
      }
    }
  } else {
    // Narrow: merge the 4 warps' states (same rows, different keys) in a fixed order.
    if ((lane & 3) == 0) {
      m_smem[warp * 16 + r_lo] = m[0][0];
      l_smem[warp * 16 + r_lo] = l[0][0];
      m_smem[warp * 16 + r_lo + 8] = m[0][1];
      l_smem[warp * 16 + r_lo + 8] = l[0][1];
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float* dst = acc_smem + (warp * 16 + r_lo + 8 * i) * D + ((lane & 3) << 1);
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        *reinterpret_cast<float2*>(dst + n * 8) = make_float2(acc[0][n][2 * i], acc[0][n][2 * i + 1]);
      }
    }
    Tr::Sync();
    const int nrows = min(16, rows_total - it.row0);
    for (int idx = tid; idx < nrows * Tr::kChunks; idx += Tr::kThreads) {
      const int r = idx / Tr::kChunks, ch = idx % Tr::kChunks;
      float mw[Tr::kWarps];
      float mmax = -INFINITY;
#pragma unroll
      for (int w = 0; w < Tr::kWarps; ++w) {
        mw[w] = m_smem[w * 16 + r];
        mmax = fmaxf(mmax, mw[w]);
      }
      float o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      float lsum = 0.f;
      if (mmax != -INFINITY) {
#pragma unroll
        for (int w = 0; w < Tr::kWarps; ++w) {
          const float sc = FastExp2(mw[w] - mmax);
          lsum += sc * l_smem[w * 16 + r];
          const float* src = acc_smem + (w * 16 + r) * D + ch * 8;
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
      const int R = it.row0 + r;
      if (direct) {
        int h;
        const int64_t off = OutRowOffset(p, it.q_start, R, kvh, p.o_sn, p.o_sh, &h);
        uint4 packed;
        packed.x = PackPair<T>(o[0], o[1]);
        packed.y = PackPair<T>(o[2], o[3]);
        packed.z = PackPair<T>(o[4], o[5]);
        packed.w = PackPair<T>(o[6], o[7]);
        *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + off + ch * 8) = packed;
        if (ch == 0 && p.lse != nullptr) {
          const int64_t lo = OutRowOffset(p, it.q_start, R, kvh, p.num_qo_heads, 1, &h);
          p.lse[lo] = lse2 * 0.69314718055994531f;
        }
      } else {
        float* dst = p.partial_out + (part_row0 + r) * D + ch * 8;
        __stcg(reinterpret_cast<float4*>(dst), make_float4(o[0], o[1], o[2], o[3]));
        __stcg(reinterpret_cast<float4*>(dst + 4), make_float4(o[4], o[5], o[6], o[7]));
        if (ch == 0) __stcg(p.partial_lse + part_row0 + r, lse2);
      }
    }
  }
}

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

}  // namespace detail
}  // namespace attnd::kernels::cuda

#include "kernels/cuda/prefill_hopper.cuh"

namespace attnd::kernels::cuda {
namespace detail {

// The kernel a (T, D, hopper) triple launches, with its block size and shared memory.
template <typename T, int D>
struct PrefillKernelChoice {
  void (*fn)(PrefillParams);
  int threads;
  int smem;
  static PrefillKernelChoice Get(bool hopper) {
    if constexpr (D <= 128) {
      if (hopper) {
        return {&BatchPrefillHopperKernel<T, D>, HopperPrefillTraits<D>::kThreads,
                HopperPrefillTraits<D>::kSmemBytes};
      }
    }
    return {&BatchPrefillKernel<T, D>, PrefillTraits<D>::kThreads, PrefillTraits<D>::kSmemBytes};
  }
};

template <typename T, int D>
cudaError_t PreparePrefillKernel(int device, bool hopper) {
  static std::atomic<uint64_t> done_mask[2] = {0, 0};
  const uint64_t bit = device < 64 ? (1ull << device) : 0;
  if (bit != 0 && (done_mask[hopper].load(std::memory_order_acquire) & bit)) return cudaSuccess;
  const PrefillKernelChoice<T, D> k = PrefillKernelChoice<T, D>::Get(hopper);
  cudaError_t e = cudaFuncSetAttribute(k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, k.smem);
  if (e == cudaSuccess && bit != 0) done_mask[hopper].fetch_or(bit, std::memory_order_acq_rel);
  return e;
}

template <typename T, int D>
struct PrefillLaunchFn {
  static cudaError_t Run(const PrefillParams& p, dim3 grid, dim3 merge_grid, bool merge,
                         bool hopper, cudaStream_t stream) {
    int device = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e != cudaSuccess) return e;
    if ((e = PreparePrefillKernel<T, D>(device, hopper)) != cudaSuccess) return e;
    const PrefillKernelChoice<T, D> k = PrefillKernelChoice<T, D>::Get(hopper);
    k.fn<<<grid, k.threads, k.smem, stream>>>(p);
    if ((e = cudaGetLastError()) != cudaSuccess || !merge) return e;
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = merge_grid;
    cfg.blockDim = dim3(128);
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, PrefillMergeKernel<T, D>, p);
  }
};

template <typename T, int D>
struct PrefillOccupancyFn {
  static cudaError_t Run(int device, bool hopper, int* blocks) {
    cudaError_t e = PreparePrefillKernel<T, D>(device, hopper);
    if (e != cudaSuccess) return e;
    const PrefillKernelChoice<T, D> k = PrefillKernelChoice<T, D>::Get(hopper);
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, k.fn, k.threads, k.smem);
  }
};

// Resolves kAuto; false with *error set when kHopper was asked for and cannot run.
cudaError_t UseHopperPrefill(int device, int64_t head_dim, PrefillKernel kernel, bool* hopper) {
  const bool available = HopperPrefillAvailable(device, head_dim);
  if (kernel == PrefillKernel::kHopper && !available) return cudaErrorNotSupported;
  *hopper = kernel != PrefillKernel::kPortable && available;
  return cudaSuccess;
}

}  // namespace detail

bool HopperPrefillAvailable(int device, int64_t head_dim) {
#if defined(ATTND_BUILT_FOR_SM90A)
  if (head_dim != 64 && head_dim != 128) return false;
  // wgmma is sm_90a only: later majors run the portable kernel.
  static std::atomic<uint64_t> known{0}, yes{0};
  const uint64_t bit = device >= 0 && device < 64 ? (1ull << device) : 0;
  if (bit == 0) return false;
  if (known.load(std::memory_order_acquire) & bit) return (yes.load(std::memory_order_acquire) & bit) != 0;
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return false;
  }
  if (major == 9 && minor == 0) yes.fetch_or(bit, std::memory_order_acq_rel);
  known.fetch_or(bit, std::memory_order_acq_rel);
  return major == 9 && minor == 0;
#else
  (void)device;
  (void)head_dim;
  return false;
#endif
}

cudaError_t MakePrefillPlanConfig(int device, DType dtype, int64_t head_dim, int64_t num_qo_heads,
                                  int64_t num_kv_heads, int64_t window_left, bool causal,
                                  PrefillPlanConfig* cfg, PrefillKernel kernel) {
  if (cfg == nullptr || num_kv_heads <= 0 || num_qo_heads % num_kv_heads != 0) {
    return cudaErrorInvalidValue;
  }
  int old = 0;
  cudaError_t e = cudaGetDevice(&old);
  if (e != cudaSuccess) return e;
  if (old != device && (e = cudaSetDevice(device)) != cudaSuccess) return e;
  int sms = 0, blocks = 0;
  bool hopper = false;
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e == cudaSuccess) e = detail::UseHopperPrefill(device, head_dim, kernel, &hopper);
  if (e == cudaSuccess) {
    e = detail::DispatchDTypeHeadDim<detail::PrefillOccupancyFn>(dtype, head_dim, device, hopper,
                                                                 &blocks);
  }
  if (old != device) cudaSetDevice(old);
  if (e != cudaSuccess) return e;
  cfg->num_sms = sms;
  cfg->ctas_per_sm = std::max(blocks, 1);
  cfg->num_kv_heads = static_cast<int>(num_kv_heads);
  cfg->group = static_cast<int>(num_qo_heads / num_kv_heads);
  cfg->causal = causal;
  cfg->window_left = window_left;
  return cudaSuccess;
}

cudaError_t LaunchBatchPrefill(const PrefillArgs& a, cudaStream_t stream) {
  const KvCacheShape& sh = a.kv.shape;
  const int64_t qo = a.opts.num_qo_heads, kvh = sh.num_kv_heads, d = sh.head_dim;
  if (kvh <= 0 || kvh > 65535 || qo <= 0 || qo % kvh != 0 || sh.page_size <= 0 ||
      sh.page_size >= (1 << 30) || a.ws.plan == nullptr || a.ws.grid_y <= 0 ||
      a.q == nullptr || a.out == nullptr || a.kv.pool == nullptr || a.kv_indices == nullptr ||
      a.opts.window_left >= INT32_MAX ||
      (a.may_merge && a.ws.layout.max_merges > 0 &&
       (a.ws.partial_out == nullptr || a.ws.partial_lse == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (!detail::Aligned16(a.q) || !detail::Aligned16(a.out) || !detail::Aligned16(a.kv.pool) ||
      a.q_stride_n % 8 || a.q_stride_h % 8 || a.out_stride_n % 8 || a.out_stride_h % 8) {
    return cudaErrorMisalignedAddress;
  }
  detail::PrefillParams p{};
  p.kv_layer = static_cast<const char*>(a.kv.pool) +
               a.kv.layer * sh.LayerElems() * static_cast<int64_t>(DTypeSize(sh.dtype));
  p.page_stride = sh.PageElems();
  p.v_offset = sh.BlockElems();
  p.slot_stride = sh.SlotStride();
  p.head_stride = sh.HeadStride();
  p.page_div = detail::MakeFastDivmod(static_cast<uint32_t>(sh.page_size));
  p.group = static_cast<int>(qo / kvh);
  p.group_div = detail::MakeFastDivmod(static_cast<uint32_t>(p.group));
  p.kv_indices = a.kv_indices;
  p.q = a.q;
  p.q_sn = a.q_stride_n;
  p.q_sh = a.q_stride_h;
  p.out = a.out;
  p.o_sn = a.out_stride_n;
  p.o_sh = a.out_stride_h;
  p.lse = a.lse;
  p.num_qo_heads = static_cast<int>(qo);
  p.num_kv_heads = static_cast<int>(kvh);
  p.causal = a.causal ? 1 : 0;
  p.window_left = a.opts.window_left < 0 ? -1 : static_cast<int>(a.opts.window_left);
  const detail::LogitScales scales = detail::MakeLogitScales(a.opts);
  p.soft_cap = scales.soft_cap;
  p.scale_pre = scales.pre;
  p.scale_post = scales.post;
  p.plan = a.ws.plan;
  p.items_offset = static_cast<int>(a.ws.layout.ItemsOffset());
  p.merges_offset = static_cast<int>(a.ws.layout.MergesOffset());
  p.partial_out = a.ws.partial_out;
  p.partial_lse = a.ws.partial_lse;
  const unsigned gy = static_cast<unsigned>(std::min(a.ws.grid_y, 65535));
  const dim3 grid(static_cast<unsigned>(kvh), gy);
  const unsigned my = static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>({a.ws.layout.max_merges, int64_t{gy}, 65535})));
  const dim3 merge_grid(static_cast<unsigned>(kvh), my);
  const bool merge = a.may_merge && a.ws.layout.max_merges > 0;
  int device = 0;
  bool hopper = false;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = detail::UseHopperPrefill(device, d, a.kernel, &hopper);
  if (e != cudaSuccess) return e;
  return detail::DispatchDTypeHeadDim<detail::PrefillLaunchFn>(sh.dtype, d, p, grid, merge_grid,
                                                               merge, hopper, stream);
}

}  // namespace attnd::kernels::cuda
