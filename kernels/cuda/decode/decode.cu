// Launcher of batch decode: checks the arguments, dispatches on dtype and head_dim, and in
// deterministic mode launches the merge kernel behind the decode kernel.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/common/dispatch.h"
#include "kernels/cuda/common/host_utils.h"
#include "kernels/cuda/common/launch.h"
#include "kernels/cuda/decode/decode.h"
#include "kernels/cuda/decode/decode_kernel.cuh"
#include "kernels/cuda/decode/decode_params.cuh"
#include "kernels/cuda/merge/merge.h"

namespace attnd::kernels::cuda {
namespace {

constexpr char kFamily[] = "decode";

template <typename T, typename KV, int D, bool kKeyRows, bool kPairs>
cudaError_t PrepareDecodeKernel(int device) {
  static detail::OncePerDevice once;
  return detail::AllowDynamicSmem(
      once, device,
      reinterpret_cast<const void*>(&detail::BatchDecodeKernel<T, KV, D, kKeyRows, kPairs>),
      detail::DecodeTraitsFor<KV, D, kKeyRows, kPairs>::kSmemBytes);
}

// Whether a GQA group runs in the key-rows layout (decode_key_rows.cuh).
template <typename KV, int D>
bool UseKeyRows(int64_t group) {
  return detail::DecodeTraitsFor<KV, D>::kKeyRowsEnabled && group <= detail::kKeyRowsMaxGroup;
}

// Head pairs (DecodeParams::pair_group): in the NHD layout the head_dim-64 rows of kv heads 2v
// and 2v + 1 are one row of 128 elements, so the pool reads as a head_dim-128 pool of half the
// heads, and a GQA group of up to 4 fills the key-rows mma's 8 query columns with
// both heads' queries (each zero in the other head's 64 dims). The mma and conversion work per
// token is that of two head_dim-64 heads, but each copy moves whole 128-byte lines: measured on
// an H200, an fp8 head_dim-64 pool streamed at 62% of the read ceiling in NHD and 77% in HND.
// Per-token scales come for both heads of a pair, and each query column takes its own head's.
// ATTND_DECODE_PAIR_HEADS=0 runs head_dim 64 on its own kernel (experiments).
#ifndef ATTND_DECODE_PAIR_HEADS
#define ATTND_DECODE_PAIR_HEADS 1
#endif
bool PairsHeads(const KvCacheShape& sh, int64_t group) {
  return ATTND_DECODE_PAIR_HEADS && sh.head_dim == 64 && sh.layout == KvLayout::kNHD &&
         sh.num_kv_heads % 2 == 0 && 2 * group <= detail::kKeyRowsMaxGroup &&
         (sh.Fp8() ? ATTND_DECODE_KEY_ROWS_FP8 : ATTND_DECODE_KEY_ROWS_BF16);
}

// The pool as the kernel reads it: with head pairs, head_dim 128 and half the kv heads (the
// same pages, rows and strides).
KvCacheShape KernelShape(const KvCacheShape& sh, int64_t group) {
  if (!PairsHeads(sh, group)) return sh;
  KvCacheShape k = sh;
  k.head_dim = 2 * sh.head_dim;
  k.num_kv_heads = sh.num_kv_heads / 2;
  return k;
}

// The grid's CTAs per item (DecodePlanConfig::kv_head_blocks): kernel kv heads times blocks of
// 16 query heads (one, in the key-rows layout).
int64_t KernelHeadBlocks(const KvCacheShape& shape, int64_t num_qo_heads) {
  const KvCacheShape k = KernelShape(shape, num_qo_heads / shape.num_kv_heads);
  const int64_t group = num_qo_heads / k.num_kv_heads;
  return k.num_kv_heads * ((group + 15) / 16);
}

template <typename T, typename KV, int D, bool kKeyRows, bool kPairs = false>
cudaError_t LaunchDecodeKernel(detail::DecodeParams p, dim3 grid, bool overlap,
                               cudaStream_t stream) {
  using Tr = detail::DecodeTraitsFor<KV, D, kKeyRows, kPairs>;
  const auto kernel = &detail::BatchDecodeKernel<T, KV, D, kKeyRows, kPairs>;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = PrepareDecodeKernel<T, KV, D, kKeyRows, kPairs>(device);
  static detail::ResidentCtas resident;
  int ctas = 0;
  if (e == cudaSuccess) {
    e = resident.Get(device, reinterpret_cast<const void*>(kernel), Tr::kThreads,
                     Tr::kSmemBytes, &ctas);
  }
  if (e != cudaSuccess) return e;
  // Dependents start early only behind a grid of one wave that merges its own requests
  // (DecodeParams::trigger_tiles): the deterministic mode's merge kernel gains nothing from an
  // early start, and the decode after it depends on it, not on this grid.
  const bool one_wave = grid.x * grid.y <= static_cast<unsigned>(ctas);
  p.trigger_tiles = one_wave && p.fused_merge ? ATTND_DECODE_TRIGGER_TILES : 0;
  return detail::LaunchKernel(kernel, grid, dim3(Tr::kThreads), Tr::kSmemBytes, stream, overlap,
                              p);
}

// Whether the (kernel) pool shape has a head-pairs kernel: head_dim 128.
template <typename KV, int D>
constexpr bool kHasPairsKernel = D == 128;

template <typename T, typename KV, int D>
struct LaunchDecodeFn {
  static absl::Status Run(const detail::DecodeParams& p, dim3 grid, bool overlap,
                          cudaStream_t stream) {
    cudaError_t e = cudaErrorInvalidValue;  // head pairs without their kernel: PairsHeads bars it
    if (p.pair_group == 0) {
      e = UseKeyRows<KV, D>(p.group)
              ? LaunchDecodeKernel<T, KV, D, true>(p, grid, overlap, stream)
              : LaunchDecodeKernel<T, KV, D, false>(p, grid, overlap, stream);
    } else if constexpr (kHasPairsKernel<KV, D>) {
      e = LaunchDecodeKernel<T, KV, D, true, true>(p, grid, overlap, stream);
    }
    return detail::CudaStatus(e, "decode kernel launch");
  }
};

template <typename T, typename KV, int D, bool kKeyRows, bool kPairs = false>
cudaError_t QueryOccupancy(int device, int* blocks, int* tile_tokens) {
  using Tr = detail::DecodeTraitsFor<KV, D, kKeyRows, kPairs>;
  *tile_tokens = Tr::kTileTokens;
  const cudaError_t e = PrepareDecodeKernel<T, KV, D, kKeyRows, kPairs>(device);
  if (e != cudaSuccess) return e;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      blocks, &detail::BatchDecodeKernel<T, KV, D, kKeyRows, kPairs>, Tr::kThreads,
      Tr::kSmemBytes);
}

// The resident CTAs per SM and the tile of tokens of the kernel that serves `group` (with
// `pairs`, the head-pairs kernel).
template <typename T, typename KV, int D>
struct DecodeOccupancyFn {
  static absl::Status Run(int device, int64_t group, bool pairs, int* blocks, int* tile_tokens) {
    cudaError_t e = cudaErrorInvalidValue;
    if (!pairs) {
      e = UseKeyRows<KV, D>(group) ? QueryOccupancy<T, KV, D, true>(device, blocks, tile_tokens)
                                   : QueryOccupancy<T, KV, D, false>(device, blocks, tile_tokens);
    } else if constexpr (kHasPairsKernel<KV, D>) {
      e = QueryOccupancy<T, KV, D, true, true>(device, blocks, tile_tokens);
    }
    return detail::CudaStatus(e, "decode kernel occupancy");
  }
};

absl::Status ValidateShape(const DecodeArgs& a) {
  if (a.batch < 0) return detail::InvalidArg(kFamily, "batch ", a.batch, " is negative");
  if (a.kv.shape.storage == KvStorage::kFp8E4M3 && a.kv.scales == nullptr)
    return detail::InvalidArg(kFamily, "kv.scales is null (fp8 pool)");
  return detail::CheckHeadsAndPages(kFamily, a.opts.num_qo_heads, a.kv.shape);
}

absl::Status ValidateWorkspace(const DecodeArgs& a) {
  using detail::InvalidArg;
  const DecodeWorkspace& ws = a.ws;
  if (ws.plan == nullptr) return InvalidArg(kFamily, "ws.plan is null");
  // The counters and the plan's grid were sized for the config's kernel: another pool shape
  // or layout may run another one (head pairs).
  const int64_t head_blocks = KernelHeadBlocks(a.kv.shape, a.opts.num_qo_heads);
  if (ws.kv_head_blocks != head_blocks) {
    return InvalidArg(kFamily, "ws.kv_head_blocks ", ws.kv_head_blocks, " is not the ",
                      head_blocks, " of this pool's kernel (a plan config for another shape?)");
  }
  if (ws.grid_x < a.batch) {
    return InvalidArg(kFamily, "ws.grid_x ", ws.grid_x, " is less than batch ", a.batch);
  }
  if (ws.grid_x > ws.layout.max_items) {
    return InvalidArg(kFamily, "ws.grid_x ", ws.grid_x, " exceeds ws.layout.max_items ",
                      ws.layout.max_items);
  }
  if (ws.grid_x > 65535) return InvalidArg(kFamily, "ws.grid_x ", ws.grid_x, " exceeds 65535");
  if (a.batch > ws.layout.max_batch) {
    return InvalidArg(kFamily, "batch ", a.batch, " exceeds ws.layout.max_batch ",
                      ws.layout.max_batch);
  }
  if (!a.deterministic && ws.counters == nullptr) {
    return InvalidArg(kFamily, "ws.counters is null (the fused merge needs them)");
  }
  return absl::OkStatus();
}

absl::Status ValidatePointers(const DecodeArgs& a) {
  return detail::CheckAttentionTensors(kFamily, a.q, a.out, a.kv.pool, a.kv_indices,
                                       {{"q_stride_b", a.q_stride_b},
                                        {"q_stride_h", a.q_stride_h},
                                        {"out_stride_b", a.out_stride_b},
                                        {"out_stride_h", a.out_stride_h}});
}

detail::DecodeParams MakeDecodeParams(const DecodeArgs& a) {
  const int64_t qo = a.opts.num_qo_heads, real_group = qo / a.kv.shape.num_kv_heads;
  const KvCacheShape sh = KernelShape(a.kv.shape, real_group);
  const int64_t group = qo / sh.num_kv_heads;
  detail::DecodeParams p{};
  p.pair_group = PairsHeads(a.kv.shape, real_group) ? static_cast<int>(real_group) : 0;
  p.layer_ptr = a.kv.layer_in_device;
  p.layer_elems = sh.LayerElems();
  p.kv_layer = static_cast<const char*>(a.kv.pool) +
               (p.layer_ptr != nullptr
                    ? 0
                    : a.kv.layer * sh.LayerElems() * sh.ElemBytes());
  p.layer = static_cast<int>(a.kv.layer);
  p.scales = a.kv.scales;
  if (const KvCacheShape& pool = a.kv.shape; pool.TokenScales()) {
    // Scales are indexed by the pool's kv heads (a pair's two), not the kernel's.
    p.token_scales = reinterpret_cast<const float*>(static_cast<const char*>(a.kv.pool) +
                                                    pool.ScalesByteOffset());
    p.layer_scales = pool.LayerScales();
    p.page_scales = pool.PageScales();
    p.page_size = static_cast<int>(pool.page_size);
    p.scale_v_offset = static_cast<int>(pool.num_kv_heads * pool.page_size);
  }
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
  p.m_blocks = static_cast<int>((group + 15) / 16);
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
  return p;
}

// Deterministic mode: the partials of every split request, merged by a separate kernel launched
// as a programmatic dependent so that its launch overlaps the decode's tail.
absl::Status LaunchDeterministicMerge(const DecodeArgs& a, cudaStream_t stream) {
  MergeArgs m;
  m.batch = a.batch;
  m.num_heads = a.opts.num_qo_heads;
  m.head_dim = a.kv.shape.head_dim;
  m.dtype = a.kv.shape.dtype;
  m.indptr = a.ws.plan + a.ws.layout.ItemIndptrOffset();
  m.partial_out = a.ws.partial_out;
  m.partial_lse = a.ws.partial_lse;
  m.out = a.out;
  m.out_stride_b = a.out_stride_b;
  m.out_stride_h = a.out_stride_h;
  m.lse = a.lse;
  m.programmatic = true;
  return LaunchMergeStates(m, stream);
}

// The device's SM count and the decode kernel's resident CTAs per SM, with `device` current for
// the queries.
absl::Status QueryDevice(int device, const KvCacheShape& shape, int64_t group, int* sms,
                         int* blocks, int* tile_tokens) {
  const detail::ScopedDevice scoped(device);
  if (scoped.error() != cudaSuccess) {
    return detail::CudaStatus(scoped.error(), "decode plan config: set device");
  }
  const cudaError_t e = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return detail::CudaStatus(e, "decode plan config: SM count");
  const KvCacheShape k = KernelShape(shape, group);
  return detail::DispatchKvHeadDim<DecodeOccupancyFn>(
      kFamily, k, device, group * shape.num_kv_heads / k.num_kv_heads, PairsHeads(shape, group),
      blocks, tile_tokens);
}

}  // namespace

