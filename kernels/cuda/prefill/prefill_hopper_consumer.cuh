// The Hopper prefill's consumer warpgroups (prefill_hopper.cuh): the query rows of a wide item,
// its tiles through wgmma with the softmax of one tile under the GEMMs of the next, and its
// output rows or partials.
#ifndef ATTND_KERNELS_CUDA_PREFILL_PREFILL_HOPPER_CONSUMER_CUH_
#define ATTND_KERNELS_CUDA_PREFILL_PREFILL_HOPPER_CONSUMER_CUH_

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/common/constants.h"
#include "kernels/cuda/common/device_utils.cuh"
#include "kernels/cuda/common/softmax.cuh"
#include "kernels/cuda/common/wgmma.cuh"
#include "kernels/cuda/prefill/prefill_hopper_roles.cuh"
#include "kernels/cuda/prefill/prefill_params.cuh"

namespace attnd::kernels::cuda::detail {

// The rows of a wide item that consumer warpgroup wg owns: whether it has any, and the
// positions they span (rows grow with the position).
struct WarpgroupRows {
  int row0;
  bool any;
  int min_pos, max_pos;
};

__device__ __forceinline__ WarpgroupRows SpanOfWarpgroup(const PrefillParams& p,
                                                         const ItemDesc& it, int wg,
                                                         int rows_total) {
  WarpgroupRows span{it.row0 + wg * 64, false, INT_MAX, -1};
  span.any = span.row0 < rows_total;
  if (span.any) {
    const int last = min(span.row0 + 63, rows_total - 1);
    uint32_t q0, q1, gg;
    p.group_div.Divmod(static_cast<uint32_t>(span.row0), q0, gg);
    p.group_div.Divmod(static_cast<uint32_t>(last), q1, gg);
    span.min_pos = it.pos0 + (p.causal ? static_cast<int>(q0) : 0);
    span.max_pos = it.pos0 + (p.causal ? static_cast<int>(q1) : 0);
  }
  return span;
}

// Tiles [*lo, *hi) of an item need no mask for any row of the warpgroup: past a window's start,
// and before the diagonal and the item's last key.
template <int kKeys>
__device__ __forceinline__ void PlainTiles(const ItemDesc& it, const WarpgroupRows& span,
                                           int window_left, int num_tiles, int* lo, int* hi) {
  int plain_lo = 0, plain_hi = 0;
  if (span.any) {
    const int lim = min(it.t1 - 1, span.min_pos);  // a tile whose last key passes it is masked
    plain_hi = lim < it.t0 + kKeys - 1 ? 0 : (lim - it.t0 - kKeys + 1) / kKeys + 1;
    if (window_left >= 0) {
      const int first_free = span.max_pos - window_left - it.t0;  // keys before it are cut
      plain_lo = first_free <= 0 ? 0 : (first_free + kKeys - 1) / kKeys;
    }
  }
  *lo = min(plain_lo, num_tiles);
  *hi = max(*lo, min(plain_hi, num_tiles));
}

// The warpgroup's 64 query rows of a wide item into shared memory (cp.async, committed).
template <typename T, int D>
__device__ __forceinline__ void LoadQueryRows(const PrefillParams& p, const ItemDesc& it, int kvh,
                                              int wg, int wtid, int rows_total,
                                              const HopperSmem<D>& sm) {
  using Tr = HopperPrefillTraits<D>;
  for (int idx = wtid; idx < 64 * Tr::kChunks; idx += 128) {
    const int r = wg * 64 + idx / Tr::kChunks, ch = idx % Tr::kChunks;
    const int R = it.row0 + r;
    const bool ok = R < rows_total;
    const T* src = static_cast<const T*>(p.q);
    if (ok) {
      int h;
      src += OutRowOffset(p, it.q_start, R, kvh, p.q_sn, p.q_sh, &h) + ch * 8;
    }
    CpAsync16(sm.q() + SwizzledOffset(Tr::kRows, r, ch), src, ok);
  }
  CpAsyncCommit();
}

// The end of a wide item for one consumer thread: its rows' sums completed across the quad,
// then direct rows through the warpgroup's query rows in shared memory (coalesced stores), or a
// cut tile's rows as fp32 partials. r_lo: the thread's first row in the tile (the second is 8
// below).
template <typename T, int D>
__device__ __forceinline__ void StoreItemOutput(const PrefillParams& p, const ItemDesc& it,
                                                int kvh, int wg, int wtid, int r_lo,
                                                int rows_total, const WarpgroupRows& span,
                                                const float (&o)[D / 2], const float (&m)[2],
                                                float (&l)[2], unsigned char* smem) {
  using Tr = HopperPrefillTraits<D>;
  const int lane = wtid & 31;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }

