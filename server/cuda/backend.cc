#include "server/cuda/backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/attention_cuda.h"
#include "kernels/decode_plan.h"
#include "kernels/prefill_plan.h"
#include "server/cuda/completions.h"
#include "server/cuda/cuda_check.h"
#include "server/cuda/decode_graphs.h"
#include "server/cuda/kv_staging.h"
#include "server/cuda/pool_transfer.h"
#include "server/cuda/workspaces.h"
#include "server/platform/gpu_batch.h"
#include "spdlog/spdlog.h"

namespace attnd {
namespace {

class CudaDeviceBackend final : public DeviceBackend {
 public:
  static absl::StatusOr<std::unique_ptr<DeviceBackend>> Create(const ServerConfig& config,
                                                               int device);

  std::string name() const override { return name_; }
  int64_t num_pages() const override { return shape_.num_pages; }
  int64_t pool_bytes() const override { return shape_.TotalBytes(); }
  KvPoolMemory pool_memory() const override { return {pool_.get(), pool_bytes(), true}; }

  absl::Status CopyPages(absl::Span<const PageCopy> copies) override;
  absl::StatusOr<LaunchResult> Append(const AppendWork& work) override;
  absl::StatusOr<AttentionPlan> PlanAttention(const AttentionBatch& batch) override;
  absl::StatusOr<LaunchResult> Attention(const AttentionWork& work,
                                         const AttentionPlan& plan) override;
  absl::Status SetKvScales(int64_t layer_begin,
                           absl::Span<const kernels::KvScales> scales) override {
    if (shape_.storage != kernels::KvStorage::kFp8E4M3)
      return absl::FailedPreconditionError(
          shape_.TokenScales()
              ? "kv scales: the pool's scales are per token, computed when KV is appended"
              : "kv scales: the pool is not fp8");
    return staging_->SetScales(layer_begin, scales);
  }
  absl::Status TransferKv(const KvTransferWork& work) override {
    return PoolTransfer(pool_.get(), shape_, stream_.get(), staging_.get()).Run(work);
  }
  absl::StatusOr<std::string> PoolIpcHandle() override;
  absl::Status PullFromPeerPool(const PeerPoolPull& pull) override;
  absl::Status WhenDone(absl::AnyInvocable<void() &&> fn) override {
    return completions_->Add(stream_.get(), std::move(fn));
  }

 private:
  CudaDeviceBackend(const ServerConfig& config, std::string name)
      : name_(std::move(name)),
        debug_fault_layer_(config.debug_fault_layer),
        options_(config.model.Options()) {}

  // Returns the device's free bytes before the pool took its share.
  absl::StatusOr<size_t> CreatePool(const ServerConfig& config, int device);
  uint8_t* PoolAt(int64_t element) const {
    return static_cast<uint8_t*>(pool_.get()) + element * shape_.ElemBytes();
  }
  // Per-token scale pools: float `index` of the scales after the pages.
  float* ScalesAt(int64_t index) const {
    return reinterpret_cast<float*>(static_cast<uint8_t*>(pool_.get()) +
                                    shape_.ScalesByteOffset()) +
           index;
  }
  kernels::cuda::PagedKv Kv(int64_t layer) const {
    return {pool_.get(), shape_, layer, nullptr, staging_->device_scales()};
  }

  absl::StatusOr<LaunchResult> Fault();
  absl::Status CheckPlanned(const AttentionWork& work, const AttentionPlan& plan) const;
  absl::Status RunEager(const AttentionWork& work, const AttentionPlan& plan);
  absl::Status LaunchDecode(const AttentionWork& work, const AttentionPlan& plan);
  absl::Status LaunchPrefill(const AttentionWork& work, const AttentionPlan& plan);
  absl::Status WaitForInputs(const EventSyncWork& sync);
  absl::Status Upload(bool with_indices);
  absl::Status LaunchAppend(const AppendWork& work);
  absl::Status UploadPlan(size_t offset, int64_t ints, absl::string_view what);
  absl::StatusOr<LaunchResult> Finish(const EventSyncWork& sync, absl::string_view what,
                                      LaunchResult result);

