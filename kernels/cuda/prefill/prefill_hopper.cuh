// The Hopper kernel of batch prefill (sm_90a; its translation unit is prefill_hopper.cu): the
// same work items, plan, partials and merge as the portable kernel, with the two GEMMs on wgmma
// (kernels/cuda/common/wgmma.cuh) and the loads on their own warpgroup (HopperPrefillTraits).
// K/V arrive through cp.async, because a page of a few tokens is too small a box for TMA. Narrow
// tiles (decodes) run the portable per-item body (prefill_item.cuh) on the consumer warps.
#ifndef ATTND_KERNELS_CUDA_PREFILL_PREFILL_HOPPER_CUH_
#define ATTND_KERNELS_CUDA_PREFILL_PREFILL_HOPPER_CUH_

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/common/constants.h"
#include "kernels/cuda/common/device_utils.cuh"
#include "kernels/cuda/common/softmax.cuh"
#include "kernels/cuda/common/wgmma.cuh"
#include "kernels/cuda/prefill/prefill_item.cuh"
#include "kernels/cuda/prefill/prefill_params.cuh"
#include "kernels/cuda/prefill/prefill_work_queue.cuh"
#include "kernels/prefill_plan.h"

namespace attnd::kernels::cuda::detail {

// Shared-memory addresses of the wide-item state.
template <int D>
struct HopperSmem {
  using Tr = HopperPrefillTraits<D>;
  uint32_t base;
  __device__ uint32_t q() const { return base; }
  __device__ uint32_t k_slot(int s) const { return base + Tr::kKRingOffset + s * Tr::kTileBytes; }
  __device__ uint32_t v_slot(int s) const { return base + Tr::kVRingOffset + s * Tr::kTileBytes; }
  // "full": the producer's loads of a slot landed; "empty": the consumers are done with it.
  __device__ uint32_t full_k(int s) const { return base + Tr::kBarrierOffset + 8 * s; }
  __device__ uint32_t full_v(int s) const { return full_k(Tr::kKSlots) + 8 * s; }
  __device__ uint32_t empty_k(int s) const { return full_v(Tr::kVSlots) + 8 * s; }
  __device__ uint32_t empty_v(int s) const { return empty_k(Tr::kKSlots) + 8 * s; }
  // The work ring (persistent grid): unit n sits in entry n % 2.
  __device__ uint32_t work_full(int e) const { return base + Tr::kWorkOffset + 8 * e; }
  __device__ uint32_t work_empty(int e) const { return work_full(2) + 8 * e; }
  __device__ uint32_t work_unit(int e) const { return work_full(4) + 4 * e; }
};

// Tile g (the CTA's g-th wide tile) in a ring of kSlots: its slot, and the parity of the phase
// in which its barriers complete.
template <int kSlots>
__device__ __forceinline__ uint32_t RingSlot(uint32_t g) { return g % kSlots; }
template <int kSlots>
__device__ __forceinline__ uint32_t RingParity(uint32_t g) { return (g / kSlots) & 1; }

// Ping-pong between the consumer warpgroups (FlashAttention-3): a warpgroup issues its GEMMs
// only after the other issued its own, so one's softmax runs under the other's GEMMs. Barrier
// 5 + wg is warpgroup wg's turn. The kernel comes with and without it (kPingPong): the one
// without serves batches of narrow items only, which its code runs 1-3% faster (measured).
// ATTND_PREFILL_PINGPONG=0 turns it off everywhere (experiments).
#ifndef ATTND_PREFILL_PINGPONG
#define ATTND_PREFILL_PINGPONG 1
#endif
template <bool kPingPong>
__device__ __forceinline__ void AwaitTurn(int wg) {
  if (kPingPong && ATTND_PREFILL_PINGPONG)
    asm volatile("bar.sync %0, 256;\n" ::"r"(5 + wg) : "memory");
}
template <bool kPingPong>
__device__ __forceinline__ void PassTurn(int wg) {
  if (kPingPong && ATTND_PREFILL_PINGPONG)
    asm volatile("bar.arrive %0, 256;\n" ::"r"(6 - wg) : "memory");
}
__device__ __forceinline__ void WarpgroupSync(int wg) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(3 + wg) : "memory");
}
// All kThreads of the CTA, around a narrow item, which the producer and the consumers reach from
// different statements: the barrier without .aligned allows that; __syncthreads and bar.sync
// (barrier.sync.aligned) do not (compute-sanitizer synccheck: "Divergent thread(s) in block").
// Named barriers: 1 the narrow body's, 2 the producer's, 3-4 the warpgroups', 5-6 the
// ping-pong's, 7 this.
template <int kThreads>
__device__ __forceinline__ void RolesSync() {
  asm volatile("barrier.sync 7, %0;\n" ::"n"(kThreads) : "memory");
}