  const bool direct = it.slot < 0;
  const int64_t part_row0 =
      (static_cast<int64_t>(it.slot) * p.num_kv_heads + kvh) * kPrefillWideRows;
  FenceProxyAsync();  // wgmma's reads of the query rows, before the generic writes below
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = r_lo + 8 * i;
    const int R = it.row0 + r;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    const float lse2 = l[i] > 0.f ? __log2f(l[i]) + m[i] : -INFINITY;
    if (direct) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        *reinterpret_cast<uint32_t*>(smem + SwizzledOffset(Tr::kRows, r, n) + ((lane & 3) << 2)) =
            PackPair<T>(o[4 * n + 2 * i] * inv, o[4 * n + 2 * i + 1] * inv);
      }
      if ((lane & 3) == 0 && R < rows_total && p.lse != nullptr) {
        int h;
        const int64_t off = OutRowOffset(p, it.q_start, R, kvh, p.num_qo_heads, 1, &h);
        p.lse[off] = lse2 * kLn2;
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
  WarpgroupSync(wg);
  if (direct && span.any) {
    const int nrows = min(64, rows_total - span.row0);
    for (int idx = wtid; idx < nrows * Tr::kChunks; idx += 128) {
      const int r = wg * 64 + idx / Tr::kChunks, ch = idx % Tr::kChunks;
      int h;
      const int64_t off = OutRowOffset(p, it.q_start, it.row0 + r, kvh, p.o_sn, p.o_sh, &h);
      *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + off + ch * 8) =
          *reinterpret_cast<const uint4*>(smem + SwizzledOffset(Tr::kRows, r, ch));
    }
  }
  WarpgroupSync(wg);  // the next item's query rows reuse the buffer
}

