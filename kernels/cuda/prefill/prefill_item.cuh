// The per-item body of the mma.sync prefill path (FlashAttention-2 on m16n8k16): the portable
// kernel's wide and narrow tiles, and the Hopper kernel's narrow tiles (decodes).
#ifndef ATTND_KERNELS_CUDA_PREFILL_PREFILL_ITEM_CUH_
#define ATTND_KERNELS_CUDA_PREFILL_PREFILL_ITEM_CUH_

#include <climits>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/common/constants.h"
#include "kernels/cuda/common/device_utils.cuh"
#include "kernels/cuda/common/epilogue.cuh"
#include "kernels/cuda/common/softmax.cuh"
#include "kernels/cuda/common/swizzle.cuh"
#include "kernels/cuda/prefill/prefill_params.cuh"
#include "kernels/prefill_plan.h"

namespace attnd::kernels::cuda::detail {

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
      const uint32_t dst = SmemAddr(ks + Swz<D>(r, ch));
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
      CpAsync16(SmemAddr(q_smem + Swz<D>(r, ch)), src, ok);
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
    LdMatrixX4(a, SmemAddr(q_smem + Swz<D>(r, kk * 2 + (mi >> 1))));
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
    for (int n = 0; n < kNTiles; ++n) {
      acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.f;
    }
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
        for (int j = 0; j < 2 * kSub; ++j) {
          s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
        }
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
          LdMatrixX4(kb, SmemAddr(ks + Swz<D>(krow0 + sub * 16 + ((mi >> 1) << 3) + (lane & 7),
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
            for (int e = 0; e < 4; ++e) {
              s[mt][j][e] = p.scale_post * tanhf(p.scale_pre * s[mt][j][e]);
            }
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
        OnlineSoftmaxStep(s[mt], mx, m[mt], l[mt], acc[mt], RawScores{sc});
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
          LdMatrixX4Trans(vb, SmemAddr(vs + Swz<D>(krow0 + sub * 16 + ((mi & 1) << 3) + (lane & 7),
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
            *reinterpret_cast<uint32_t*>(q_smem + Swz<D>(r, n) + ((lane & 3) << 1)) =
                PackPair<T>(acc[mt][n][2 * i] * inv, acc[mt][n][2 * i + 1] * inv);
          }
          if ((lane & 3) == 0 && R < rows_total && p.lse != nullptr) {
            int h;
            const int64_t o = OutRowOffset(p, it.q_start, R, kvh, p.num_qo_heads, 1, &h);
            p.lse[o] = lse2 * kLn2;
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
            *reinterpret_cast<const uint4*>(q_smem + Swz<D>(r, ch));
      }
    }
  } else {
    // Narrow: merge the warps' states (same rows, different keys) in a fixed order.
    StoreWarpRowStats<16>(m_smem, l_smem, warp, lane, m[0], l[0]);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      StoreWarpAccRow<16, D>(acc_smem, warp, r_lo + 8 * i, lane, acc[0], i);
    }
    Tr::Sync();
    const int nrows = min(16, rows_total - it.row0);
    for (int idx = tid; idx < nrows * Tr::kChunks; idx += Tr::kThreads) {
      const int r = idx / Tr::kChunks, ch = idx % Tr::kChunks;
      float mw[Tr::kWarps], o[8];
      const float lse2 =
          CombineWarpStates<Tr::kWarps, 16, D>(m_smem, l_smem, acc_smem, r, ch, mw, o);
      const int R = it.row0 + r;
      if (direct) {
        int h;
        const int64_t off = OutRowOffset(p, it.q_start, R, kvh, p.o_sn, p.o_sh, &h);
        *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + off + ch * 8) = PackChunk<T>(o);
        if (ch == 0 && p.lse != nullptr) {
          const int64_t lo = OutRowOffset(p, it.q_start, R, kvh, p.num_qo_heads, 1, &h);
          p.lse[lo] = lse2 * kLn2;
        }
      } else {
        StorePartialChunk(p.partial_out + (part_row0 + r) * D + ch * 8, o);
        if (ch == 0) __stcg(p.partial_lse + part_row0 + r, lse2);
      }
    }
  }
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_PREFILL_PREFILL_ITEM_CUH_