// The producer warpgroup: K(t) and V(t) of every tile of a wide item into their rings' slots for
// g, g counting the CTA's wide tiles. Each thread's copies arrive on the slot's "full" barrier when
// they land (CpAsyncMbarArrive), so the producer never waits for its own loads, only for the
// consumers to free a slot (it used to wait for K(t) with cp.async.wait_group after issuing V(t),
// which itself waited for V(t - 2)'s slot).
//
// Thread tid resolves key tid of each tile to the address of its row, one tile early, and
// publishes it in shared memory for the threads that copy that row. A copy is then a 16-byte
// load of an address, an add and a cp.async: issuing a tile took about 23 instructions per
// cp.async when each copy recomputed its row's address from a page offset, and the consumers
// waited for the late copies.
template <typename T, int D>
__device__ __forceinline__ void ProduceItem(const PrefillParams& p, const ItemDesc& it, int kvh,
                                            unsigned char* smem, const HopperSmem<D>& sm,
                                            uint32_t& g) {
  using Tr = HopperPrefillTraits<D>;
  constexpr int kKeys = Tr::kKeys;
  constexpr int kRowStep = Tr::kProducerThreads / Tr::kChunks;
  constexpr int kLoads = Tr::kLoadsPerThread;  // rows r0 + kRowStep i, i < kLoads
  static_assert(kLoads % 2 == 0, "row addresses are read two at a time");
  const int tid = threadIdx.x;  // 0 .. 127
  const int ch = tid % Tr::kChunks, r0 = tid / Tr::kChunks;
  const int num_tiles = (it.t1 - it.t0 + kKeys - 1) / kKeys;
  const char* kv = reinterpret_cast<const char*>(static_cast<const T*>(p.kv_layer) +
                                                 kvh * p.head_stride);
  const int32_t* pages = p.kv_indices + it.page_off;
  // Row r's address at (r % kRowStep) * kLoads + r / kRowStep: a copying thread's rows are
  // consecutive. A key past the item's end has its address with the top bit set: its copy
  // reads nothing and fills zeros (src-size 0) but still names memory of the pool.
  uint64_t* rows = reinterpret_cast<uint64_t*>(smem + Tr::kOffOffset);
  constexpr uint64_t kSkip = uint64_t{1} << 63;
  const int my_slot = (tid % kRowStep) * kLoads + tid / kRowStep;
  const uint64_t k_add = static_cast<uint64_t>(ch) * 16;
  const uint64_t v_add = k_add + static_cast<uint64_t>(p.v_offset) * sizeof(T);

  uint64_t pf_row = 0;
  auto fetch = [&](int t) {
    const int tok = it.t0 + t * kKeys + tid;
    pf_row = reinterpret_cast<uint64_t>(kv) | kSkip;
    if (t < num_tiles && tok < it.t1) {
      uint32_t pg, slot;
      p.page_div.Divmod(static_cast<uint32_t>(tok), pg, slot);
      const int64_t page = __ldg(pages + pg);
      pf_row = reinterpret_cast<uint64_t>(
          kv + (page * p.page_stride + static_cast<int64_t>(slot) * p.slot_stride) * sizeof(T));
    }
  };
  auto issue = [&](const uint64_t* addrs, uint32_t dst_base, uint64_t add) {
    const uint32_t dst0 = dst_base + SwizzledOffset(kKeys, r0, ch);
#pragma unroll
    for (int i = 0; i < kLoads; i += 2) {
      const ulonglong2 a2 = *reinterpret_cast<const ulonglong2*>(addrs + r0 * kLoads + i);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const uint64_t a = e == 0 ? a2.x : a2.y;
        // Row r0 + kRowStep (i + e): same swizzle phase as r0 (kRowStep is a multiple of 8).
        CpAsync16(dst0 + (i + e) * kRowStep * 128,
                  reinterpret_cast<const void*>((a & ~kSkip) + add), (a & kSkip) == 0);
      }
    }
  };
  static_assert(kRowStep % 8 == 0, "a thread's rows share the swizzle phase of row r0");

  fetch(0);
  for (int t = 0; t < num_tiles; ++t, ++g) {
    uint64_t* addrs = rows + (g & 1) * kKeys;
    addrs[my_slot] = pf_row;
    fetch(t + 1);
    ProducerSync();  // tile g's addresses written; everyone's reads of tile g - 2's done
    const uint32_t ks = RingSlot<Tr::kKSlots>(g), vs = RingSlot<Tr::kVSlots>(g);
    MbarWait(sm.empty_k(ks), RingParity<Tr::kKSlots>(g) ^ 1);
    issue(addrs, sm.k_slot(ks), k_add);
    CpAsyncMbarArrive(sm.full_k(ks));
    MbarWait(sm.empty_v(vs), RingParity<Tr::kVSlots>(g) ^ 1);
    issue(addrs, sm.v_slot(vs), v_add);
    CpAsyncMbarArrive(sm.full_v(vs));
  }
}

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