absl::StatusOr<DecodePlanConfig> MakeDecodePlanConfig(int device, const KvCacheShape& shape,
                                                      int64_t num_qo_heads,
                                                      int64_t window_left) {
  const int64_t num_kv_heads = shape.num_kv_heads;
  if (num_kv_heads <= 0) {
    return detail::InvalidArg(kFamily, "num_kv_heads ", num_kv_heads, " is not positive");
  }
  if (num_qo_heads % num_kv_heads != 0) {
    return detail::InvalidArg(kFamily, "num_qo_heads ", num_qo_heads,
                              " is not a multiple of num_kv_heads ", num_kv_heads);
  }
  const int64_t group = num_qo_heads / num_kv_heads;
  int sms = 0, blocks = 0, tile_tokens = 0;
  if (absl::Status s = QueryDevice(device, shape, group, &sms, &blocks, &tile_tokens); !s.ok()) {
    return s;
  }
  DecodePlanConfig cfg;
  cfg.num_sms = sms;
  cfg.ctas_per_sm = std::max(blocks, 1);
  cfg.kv_head_blocks = static_cast<int>(KernelHeadBlocks(shape, num_qo_heads));
  cfg.tile_tokens = tile_tokens;
  cfg.window_left = window_left;
  return cfg;
}

absl::Status LaunchBatchDecode(const DecodeArgs& a, cudaStream_t stream) {
  if (absl::Status s = ValidateShape(a); !s.ok()) return s;
  if (absl::Status s = ValidateWorkspace(a); !s.ok()) return s;
  if (absl::Status s = ValidatePointers(a); !s.ok()) return s;
  if (a.batch == 0) return absl::OkStatus();
  const detail::DecodeParams p = MakeDecodeParams(a);
  const KvCacheShape k = KernelShape(a.kv.shape, a.opts.num_qo_heads / a.kv.shape.num_kv_heads);
  const dim3 grid(static_cast<unsigned>(a.ws.kv_head_blocks), a.ws.grid_x);
  absl::Status s = detail::DispatchKvHeadDim<LaunchDecodeFn>(kFamily, k, p, grid,
                                                             a.overlap_previous, stream);
  if (!s.ok() || !a.deterministic) return s;
  return LaunchDeterministicMerge(a, stream);
}

}  // namespace attnd::kernels::cuda
