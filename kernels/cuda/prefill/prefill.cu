// Launcher of batch prefill: checks the arguments, picks the portable or the Hopper kernel,
// dispatches on dtype and head_dim, and launches the merge of cut tiles as a programmatic
// dependent.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/common/dispatch.h"
#include "kernels/cuda/common/host_utils.h"
#include "kernels/cuda/common/launch.h"
#include "kernels/cuda/prefill/prefill.h"
#include "kernels/cuda/prefill/prefill_hopper_launch.h"
#include "kernels/cuda/prefill/prefill_kernel.cuh"
#include "kernels/cuda/prefill/prefill_params.cuh"

namespace attnd::kernels::cuda {
namespace {

constexpr char kFamily[] = "prefill";

template <typename T, int D>
cudaError_t PreparePortableKernel(int device) {
  static detail::OncePerDevice once;
  return detail::AllowDynamicSmem(
      once, device, reinterpret_cast<const void*>(&detail::BatchPrefillKernel<T, D>),
      detail::PrefillTraits<D>::kSmemBytes);
}

// The main kernel: Hopper's where chosen (it exists for head_dim <= 128 only), else portable.
template <typename T, int D>
cudaError_t LaunchPrefillKernel(const detail::PrefillParams& p, dim3 grid, bool hopper,
                                bool wide_items, int device, cudaStream_t stream) {
  if constexpr (D <= 128) {
    if (hopper) return detail::LaunchHopperPrefill<T, D>(p, grid, wide_items, device, stream);
  }
  using Tr = detail::PrefillTraits<D>;
  const cudaError_t e = PreparePortableKernel<T, D>(device);
  if (e != cudaSuccess) return e;
  detail::BatchPrefillKernel<T, D><<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
struct PrefillLaunchFn {
  static absl::Status Run(const detail::PrefillParams& p, dim3 grid, dim3 merge_grid, bool merge,
                          bool hopper, bool wide_items, int device, cudaStream_t stream) {
    absl::Status s = detail::CudaStatus(
        LaunchPrefillKernel<T, D>(p, grid, hopper, wide_items, device, stream),
                                        hopper ? "prefill kernel launch (Hopper)"
                                               : "prefill kernel launch");
    if (!s.ok() || !merge) return s;
    return detail::CudaStatus(detail::LaunchKernel(detail::PrefillMergeKernel<T, D>, merge_grid,
                                                   dim3(128), 0, stream, /*programmatic=*/true, p),
                              "prefill merge kernel launch");
  }
};

template <typename T, int D>
struct PrefillOccupancyFn {
  static absl::Status Run(int device, bool hopper, int* blocks) {
    if constexpr (D <= 128) {
      if (hopper) {
        return detail::CudaStatus(detail::HopperPrefillOccupancy<T, D>(device, blocks),
                                  "prefill kernel occupancy (Hopper)");
      }
    }
    using Tr = detail::PrefillTraits<D>;
    cudaError_t e = PreparePortableKernel<T, D>(device);
    if (e == cudaSuccess) {
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          blocks, &detail::BatchPrefillKernel<T, D>, Tr::kThreads, Tr::kSmemBytes);
    }
    return detail::CudaStatus(e, "prefill kernel occupancy");
  }
};

// Resolves kAuto; an error when kHopper was asked for and cannot run.
absl::StatusOr<bool> UseHopperKernel(int device, int64_t head_dim, PrefillKernel kernel) {
  const bool available = HopperPrefillAvailable(device, head_dim);
  if (kernel == PrefillKernel::kHopper && !available) {
    return detail::HopperPrefillUnavailable(device, head_dim);
  }
  return kernel != PrefillKernel::kPortable && available;
}

absl::Status ValidateShape(const PrefillArgs& a) {
  using detail::InvalidArg;
  const int64_t kvh = a.kv.shape.num_kv_heads;
  // The grid's x dimension is one CTA row per KV head.
  if (kvh > 65535) return InvalidArg(kFamily, "kv.shape.num_kv_heads ", kvh, " exceeds 65535");
  if (a.kv.shape.storage != KvStorage::kModelDType) {
    return InvalidArg(kFamily,
                      "kv.shape.storage is fp8: dequantize the batch's pages into a "
                      "model-dtype staging pool first (LaunchDequantizePages)");
  }
  if (absl::Status s = detail::CheckHeadsAndPages(kFamily, a.opts.num_qo_heads, a.kv.shape);
      !s.ok())
    return s;
  if (a.opts.window_left >= INT32_MAX) {
    return InvalidArg(kFamily, "opts.window_left ", a.opts.window_left, " is not below 2^31 - 1");
  }
  return absl::OkStatus();
}

absl::Status ValidateWorkspace(const PrefillArgs& a) {
  using detail::InvalidArg;
  const PrefillWorkspace& ws = a.ws;
  if (ws.plan == nullptr) return InvalidArg(kFamily, "ws.plan is null");
  if (ws.grid_y <= 0) return InvalidArg(kFamily, "ws.grid_y ", ws.grid_y, " is not positive");
  if (ws.grid_y > 65535) return InvalidArg(kFamily, "ws.grid_y ", ws.grid_y, " exceeds 65535");
  if (a.may_merge && ws.layout.max_merges > 0) {
    if (ws.partial_out == nullptr) {
      return InvalidArg(kFamily, "ws.partial_out is null (the layout has merges)");
    }
    if (ws.partial_lse == nullptr) {
      return InvalidArg(kFamily, "ws.partial_lse is null (the layout has merges)");
    }
  }
  return absl::OkStatus();
}

absl::Status ValidatePointers(const PrefillArgs& a) {
  return detail::CheckAttentionTensors(kFamily, a.q, a.out, a.kv.pool, a.kv_indices,
                                       {{"q_stride_n", a.q_stride_n},
                                        {"q_stride_h", a.q_stride_h},
                                        {"out_stride_n", a.out_stride_n},
                                        {"out_stride_h", a.out_stride_h}});
}

detail::PrefillParams MakePrefillParams(const PrefillArgs& a) {
  const KvCacheShape& sh = a.kv.shape;
  const int64_t qo = a.opts.num_qo_heads, kvh = sh.num_kv_heads;
  detail::PrefillParams p{};
  p.kv_layer = static_cast<const char*>(a.kv.pool) +
               a.kv.layer * sh.LayerElems() * sh.ElemBytes();
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
  p.work_counters = a.ws.work_counters;
  return p;
}

// The device's SM count and the chosen kernel's resident CTAs per SM, with `device` current for
// the queries.
absl::Status QueryDevice(int device, DType dtype, int64_t head_dim, PrefillKernel kernel, int* sms,
                         int* blocks) {
  const detail::ScopedDevice scoped(device);
  if (scoped.error() != cudaSuccess) {
    return detail::CudaStatus(scoped.error(), "prefill plan config: set device");
  }
  const cudaError_t e = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return detail::CudaStatus(e, "prefill plan config: SM count");
  const absl::StatusOr<bool> hopper = UseHopperKernel(device, head_dim, kernel);
  if (!hopper.ok()) return hopper.status();
  return detail::DispatchDTypeHeadDim<PrefillOccupancyFn>(kFamily, dtype, head_dim, device,
                                                          *hopper, blocks);
}

}  // namespace

absl::StatusOr<PrefillPlanConfig> MakePrefillPlanConfig(int device, DType dtype, int64_t head_dim,
                                                        int64_t num_qo_heads,
                                                        int64_t num_kv_heads, int64_t window_left,
                                                        bool causal, PrefillKernel kernel) {
  if (num_kv_heads <= 0) {
    return detail::InvalidArg(kFamily, "num_kv_heads ", num_kv_heads, " is not positive");
  }
  if (num_qo_heads % num_kv_heads != 0) {
    return detail::InvalidArg(kFamily, "num_qo_heads ", num_qo_heads,
                              " is not a multiple of num_kv_heads ", num_kv_heads);
  }
  int sms = 0, blocks = 0;
  if (absl::Status s = QueryDevice(device, dtype, head_dim, kernel, &sms, &blocks); !s.ok()) {
    return s;
  }
  PrefillPlanConfig cfg;
  cfg.num_sms = sms;
  cfg.ctas_per_sm = std::max(blocks, 1);
  cfg.num_kv_heads = static_cast<int>(num_kv_heads);
  cfg.group = static_cast<int>(num_qo_heads / num_kv_heads);
  cfg.causal = causal;
  cfg.window_left = window_left;
  return cfg;
}

absl::Status LaunchBatchPrefill(const PrefillArgs& a, cudaStream_t stream) {
  if (absl::Status s = ValidateShape(a); !s.ok()) return s;
  if (absl::Status s = ValidateWorkspace(a); !s.ok()) return s;
  if (absl::Status s = ValidatePointers(a); !s.ok()) return s;
  const detail::PrefillParams p = MakePrefillParams(a);
  const unsigned kvh = static_cast<unsigned>(a.kv.shape.num_kv_heads);
  const unsigned gy = static_cast<unsigned>(a.ws.grid_y);
  const dim3 grid(kvh, gy);
  const unsigned my = static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>({a.ws.layout.max_merges, int64_t{gy}, 65535})));
  const dim3 merge_grid(kvh, my);
  const bool merge = a.may_merge && a.ws.layout.max_merges > 0;
  int device = 0;
  if (absl::Status s = detail::CudaStatus(cudaGetDevice(&device), "prefill: current device");
      !s.ok()) {
    return s;
  }
  const absl::StatusOr<bool> hopper = UseHopperKernel(device, a.kv.shape.head_dim, a.kernel);
  if (!hopper.ok()) return hopper.status();
  return detail::DispatchDTypeHeadDim<PrefillLaunchFn>(kFamily, a.kv.shape.dtype,
                                                       a.kv.shape.head_dim, p, grid, merge_grid,
                                                       merge, *hopper, a.wide_items, device,
                                                       stream);
}

}  // namespace attnd::kernels::cuda