template <typename T, int D, bool kPingPong>
__global__ void __launch_bounds__(HopperPrefillTraits<D>::kThreads, 1)
    BatchPrefillHopperKernel(const __grid_constant__ PrefillParams p) {
#if ATTND_WGMMA_AVAILABLE
  using Tr = HopperPrefillTraits<D>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // Swizzle atoms need 1024-byte alignment, which the dynamic window does not promise.
  const uint32_t raw = SmemAddr(smem_raw);
  unsigned char* smem = smem_raw + (((raw + 1023u) & ~1023u) - raw);
  const HopperSmem<D> sm{SmemAddr(smem)};
  if (threadIdx.x == 0) {
    for (int s = 0; s < Tr::kKSlots; ++s) {
      MbarInit(sm.full_k(s), Tr::kProducerThreads);
      MbarInit(sm.empty_k(s), Tr::kConsumerThreads / 32);
    }
    for (int s = 0; s < Tr::kVSlots; ++s) {
      MbarInit(sm.full_v(s), Tr::kProducerThreads);
      MbarInit(sm.empty_v(s), Tr::kConsumerThreads / 32);
    }
    for (int e = 0; e < 2; ++e) {
      MbarInit(sm.work_full(e), 1);
      MbarInit(sm.work_empty(e), Tr::kConsumerThreads);
    }
  }
  __syncthreads();
  const int num_items = __ldg(p.plan);
  const WorkQueue work{p, sm.work_full(0), sm.work_empty(0), sm.work_unit(0), num_items};
  const int4* items = reinterpret_cast<const int4*>(p.plan + p.items_offset);
  auto item_at = [&](int item) {
    const int4 a = __ldg(items + 2 * item);
    const int4 b = __ldg(items + 2 * item + 1);
    return ItemDesc{a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
  };
  GridDependencyWait();
  uint32_t g = 0;  // wide tiles so far (RingSlot, RingParity)
  // Registers as HopperPrefillTraits budgets them (128 x 56 + 256 x 224). Each
  // role has its own loop so that the compiler can hold each to its budget. A narrow item
  // reuses the whole buffer, so nothing of a wide item may be in flight around it.
  if (threadIdx.x < Tr::kProducerThreads) {
    ShrinkRegisters<Tr::kProducerRegs>();
    for (int n = 0;; ++n) {
      const WorkUnit u = work.ProducerNext(n);
      if (u.item >= num_items) break;
      const ItemDesc it = item_at(u.item);
      if (it.q_len * p.group <= kPrefillDecodeRows) {
        RolesSync<Tr::kThreads>();
        RolesSync<Tr::kThreads>();
      } else {
        ProduceItem<T, D>(p, it, u.kvh, smem, sm, g);
      }
    }
  } else {
    GrowRegisters<Tr::kConsumerRegs>();
    const int wg = __shfl_sync(0xffffffffu, (threadIdx.x - Tr::kProducerThreads) >> 7, 0);
    if (wg == 1) PassTurn<kPingPong>(wg);  // warpgroup 0 goes first
    for (int n = 0;; ++n) {
      const WorkUnit u = work.ConsumerNext(n);
      if (u.item >= num_items) break;
      const ItemDesc it = item_at(u.item);
      if (it.q_len * p.group <= kPrefillDecodeRows) {
        RolesSync<Tr::kThreads>();
        RunItem<T, D, true, 1, HopperNarrowTraits<D>>(p, it, u.kvh, 0, smem);
        RolesSync<Tr::kThreads>();
      } else {
        if (p.soft_cap) {
          ConsumeItem<T, D, true, kPingPong>(p, it, u.kvh, smem, sm, g);
        } else {
          ConsumeItem<T, D, false, kPingPong>(p, it, u.kvh, smem, sm, g);
        }
      }
    }
    if (wg == 0) AwaitTurn<kPingPong>(wg);  // takes warpgroup 1's last pass: none left pending
  }
  work.Finish();
  LaunchDependents();
#else
  __trap();  // built without sm_90a code: the host never picks this kernel then
#endif
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_PREFILL_PREFILL_HOPPER_CUH_