  // Constant after construction.
  const std::string name_;
  const int64_t debug_fault_layer_;
  const kernels::AttentionOptions options_;
  kernels::KvCacheShape shape_;
  Stream stream_;
  // KV pulls within one node: both page lists of the pull in flight, on the device and staged.
  DeviceBuffer pull_pages_;
  size_t pull_pages_bytes_ = 0;
  std::vector<int32_t> pull_pages_host_;
  std::unique_ptr<CudaCompletions> completions_;  // after stream_: destroyed before it
  DeviceBuffer pool_;
  std::unique_ptr<KvStaging> staging_;  // fp8 scales, prefill staging, transfer scratch
  std::unique_ptr<Workspaces> workspaces_;
  std::unique_ptr<DecodeGraphs> graphs_;  // after workspaces_, whose buffers they use

  // Mutable state, of the call in progress (calls come from the device's worker, one at a
  // time).
  // What PlanAttention planned, for the Attention call that follows: the plan itself and the
  // batch it was made for.
  std::vector<int32_t> plan_host_;
  AttentionPlan planned_;
  size_t planned_entries_ = 0;
  bool planned_deterministic_ = false;
  GpuBatch batch_;  // the host arrays of the batch being planned or launched
};

absl::StatusOr<std::unique_ptr<DeviceBackend>> CudaDeviceBackend::Create(const ServerConfig& config,
                                                                          int device) {
  cudaDeviceProp prop;
  ATTND_CUDA_RETURN(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  std::unique_ptr<CudaDeviceBackend> b(new CudaDeviceBackend(config, prop.name));
  cudaStream_t stream = nullptr;
  ATTND_CUDA_RETURN(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  b->stream_.reset(stream);
  b->completions_ = std::make_unique<CudaCompletions>(device);
  // Workspaces first, then the pool takes its share of what is left.
  auto workspaces = Workspaces::Create(config, device, stream);
  if (!workspaces.ok()) return workspaces.status();
  b->workspaces_ = *std::move(workspaces);
  b->plan_host_.assign(static_cast<size_t>(b->workspaces_->plan_ints()), 0);
  auto free_bytes = b->CreatePool(config, device);
  if (!free_bytes.ok()) return free_bytes.status();
  auto staging = KvStaging::Create(b->shape_, config.model.kv_scales, stream);
  if (!staging.ok()) return staging.status();
  b->staging_ = *std::move(staging);
  ATTND_CUDA_RETURN(cudaStreamSynchronize(stream), "backend set-up");
  if (config.cuda_graphs && !config.graph_buckets.empty()) {
    const auto start = std::chrono::steady_clock::now();
    auto graphs = DecodeGraphs::Capture(config.graph_buckets, b->Kv(0), b->options_,
                                        *b->workspaces_, stream);
    if (!graphs.ok()) return graphs.status();
    b->graphs_ = *std::move(graphs);
    spdlog::info("device={} graphs={} buckets={}..{} capture_s={:.3f} graph_buffer_bytes={}",
                 device, b->graphs_->size(), config.graph_buckets.front(),
                 config.graph_buckets.back(),
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
                 b->graphs_->bytes());
  }
  spdlog::info("device={} gpu=\"{}\" pool_pages={} pool_bytes={} workspace_bytes={} free_bytes={}",
               device, b->name_, b->shape_.num_pages, b->shape_.TotalBytes(),
               b->workspaces_->bytes(), *free_bytes);
  return std::unique_ptr<DeviceBackend>(std::move(b));
}

absl::StatusOr<size_t> CudaDeviceBackend::CreatePool(const ServerConfig& config, int device) {
  const ModelShape& m = config.model;
  size_t free_bytes = 0, total_bytes = 0;
  ATTND_CUDA_RETURN(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  int64_t num_pages = config.pages_per_device;
  if (num_pages == 0) {
    num_pages = static_cast<int64_t>(config.memory_fraction * static_cast<double>(free_bytes)) /
                m.PageBytes();
  }
  // Page ids are int32 on the device.
  num_pages = std::min<int64_t>(num_pages, (int64_t{1} << 31) - 1);
  if (num_pages < 1) {
    return absl::ResourceExhaustedError(
        absl::StrCat("device ", device, ": no room for one KV page of ", m.PageBytes(), " bytes"));
  }
  shape_ = m.CacheShape(num_pages);
  auto pool = AllocateDevice(static_cast<size_t>(shape_.TotalBytes()), "the KV pool");
  if (!pool.ok()) return pool.status();
  pool_ = *std::move(pool);
  return free_bytes;
}

absl::Status CudaDeviceBackend::CopyPages(absl::Span<const PageCopy> copies) {
  const size_t block = static_cast<size_t>(shape_.PageElems() * shape_.ElemBytes());
  const size_t scales = static_cast<size_t>(shape_.PageScales()) * sizeof(float);
  for (const PageCopy& c : copies) {
    for (int64_t layer = 0; layer < shape_.num_layers; ++layer) {
      ATTND_CUDA_RETURN(cudaMemcpyAsync(PoolAt(shape_.Offset(layer, c.dst, 0, 0, 0)),
                                        PoolAt(shape_.Offset(layer, c.src, 0, 0, 0)), block,
                                        cudaMemcpyDeviceToDevice, stream_.get()),
                        "copy-on-write page copy");
      if (scales == 0) continue;
      ATTND_CUDA_RETURN(cudaMemcpyAsync(ScalesAt(shape_.ScaleOffset(layer, c.dst, 0, 0, 0)),
                                        ScalesAt(shape_.ScaleOffset(layer, c.src, 0, 0, 0)),
                                        scales, cudaMemcpyDeviceToDevice, stream_.get()),
                        "copy-on-write page scales copy");
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<LaunchResult> CudaDeviceBackend::Append(const AppendWork& work) {
  BuildGpuBatch(work.entries, shape_.page_size, &batch_);
  if (absl::Status s = WaitForInputs(work.sync); !s.ok()) return s;
  if (absl::Status s = Upload(/*with_indices=*/false); !s.ok()) return s;
  if (absl::Status s = LaunchAppend(work); !s.ok()) return s;
  return Finish(work.sync, "append", LaunchResult{});
}

// The one place that chooses the kernels of a batch, and plans it once, into plan_host_.
absl::StatusOr<AttentionPlan> CudaDeviceBackend::PlanAttention(const AttentionBatch& batch) {
  const size_t n = batch.starts.size();
  const bool one_token_each = std::all_of(batch.num_new.begin(), batch.num_new.end(),
                                          [](int64_t num_new) { return num_new == 1; });
  // A deterministic Prefill call takes the prefill kernel even when every item is one token,
  // so that an item's bits do not depend on whether a longer chunk shares its call (the
  // decode kernel sums in another order).
  const bool decode = one_token_each && (batch.decode || !batch.deterministic);
  AttentionPlan plan;
  std::string error;
  bool fits = false;
  if (decode) {
    plan.graph_bucket = graphs_ == nullptr ? 0 : graphs_->BucketFor(n, batch.deterministic);
    plan.kernel = plan.graph_bucket > 0 ? AttentionKernel::kDecodeGraph : AttentionKernel::kDecode;
    // A graph runs its whole bucket: the padded entries have no keys.
    const size_t rows = std::max(n, static_cast<size_t>(plan.graph_bucket));
    BuildBatchShape(batch.starts, batch.num_new, shape_.page_size, rows, &batch_);
    const kernels::DecodePlanConfig& cfg = workspaces_->decode_config(batch.deterministic);
    const int entries = static_cast<int>(rows);
    fits = kernels::PlanDecode(batch_.kv_len.data(), batch_.kv_indptr.data(), entries,
                               kernels::DecodeGridX(entries, cfg), cfg,
                               workspaces_->decode_layout(), plan_host_.data(), &plan.plan_ints,
                               &error);
  } else {
    plan.kernel = AttentionKernel::kPrefill;
    BuildBatchShape(batch.starts, batch.num_new, shape_.page_size, n, &batch_);
    fits = kernels::PlanPrefill(batch_.qo_indptr.data(), batch_.kv_len.data(),
                                batch_.kv_indptr.data(), static_cast<int>(n),
                                workspaces_->prefill_config(batch.deterministic),
                                workspaces_->prefill_layout(), plan_host_.data(), &error);
    if (fits) {
      plan.num_items = plan_host_[0];
      plan.num_merges = plan_host_[1];
      plan.plan_ints = workspaces_->prefill_layout().HeadAndItemsInts(plan.num_items);
    }
  }
  if (!fits) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "items: the batch does not fit the GPU workspace (", error,
        "); split it into smaller requests or raise --cuda_workspace_mb"));
  }
  planned_ = plan;
  planned_entries_ = n;
  planned_deterministic_ = batch.deterministic;
  return plan;
}

absl::StatusOr<LaunchResult> CudaDeviceBackend::Attention(const AttentionWork& work,
                                                          const AttentionPlan& plan) {
  if (work.append.layer == debug_fault_layer_) return Fault();
  if (absl::Status s = CheckPlanned(work, plan); !s.ok()) return s;
  LaunchResult result;
  result.kernel = plan.kernel;
  result.graph_bucket = plan.graph_bucket;
  switch (plan.kernel) {
    case AttentionKernel::kDecodeGraph:
      if (graphs_ == nullptr) break;
      if (absl::Status s = graphs_->Replay(
              plan.graph_bucket, work,
              absl::MakeConstSpan(plan_host_.data(), static_cast<size_t>(plan.plan_ints)));
          !s.ok())
        return s;
      return Finish(work.append.sync, "decode graph", result);
    case AttentionKernel::kDecode:
    case AttentionKernel::kPrefill:
      if (absl::Status s = RunEager(work, plan); !s.ok()) return s;
      return Finish(work.append.sync, "attention", result);
    case AttentionKernel::kHost:
      break;
  }
  return absl::InternalError("attention: the batch was not planned by the CUDA backend");
}

absl::StatusOr<LaunchResult> CudaDeviceBackend::Fault() {
  spdlog::warn("device={} --debug_fault_layer={}: faulting the device on purpose", name_,
               debug_fault_layer_);
  absl::Status s = Annotate(kernels::cuda::LaunchFaultingKernel(stream_.get()), "faulting kernel");
  if (s.ok()) s = Check(cudaStreamSynchronize(stream_.get()), "faulting kernel");
  if (!s.ok()) return s;
  return LaunchResult{std::chrono::steady_clock::now()};
}

// A plan covers the batch it was made from: a launch of other work would make the kernels read
// page ids that were never uploaded. The engine plans and launches the same prepared batch
// back to back, so only what is cheap to compare is checked here (no per-entry copy on the
// per-call path).
absl::Status CudaDeviceBackend::CheckPlanned(const AttentionWork& work,
                                             const AttentionPlan& plan) const {
  const size_t entries = work.append.entries.size();
  const bool same = plan.kernel == planned_.kernel &&
                    plan.graph_bucket == planned_.graph_bucket &&
                    plan.plan_ints == planned_.plan_ints && plan.num_items == planned_.num_items &&
                    plan.num_merges == planned_.num_merges && entries == planned_entries_ &&
                    work.deterministic == planned_deterministic_;
  if (same) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("attention: the batch of ", entries,
                                          " entries is not the one planned (", planned_entries_,
                                          " entries)"));
}

absl::Status CudaDeviceBackend::RunEager(const AttentionWork& work, const AttentionPlan& plan) {
  BuildGpuBatch(work.append.entries, shape_.page_size, &batch_);
  if (absl::Status s = WaitForInputs(work.append.sync); !s.ok()) return s;
  if (absl::Status s = Upload(/*with_indices=*/true); !s.ok()) return s;
  if (absl::Status s = LaunchAppend(work.append); !s.ok()) return s;
  return plan.kernel == AttentionKernel::kDecode ? LaunchDecode(work, plan)
                                                 : LaunchPrefill(work, plan);
}

absl::Status CudaDeviceBackend::LaunchDecode(const AttentionWork& work,
                                             const AttentionPlan& plan) {
  if (absl::Status s = UploadPlan(0, plan.plan_ints, "upload decode plan"); !s.ok()) return s;
  const kernels::cuda::DecodeArgs a = workspaces_->DecodeArgs(
      Kv(work.append.layer), options_, static_cast<int>(work.append.entries.size()),
      work.deterministic, work.q, work.out, work.lse);
  return Annotate(kernels::cuda::LaunchBatchDecode(a, stream_.get()), "decode kernel");
}

absl::Status CudaDeviceBackend::LaunchPrefill(const AttentionWork& work,
                                              const AttentionPlan& plan) {
  // The header and items, then the merges, which sit at the end of the layout.
  if (absl::Status s = UploadPlan(0, plan.plan_ints, "upload prefill plan"); !s.ok()) return s;
  if (plan.num_merges > 0) {
    const kernels::PrefillPlanLayout& layout = workspaces_->prefill_layout();
    if (absl::Status s = UploadPlan(static_cast<size_t>(layout.MergesOffset()),
                                    layout.MergeInts(plan.num_merges),
                                    "upload prefill merges");
        !s.ok())
      return s;
  }
  kernels::cuda::PrefillArgs a =
      workspaces_->PrefillArgs(Kv(work.append.layer), options_, work.q, work.out, work.lse,
                               plan.num_items, plan.num_merges);
  const int64_t group = options_.num_qo_heads / shape_.num_kv_heads;
  a.wide_items = false;
  for (size_t i = 0; i + 1 < batch_.qo_indptr.size(); ++i) {
    const int64_t rows = (batch_.qo_indptr[i + 1] - batch_.qo_indptr[i]) * group;
    a.wide_items = a.wide_items || rows > kernels::kPrefillDecodeRows;
  }
  if (shape_.Fp8()) {
    // The prefill kernels read 16-bit K/V: the batch's pages, dequantized after the append.
    auto staged = staging_->StagePages(a.kv, a.kv_indices,
                                       static_cast<int64_t>(batch_.kv_indices.size()));
    if (!staged.ok()) return Annotate(staged.status(), "fp8 prefill staging");
    a.kv = *staged;
    a.kv_indices = staging_->identity();
  }
  return Annotate(kernels::cuda::LaunchBatchPrefill(a, stream_.get()), "prefill kernel");
}

absl::Status CudaDeviceBackend::WaitForInputs(const EventSyncWork& sync) {
  if (sync.wait == nullptr) return absl::OkStatus();
  return Check(cudaStreamWaitEvent(stream_.get(), static_cast<cudaEvent_t>(sync.wait), 0),
               "wait on the client's event");
}

// Copies the slot mapping (and for attention the page table) to the device.
absl::Status CudaDeviceBackend::Upload(bool with_indices) {
  ATTND_CUDA_RETURN(cudaMemcpyAsync(workspaces_->slots(), batch_.slot_mapping.data(),
                                    batch_.slot_mapping.size() * sizeof(int64_t),
                                    cudaMemcpyHostToDevice, stream_.get()),
                    "upload slot mapping");
  if (with_indices) {
    ATTND_CUDA_RETURN(cudaMemcpyAsync(workspaces_->indices(), batch_.kv_indices.data(),
                                      batch_.kv_indices.size() * sizeof(int32_t),
                                      cudaMemcpyHostToDevice, stream_.get()),
                      "upload page table");
  }
  return absl::OkStatus();
}

// From pageable memory: the copy has read plan_host_ when it returns, so the next plan may
// overwrite it at once.
absl::Status CudaDeviceBackend::UploadPlan(size_t offset, int64_t ints, absl::string_view what) {
  return Check(cudaMemcpyAsync(workspaces_->plan() + offset, plan_host_.data() + offset,
                               static_cast<size_t>(ints) * sizeof(int32_t),
                               cudaMemcpyHostToDevice, stream_.get()),
               what);
}

absl::Status CudaDeviceBackend::LaunchAppend(const AppendWork& work) {
  kernels::cuda::AppendArgs a;
  a.kv = Kv(work.layer);
  a.k = work.k_new;
  a.v = work.v_new;
  a.k_token_stride = a.v_token_stride = shape_.num_kv_heads * shape_.head_dim;
  a.slot_mapping = workspaces_->slots();
  a.num_tokens = static_cast<int64_t>(batch_.slot_mapping.size());
  return Annotate(kernels::cuda::LaunchAppendKv(a, stream_.get()), "append kernel");
}

// With a signal event: record it and return at once (the client's stream waits on it);
// without: return once the outputs are written. Stamps `enqueued` before any wait, so the
// request's host work and its wait for the GPU are timed apart. The wait is
// cudaStreamSynchronize under the default schedule (spin while this process has no more
// contexts than cores), so seeing the GPU finish costs no thread wake-up.
absl::StatusOr<LaunchResult> CudaDeviceBackend::Finish(const EventSyncWork& sync,
                                                       absl::string_view what,
                                                       LaunchResult result) {
  result.enqueued = std::chrono::steady_clock::now();
  if (sync.signal != nullptr) {
    ATTND_CUDA_RETURN(cudaEventRecord(static_cast<cudaEvent_t>(sync.signal), stream_.get()),
                      "record the client's event");
    return result;
  }
  ATTND_CUDA_RETURN(cudaStreamSynchronize(stream_.get()), what);
  return result;
}

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceBackend>> CreateCudaDeviceBackend(const ServerConfig& config,
                                                                        int device) {
  return CudaDeviceBackend::Create(config, device);
}

absl::StatusOr<std::string> CudaDeviceBackend::PoolIpcHandle() {
  cudaIpcMemHandle_t handle;
  if (absl::Status s = Check(cudaIpcGetMemHandle(&handle, pool_.get()), "pool IPC handle");
      !s.ok())
    return s;
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

absl::Status CudaDeviceBackend::PullFromPeerPool(const PeerPoolPull& pull) {
  const kernels::KvCacheShape& src = pull.src_shape;
  const int64_t pages = (pull.num_tokens + shape_.page_size - 1) / shape_.page_size;
  if (static_cast<int64_t>(pull.src_pages.size()) < pages ||
      static_cast<int64_t>(pull.dst_pages.size()) < pages)
    return absl::InvalidArgumentError("src_pages, dst_pages: fewer than the pull's pages");
  for (int64_t i = 0; i < pages; ++i) {
    if (pull.src_pages[i] < 0 || pull.src_pages[i] >= src.num_pages ||
        pull.dst_pages[i] < 0 || pull.dst_pages[i] >= shape_.num_pages)
      return absl::InvalidArgumentError(absl::StrCat("pages[", i, "]: outside a pool"));
  }
  // Both page lists go up in one copy, into a buffer kept for pulls.
  const size_t list_bytes = 2 * static_cast<size_t>(pages) * sizeof(int32_t);
  if (pull_pages_bytes_ < list_bytes) {
    auto grown = AllocateDevice(list_bytes, "pull page lists");
    if (!grown.ok()) return grown.status();
    pull_pages_ = *std::move(grown);
    pull_pages_bytes_ = list_bytes;
  }
  pull_pages_host_.assign(pull.src_pages.begin(), pull.src_pages.begin() + pages);
  pull_pages_host_.insert(pull_pages_host_.end(), pull.dst_pages.begin(),
                          pull.dst_pages.begin() + pages);
  // Pageable memory: the call returns once the lists are staged, so the vector may change.
  if (absl::Status s = Check(cudaMemcpyAsync(pull_pages_.get(), pull_pages_host_.data(),
                                             list_bytes, cudaMemcpyHostToDevice, stream_.get()),
                             "pull page lists upload");
      !s.ok())
    return s;
  kernels::cuda::PagedPullParams p;
  p.src = pull.src;
  p.dst = static_cast<uint8_t*>(pool_.get());
  p.src_pages = static_cast<const int32_t*>(pull_pages_.get());
  p.dst_pages = p.src_pages + pages;
  p.src_pool_pages = src.num_pages;
  p.dst_pool_pages = shape_.num_pages;
  p.src_heads = src.num_kv_heads;
  p.dst_heads = pull.head_end - pull.head_begin;
  p.head_begin = pull.head_begin;
  p.layer_begin = pull.layer_begin;
  p.layer_end = pull.layer_end;
  p.dst_layer_begin = pull.dst_layer_begin;
  p.num_tokens = pull.num_tokens;
  p.page_size = shape_.page_size;
  p.head_dim = shape_.head_dim;
  p.elem_bytes = shape_.ElemBytes();
  p.hnd = shape_.layout == kernels::KvLayout::kHND;
  if (shape_.TokenScales() && src.TokenScales()) {
    p.src_scales_offset = src.ScalesByteOffset();
    p.dst_scales_offset = shape_.ScalesByteOffset();
  }
  return kernels::cuda::LaunchPagedPull(p, stream_.get());
}

}  // namespace attnd