// A consumer warpgroup (wg 0 or 1): its 64 rows of a wide item over every tile. Step t computes
// S = Q K(t)^T while P(t-1) V(t-1) is in flight (FlashAttention-3's intra-warpgroup overlap).
// The warpgroup runs every tile, also tiles none of its rows sees (they come out as zeros): a
// branch around wgmma makes the compiler serialize them. For the same reason nothing between a
// step's issue and its last wait branches: the soft cap is a template argument, and the tiles
// that need a mask (the diagonal, the end of the keys, a window's start) run their own loops.
// One function with lambdas over shared state: as a struct of that state with member functions
// for the steps, it compiled to other SASS (184 fewer instructions, 4 more bytes of spills) that
// ran causal 8192 1.4% slower on an H200 (three runs each).
template <typename T, int D, bool kSoftCap, bool kPingPong>
__device__ __forceinline__ void ConsumeItem(const PrefillParams& p, const ItemDesc& it, int kvh,
                                            unsigned char* smem, const HopperSmem<D>& sm,
                                            uint32_t& g) {
  using Tr = HopperPrefillTraits<D>;
  constexpr int kKeys = Tr::kKeys;
  constexpr int kSN = kKeys / 2;  // S accumulators per thread (m64 x kKeys over a warpgroup)
  constexpr int kON = D / 2;      // O accumulators per thread
  constexpr uint32_t kQAtomBytes = Tr::kRows * 128;
  constexpr uint32_t kKvAtomBytes = kKeys * 128;
  const int ctid = static_cast<int>(threadIdx.x) - Tr::kProducerThreads;
  // Warp-uniform for the compiler (it serializes wgmma on paths it thinks divergent).
  const int wg = __shfl_sync(0xffffffffu, ctid >> 7, 0);
  const int wtid = ctid & 127;
  const int warp = wtid >> 5;
  const int lane = wtid & 31;
  const int rows_total = it.q_len * p.group;
  const int num_tiles = (it.t1 - it.t0 + kKeys - 1) / kKeys;

  LoadQueryRows<T, D>(p, it, kvh, wg, wtid, rows_total, sm);
  const WarpgroupRows span = SpanOfWarpgroup(p, it, wg, rows_total);
  const int r_lo = wg * 64 + warp * 16 + (lane >> 2);  // row within the tile; +8 for the second
  int qpos[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int R = it.row0 + r_lo + 8 * i;
    qpos[i] = -1;
    if (R < rows_total) {
      uint32_t qi, gg;
      p.group_div.Divmod(static_cast<uint32_t>(R), qi, gg);
      qpos[i] = it.pos0 + (p.causal ? static_cast<int>(qi) : 0);
    }
  }

  const float sc = kSoftCap ? 1.f : p.scale_pre;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[kON];
#pragma unroll
  for (int i = 0; i < kON; ++i) o[i] = 0.f;
  float s[kSN];
#pragma unroll
  for (int i = 0; i < kSN; ++i) s[i] = 0.f;
  uint32_t pa[kKeys / 16][4];  // P of the previous tile as mma A fragments
  float alpha[2];
  const uint32_t q_wg_addr = sm.q() + wg * 64 * 128;

  // The producer's cp.async writes are generic-proxy writes; wgmma reads through the async proxy.
  auto wait_k = [&](int t) {
    MbarWait(sm.full_k(RingSlot<Tr::kKSlots>(g + t)), RingParity<Tr::kKSlots>(g + t));
    FenceProxyAsync();
  };
  auto wait_v = [&](int t) {
    MbarWait(sm.full_v(RingSlot<Tr::kVSlots>(g + t)), RingParity<Tr::kVSlots>(g + t));
    FenceProxyAsync();
  };
  auto release = [&](uint32_t bar) {
    __syncwarp();
    MbarArriveIf(bar, lane == 0);
  };
  auto qk = [&](int t) {  // s = Q K(t)^T
    const uint32_t k_addr = sm.k_slot(RingSlot<Tr::kKSlots>(g + t));
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t step = (kk & 3) * 32u;  // 16 columns into the atom's 128-byte rows
      const uint64_t a = SmemDescriptor(q_wg_addr + (kk >> 2) * kQAtomBytes + step, 16, 1024);
      const uint64_t b = SmemDescriptor(k_addr + (kk >> 2) * kKvAtomBytes + step, 16, 1024);
      Wgmma<T, kKeys>::SS(s, a, b, kk > 0);
    }
    WgmmaCommit();
  };
  auto pv = [&](int t) {  // o += P(t) V(t)
    const uint32_t v_addr = sm.v_slot(RingSlot<Tr::kVSlots>(g + t));
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      // V is [keys][D], D contiguous: an N-major B; 16 keys = two 8-row groups.
      const uint64_t b = SmemDescriptor(v_addr + kk * 16 * 128, kKvAtomBytes, 1024);
      Wgmma<T, D>::RS(o, pa[kk], b, 1);
    }
    WgmmaCommit();
  };
  // Online softmax of tile t's scores: masks (when `mask` is std::true_type), sets alpha (the
  // rescale of what came before), leaves the probabilities in s.
  auto softmax = [&](int t, auto mask) {
    const int key_first = it.t0 + t * kKeys;
    // s[4 j + e]: row r_lo + 8 (e >> 1), key key_first + 8 j + 2 (lane & 3) + (e & 1).
    if constexpr (kSoftCap) {
#pragma unroll
      for (int i = 0; i < kSN; ++i) s[i] = p.scale_post * tanhf(p.scale_pre * s[i]);
    }
    if constexpr (decltype(mask)::value) {
#pragma unroll
      for (int j = 0; j < kSN / 4; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int tok = key_first + j * 8 + ((lane & 3) << 1) + (e & 1);
          const int qp = qpos[e >> 1];
          const bool vis =
              tok < it.t1 && tok <= qp && (p.window_left < 0 || qp - tok <= p.window_left);
          s[4 * j + e] = vis ? s[4 * j + e] : -INFINITY;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      // Tree reductions: short dependency chains for the two warps a scheduler has.
      float mx4[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < kSN / 4; ++j) {
        mx4[j & 3] = fmaxf(mx4[j & 3], fmaxf(s[4 * j + 2 * i], s[4 * j + 2 * i + 1]));
      }
      const float mx = fmaxf(fmaxf(mx4[0], mx4[1]), fmaxf(mx4[2], mx4[3]));
      const RawScores logits{sc};
      const RowMax r = NextRowMax(m[i], mx, logits);
      alpha[i] = r.alpha;
      m[i] = r.m_new;
      float sum4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int j = 0; j < kSN / 4; ++j) {
        s[4 * j + 2 * i] = logits.Exp2(s[4 * j + 2 * i], r.m_use);
        s[4 * j + 2 * i + 1] = logits.Exp2(s[4 * j + 2 * i + 1], r.m_use);
        sum4[j & 3] += s[4 * j + 2 * i] + s[4 * j + 2 * i + 1];
      }
      // Not OnlineSoftmaxStep's running sum: a tree, rounded differently (softmax.cuh).
      l[i] = l[i] * alpha[i] + ((sum4[0] + sum4[1]) + (sum4[2] + sum4[3]));
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

  // One step of the loop: Q K(t)^T and P(t-1) V(t-1) issued together, the softmax of tile t
  // while the second runs.
  auto step = [&](int t, auto mask) {
    wait_k(t);
    AwaitTurn<kPingPong>(wg);
    FenceRegisters(s);
    FenceRegisters(o);
    WgmmaFence();
    qk(t);
    wait_v(t - 1);  // after Q K(t) is issued: a late V does not hold it back
    pv(t - 1);
    PassTurn<kPingPong>(wg);
    WgmmaWait<1>();  // S(t); P(t-1) V(t-1) may still run
    FenceRegisters(s);
    release(sm.empty_k(RingSlot<Tr::kKSlots>(g + t)));
    softmax(t, mask);
    WgmmaWait<0>();
    FenceRegisters(o);
    release(sm.empty_v(RingSlot<Tr::kVSlots>(g + t - 1)));
    // O was in the scale of the old maximum.
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[4 * n + 0] *= alpha[0];
      o[4 * n + 1] *= alpha[0];
      o[4 * n + 2] *= alpha[1];
      o[4 * n + 3] *= alpha[1];
    }
    pack_p();
  };

  int plain_lo, plain_hi;
  PlainTiles<kKeys>(it, span, p.window_left, num_tiles, &plain_lo, &plain_hi);
  constexpr std::true_type kMasked{};
  constexpr std::false_type kPlain{};

  CpAsyncWait<0>();
  FenceProxyAsync();
  WarpgroupSync(wg);  // the query rows are in
  if (num_tiles > 0) {
    wait_k(0);
    AwaitTurn<kPingPong>(wg);
    FenceRegisters(s);
    WgmmaFence();
    qk(0);
    PassTurn<kPingPong>(wg);
    WgmmaWait<0>();
    FenceRegisters(s);
    release(sm.empty_k(RingSlot<Tr::kKSlots>(g)));
    if (plain_lo <= 0 && 0 < plain_hi) {
      softmax(0, kPlain);
    } else {
      softmax(0, kMasked);
    }
    pack_p();
    for (int t = 1; t < plain_lo; ++t) step(t, kMasked);
    for (int t = max(1, plain_lo); t < plain_hi; ++t) step(t, kPlain);
    for (int t = max(1, plain_hi); t < num_tiles; ++t) step(t, kMasked);
    wait_v(num_tiles - 1);
    AwaitTurn<kPingPong>(wg);
    FenceRegisters(o);
    WgmmaFence();
    pv(num_tiles - 1);
    PassTurn<kPingPong>(wg);
    WgmmaWait<0>();
    FenceRegisters(o);
    release(sm.empty_v(RingSlot<Tr::kVSlots>(g + num_tiles - 1)));
  }
  g += num_tiles;

  StoreItemOutput<T, D>(p, it, kvh, wg, wtid, r_lo, rows_total, span, o, m, l, smem);
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_PREFILL_PREFILL_HOPPER_CONSUMER_CUH_
