#include "server/cuda_backend.h"

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/attention_cuda.h"
#include "server/cuda_completions.h"
#include "server/gpu_batch.h"
#include "spdlog/spdlog.h"

namespace attnd {
namespace {

absl::Status Check(cudaError_t e, absl::string_view what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

#define ATTND_CUDA_RETURN(expr, what)                                   \
  do {                                                                  \
    if (absl::Status s_ = Check((expr), (what)); !s_.ok()) return s_;   \
  } while (0)

struct DeviceFree {
  void operator()(void* p) const { cudaFree(p); }
};
using DeviceBuffer = std::unique_ptr<void, DeviceFree>;
struct PinnedFree {
  void operator()(void* p) const { cudaFreeHost(p); }
};
using PinnedBuffer = std::unique_ptr<void, PinnedFree>;
struct StreamDestroy {
  void operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
};
using Stream = std::unique_ptr<CUstream_st, StreamDestroy>;

absl::StatusOr<DeviceBuffer> AllocateDevice(size_t bytes, absl::string_view what) {
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 256));
  if (e != cudaSuccess)
    return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", bytes,
                                                     " bytes of device memory for ", what, ": ",
                                                     cudaGetErrorString(e)));
  return DeviceBuffer(p);
}

// Everything one launch uploads, packed in one pinned buffer and copied with one call each.
struct Staging {
  PinnedBuffer host;
  size_t bytes = 0;
};

class CudaDeviceBackend final : public DeviceBackend {
 public:
  static absl::StatusOr<std::unique_ptr<DeviceBackend>> Create(const ServerConfig& config,
                                                               int device);
  ~CudaDeviceBackend() override {
    for (DecodeGraph& g : graphs_) cudaGraphExecDestroy(g.exec);
  }

  std::string name() const override { return name_; }
  int64_t num_pages() const override { return shape_.num_pages; }
  int64_t pool_bytes() const override { return shape_.TotalBytes(); }

  absl::Status CopyPages(absl::Span<const PageCopy> copies) override {
    const size_t block = static_cast<size_t>(shape_.PageElems()) * kernels::DTypeSize(shape_.dtype);
    for (const PageCopy& c : copies) {
      for (int64_t layer = 0; layer < shape_.num_layers; ++layer) {
        ATTND_CUDA_RETURN(cudaMemcpyAsync(PoolAt(shape_.Offset(layer, c.dst, 0, 0, 0)),
                                          PoolAt(shape_.Offset(layer, c.src, 0, 0, 0)), block,
                                          cudaMemcpyDeviceToDevice, stream_.get()),
                          "copy-on-write page copy");
      }
    }
    return absl::OkStatus();
  }

  absl::Status Append(const AppendWork& work) override {
    BuildGpuBatch(work.entries, shape_.page_size, &batch_);
    if (absl::Status s = WaitForInputs(work.sync); !s.ok()) return s;
    if (absl::Status s = Upload(/*with_indices=*/false); !s.ok()) return s;
    if (absl::Status s = LaunchAppend(work); !s.ok()) return s;
    return Finish(work.sync, "append", &work.enqueued);
  }

  absl::Status Attention(const AttentionWork& work) override {
    if (work.append.layer == debug_fault_layer_) {
      spdlog::warn("device={} --debug_fault_layer={}: faulting the device on purpose",
                   name_, debug_fault_layer_);
      ATTND_CUDA_RETURN(kernels::cuda::LaunchFaultingKernel(stream_.get()), "faulting kernel");
      return Check(cudaStreamSynchronize(stream_.get()), "faulting kernel");
    }
    const auto& entries = work.append.entries;
    // A deterministic Prefill call takes the prefill kernel even when every item is one token,
    // so that an item's bits do not depend on whether a longer chunk shares its call (the
    // decode kernel sums in another order).
    const bool decode_kernel =
        (work.decode || !work.deterministic) &&
        std::all_of(entries.begin(), entries.end(),
                    [](const BatchEntry& e) { return e.num_new == 1; });
    if (const DecodeGraph* graph = decode_kernel ? GraphFor(static_cast<int>(entries.size()),
                                                            work.deterministic)
                                                 : nullptr) {
      // The previous replay's first node must have copied the pinned block before the page ids
      // and slots go straight into it.
      ATTND_CUDA_RETURN(cudaEventSynchronize(args_uploaded_.get()), "graph arguments");
      // The layers of a step, and most steps, see the page tables of the call before: the ids
      // already on the device are kept (no host copy, no upload).
      const bool same_tables = SameTablesAsLastGraphCall(work.append);
      BuildGpuBatch(entries, shape_.page_size, &batch_, HostArg<int32_t>(args_.indices),
                    HostArg<int64_t>(args_.slots), same_tables);
      if (absl::Status s = WaitForInputs(work.append.sync); !s.ok()) return s;
      work.graph_bucket = graph->bucket;
      if (absl::Status s = ReplayDecode(*graph, work, /*upload_indices=*/!same_tables); !s.ok())
        return s;
      return Finish(work.append.sync, "decode graph", &work.enqueued);
    }
    BuildGpuBatch(entries, shape_.page_size, &batch_);
    batch_.all_single_token = batch_.all_single_token && decode_kernel;
    if (absl::Status s = WaitForInputs(work.append.sync); !s.ok()) return s;
    work.graph_bucket = 0;
    if (absl::Status s = Upload(/*with_indices=*/true); !s.ok()) return s;
    if (absl::Status s = LaunchAppend(work.append); !s.ok()) return s;
    absl::Status s = batch_.all_single_token ? Decode(work) : Prefill(work);
    if (!s.ok()) return s;
    return Finish(work.append.sync, "attention", &work.enqueued);
  }

  absl::Status WhenDone(absl::AnyInvocable<void() &&> fn) override {
    return completions_->Add(stream_.get(), std::move(fn));
  }

  absl::Status CheckAttentionFits(absl::Span<const int64_t> starts,
                                  absl::Span<const int64_t> num_new,
                                  bool deterministic) override {
    // A non-deterministic decode batch always fits: its plan has at most one item per grid
    // column, and max_items covers the grid of the largest batch (Create). Skipping the trial
    // plan keeps it (and its vectors) off every decode step's path.
    if (!deterministic &&
        std::all_of(num_new.begin(), num_new.end(), [](int64_t n) { return n == 1; }))
      return absl::OkStatus();
    GpuBatch shape;
    shape.qo_indptr.assign(1, 0);
    shape.kv_indptr.assign(1, 0);
    bool decode = true;
    for (size_t i = 0; i < starts.size(); ++i) {
      const int64_t len = starts[i] + num_new[i];
      shape.kv_len.push_back(static_cast<int32_t>(len));
      shape.qo_indptr.push_back(shape.qo_indptr.back() + static_cast<int32_t>(num_new[i]));
      shape.kv_indptr.push_back(shape.kv_indptr.back() +
                                static_cast<int32_t>((len + shape_.page_size - 1) / shape_.page_size));
      decode = decode && num_new[i] == 1;
    }
    shape.all_single_token = decode;
    std::string error;
    if (Plan(shape, deterministic, &error)) return absl::OkStatus();
    return absl::ResourceExhaustedError(absl::StrCat(
        "items: the batch does not fit the GPU workspace (", error,
        "); split it into smaller requests or raise --cuda_workspace_mb"));
  }

  absl::Status TransferKv(const KvTransferWork& w) override {
    const size_t es = kernels::DTypeSize(shape_.dtype);
    const int64_t heads = w.head_end - w.head_begin;
    const size_t buffer_row = static_cast<size_t>(heads * shape_.head_dim) * es;
    auto* buffer = static_cast<uint8_t*>(w.buffer);
    const cudaMemcpyKind kind = cudaMemcpyDefault;  // UVA: the buffer may be host or device
    size_t cursor = 0;
    for (int64_t layer = w.layer_begin; layer < w.layer_end; ++layer) {
      for (int kv = 0; kv < 2; ++kv) {
        for (int64_t t0 = 0; t0 < w.num_tokens; t0 += shape_.page_size) {
          const int32_t page = w.page_table[static_cast<size_t>(t0 / shape_.page_size)];
          const int64_t rows = std::min(shape_.page_size, w.num_tokens - t0);
          uint8_t* buf = buffer + cursor + static_cast<size_t>(t0) * buffer_row;
          if (shape_.layout == kernels::KvLayout::kNHD) {
            // Rows of the page are tokens; the head range of a row is contiguous.
            uint8_t* pool = PoolAt(shape_.Offset(layer, page, kv, 0, w.head_begin));
            const size_t pool_row = static_cast<size_t>(shape_.num_kv_heads * shape_.head_dim) * es;
            ATTND_CUDA_RETURN(w.to_pool ? cudaMemcpy2DAsync(pool, pool_row, buf, buffer_row,
                                                            buffer_row, rows, kind, stream_.get())
                                        : cudaMemcpy2DAsync(buf, buffer_row, pool, pool_row,
                                                            buffer_row, rows, kind, stream_.get()),
                              "KV transfer");
          } else {
            // Each head's slots are contiguous rows of head_dim.
            const size_t head_row = static_cast<size_t>(shape_.head_dim) * es;
            for (int64_t h = 0; h < heads; ++h) {
              uint8_t* pool = PoolAt(shape_.Offset(layer, page, kv, 0, w.head_begin + h));
              uint8_t* b = buf + static_cast<size_t>(h) * head_row;
              ATTND_CUDA_RETURN(w.to_pool ? cudaMemcpy2DAsync(pool, head_row, b, buffer_row,
                                                              head_row, rows, kind, stream_.get())
                                          : cudaMemcpy2DAsync(b, buffer_row, pool, head_row,
                                                              head_row, rows, kind, stream_.get()),
                                "KV transfer");
            }
          }
        }
        cursor += static_cast<size_t>(w.num_tokens) * buffer_row;
      }
    }
    return Check(cudaStreamSynchronize(stream_.get()), "KV transfer");
  }

 private:
  CudaDeviceBackend() = default;

  uint8_t* PoolAt(int64_t element) const {
    return static_cast<uint8_t*>(pool_.get()) +
           element * static_cast<int64_t>(kernels::DTypeSize(shape_.dtype));
  }

  kernels::cuda::PagedKv Kv(int64_t layer) const { return {pool_.get(), shape_, layer}; }

  absl::Status WaitForInputs(const EventSyncWork& sync) {
    if (sync.wait == nullptr) return absl::OkStatus();
    return Check(cudaStreamWaitEvent(stream_.get(), static_cast<cudaEvent_t>(sync.wait), 0),
                 "wait on the client's event");
  }

  // With a signal event: record it and return at once (the client's stream waits on it);
  // without: return once the outputs are written. Stamps `enqueued` before any wait, so the
  // request's host work and its wait for the GPU are timed apart. The wait is
  // cudaStreamSynchronize under the default schedule (spin while this process has no more
  // contexts than cores), so seeing the GPU finish costs no thread wake-up.
  absl::Status Finish(const EventSyncWork& sync, absl::string_view what,
                      std::chrono::steady_clock::time_point* enqueued) {
    *enqueued = std::chrono::steady_clock::now();
    if (sync.signal != nullptr)
      return Check(cudaEventRecord(static_cast<cudaEvent_t>(sync.signal), stream_.get()),
                   "record the client's event");
    return Check(cudaStreamSynchronize(stream_.get()), what);
  }

  // Copies the slot mapping (and for attention the page table) to the device.
  absl::Status Upload(bool with_indices) {
    const size_t slots = batch_.slot_mapping.size() * sizeof(int64_t);
    ATTND_CUDA_RETURN(cudaMemcpyAsync(slots_.get(), batch_.slot_mapping.data(), slots,
                                      cudaMemcpyHostToDevice, stream_.get()),
                      "upload slot mapping");
    if (with_indices) {
      ATTND_CUDA_RETURN(cudaMemcpyAsync(indices_.get(), batch_.kv_indices.data(),
                                        batch_.kv_indices.size() * sizeof(int32_t),
                                        cudaMemcpyHostToDevice, stream_.get()),
                        "upload page table");
    }
    return absl::OkStatus();
  }

  absl::Status LaunchAppend(const AppendWork& work) {
    kernels::cuda::AppendArgs a;
    a.kv = Kv(work.layer);
    a.k = work.k_new;
    a.v = work.v_new;
    a.k_token_stride = a.v_token_stride = shape_.num_kv_heads * shape_.head_dim;
    a.slot_mapping = static_cast<const int64_t*>(slots_.get());
    a.num_tokens = static_cast<int64_t>(batch_.slot_mapping.size());
    return Check(kernels::cuda::LaunchAppendKv(a, stream_.get()), "append kernel");
  }

  // Plans `b` into plan_host_ (decode when every request brings one token, else prefill).
  bool Plan(const GpuBatch& b, bool deterministic, std::string* error,
            int32_t* out = nullptr) {
    if (out == nullptr) out = plan_host_.data();
    const int batch = static_cast<int>(b.kv_len.size());
    if (b.all_single_token) {
      const kernels::DecodePlanConfig& cfg = deterministic ? decode_det_ : decode_cfg_;
      const DecodeGraph* graph = GraphFor(batch, deterministic);
      if (graph != nullptr) {
        // The graph runs the whole bucket: padded entries have no keys.
        padded_len_.assign(b.kv_len.begin(), b.kv_len.end());
        padded_len_.resize(static_cast<size_t>(graph->bucket), 0);
        padded_indptr_.assign(b.kv_indptr.begin(), b.kv_indptr.end());
        padded_indptr_.resize(static_cast<size_t>(graph->bucket) + 1, b.kv_indptr.back());
        return kernels::PlanDecode(padded_len_.data(), padded_indptr_.data(), graph->bucket,
                                   kernels::DecodeGridX(graph->bucket, cfg), cfg, decode_layout_,
                                   out, &decode_plan_ints_, error);
      }
      return kernels::PlanDecode(b.kv_len.data(), b.kv_indptr.data(), batch,
                                 kernels::DecodeGridX(batch, cfg), cfg, decode_layout_,
                                 out, &decode_plan_ints_, error);
    }
    return kernels::PlanPrefill(b.qo_indptr.data(), b.kv_len.data(), b.kv_indptr.data(), batch,
                                deterministic ? prefill_det_ : prefill_cfg_, prefill_layout_,
                                out, error);
  }

  absl::Status Decode(const AttentionWork& work) {
    const int batch = static_cast<int>(batch_.kv_len.size());
    std::string error;
    if (!Plan(batch_, work.deterministic, &error))
      return absl::InternalError(absl::StrCat("decode plan: ", error));
    const int64_t used = decode_plan_ints_;
    ATTND_CUDA_RETURN(cudaMemcpyAsync(plan_.get(), plan_host_.data(), used * sizeof(int32_t),
                                      cudaMemcpyHostToDevice, stream_.get()),
                      "upload decode plan");
    const kernels::cuda::DecodeArgs a =
        MakeDecodeArgs(batch, work.deterministic, Kv(work.append.layer), work.q, work.out, work.lse);
    return Check(kernels::cuda::LaunchBatchDecode(a, stream_.get()), "decode kernel");
  }

  absl::Status Prefill(const AttentionWork& work) {
    std::string error;
    if (!Plan(batch_, work.deterministic, &error))
      return absl::InternalError(absl::StrCat("prefill plan: ", error));
    const int64_t num_items = plan_host_[0];
    const int64_t num_merges = plan_host_[1];
    const int64_t head_ints = prefill_layout_.ItemsOffset() + kernels::kPrefillItemInts * num_items;
    ATTND_CUDA_RETURN(cudaMemcpyAsync(plan_.get(), plan_host_.data(), head_ints * sizeof(int32_t),
                                      cudaMemcpyHostToDevice, stream_.get()),
                      "upload prefill plan");
    if (num_merges > 0) {
      const int64_t at = prefill_layout_.MergesOffset();
      ATTND_CUDA_RETURN(
          cudaMemcpyAsync(static_cast<int32_t*>(plan_.get()) + at, plan_host_.data() + at,
                          kernels::kPrefillMergeInts * num_merges * sizeof(int32_t),
                          cudaMemcpyHostToDevice, stream_.get()),
          "upload prefill merges");
    }
    const int64_t row = num_qo_heads_ * shape_.head_dim;
    kernels::cuda::PrefillArgs a;
    a.kv = Kv(work.append.layer);
    a.opts = options_;
    a.causal = true;
    a.q = work.q;
    a.q_stride_n = row;
    a.q_stride_h = shape_.head_dim;
    a.out = work.out;
    a.out_stride_n = row;
    a.out_stride_h = shape_.head_dim;
    a.lse = work.lse;
    a.kv_indices = static_cast<const int32_t*>(indices_.get());
    a.ws.plan = static_cast<const int32_t*>(plan_.get());
    a.ws.layout = prefill_layout_;
    a.ws.grid_y = static_cast<int>(std::min<int64_t>(std::max<int64_t>(num_items, 1), 65535));
    a.ws.partial_out = static_cast<float*>(prefill_partial_out_.get());
    a.ws.partial_lse = static_cast<float*>(prefill_partial_lse_.get());
    a.may_merge = num_merges > 0;
    return Check(kernels::cuda::LaunchBatchPrefill(a, stream_.get()), "prefill kernel");
  }

  // One captured append + decode per (batch bucket, mode). Inputs and outputs go through the
  // graph's own buffers (the client's differ per call); the layer, the slot mapping, the page
  // table and the plan are read from fixed device buffers, so one graph serves every layer and
  // any lengths.
  struct DecodeGraph {
    int bucket = 0;
    bool deterministic = false;
    cudaGraphExec_t exec = nullptr;
    DeviceBuffer q, k, v, out, lse;
  };

  // Whether the graph arguments already hold this call's page ids: the pool's table epoch is
  // known and unchanged, and the batch lists the same tables (address and page count) in the
  // same order as the last graph call. Remembers this call's tables for the next.
  bool SameTablesAsLastGraphCall(const AppendWork& work) {
    const int64_t page = shape_.page_size;
    bool same = work.table_epoch != 0 && work.table_epoch == last_epoch_ &&
                work.entries.size() == last_tables_.size();
    for (size_t i = 0; same && i < work.entries.size(); ++i) {
      const BatchEntry& e = work.entries[i];
      same = last_tables_[i] == std::pair{e.page_table.data(), (e.start + e.num_new + page - 1) / page};
    }
    if (!same) {
      last_epoch_ = work.table_epoch;
      last_tables_.clear();
      for (const BatchEntry& e : work.entries)
        last_tables_.emplace_back(e.page_table.data(), (e.start + e.num_new + page - 1) / page);
    }
    return same;
  }

  const DecodeGraph* GraphFor(int batch, bool deterministic) const {
    for (const DecodeGraph& g : graphs_) {
      if (g.deterministic == deterministic && g.bucket >= batch) return &g;
    }
    return nullptr;
  }

  // Eager launches and every graph share these arguments, so both compute the same bits.
  kernels::cuda::DecodeArgs MakeDecodeArgs(int batch, bool deterministic,
                                           const kernels::cuda::PagedKv& kv, const void* q,
                                           void* out, float* lse) const {
    const kernels::DecodePlanConfig& cfg = deterministic ? decode_det_ : decode_cfg_;
    const int64_t row = num_qo_heads_ * shape_.head_dim;
    kernels::cuda::DecodeArgs a;
    a.kv = kv;
    a.opts = options_;
    a.batch = batch;
    a.q = q;
    a.q_stride_b = row;
    a.q_stride_h = shape_.head_dim;
    a.out = out;
    a.out_stride_b = row;
    a.out_stride_h = shape_.head_dim;
    a.lse = lse;
    a.kv_indices = static_cast<const int32_t*>(indices_.get());
    a.ws.plan = static_cast<const int32_t*>(plan_.get());
    a.ws.layout = decode_layout_;
    a.ws.grid_x = kernels::DecodeGridX(batch, cfg);
    a.ws.partial_out = static_cast<float*>(decode_partial_out_.get());
    a.ws.partial_lse = static_cast<float*>(decode_partial_lse_.get());
    a.ws.counters = static_cast<int*>(counters_.get());
    a.deterministic = deterministic;
    return a;
  }

  kernels::cuda::DecodeArgs GraphDecodeArgs(const DecodeGraph& g) const {
    kernels::cuda::DecodeArgs a = MakeDecodeArgs(
        g.bucket, g.deterministic, {pool_.get(), shape_, 0, GraphArg<int32_t>(kLayerOffset)},
        g.q.get(), g.out.get(), static_cast<float*>(g.lse.get()));
    a.ws.plan = GraphArg<int32_t>(args_.plan);
    a.kv_indices = GraphArg<int32_t>(args_.indices);
    return a;
  }

  // One block of per-call arguments every graph reads, uploaded from pinned memory in two
  // copies: [layer][copies in (q, k, v) and out (out, lse)][slot mapping][plan] ... [page table].
  static constexpr size_t kLayerOffset = 0;
  static constexpr size_t kRangesOffset = 4;  // 3 x uint32: what the graph's first node copies
  static constexpr size_t kCopiesOffset = 16;
  struct GraphArgsLayout {
    size_t slots = 0, plan = 0, indices = 0, bytes = 0;
  };
  template <typename T>
  T* GraphArg(size_t offset) const {
    return reinterpret_cast<T*>(static_cast<uint8_t*>(args_dev_.get()) + offset);
  }
  template <typename T>
  T* HostArg(size_t offset) const {
    return reinterpret_cast<T*>(static_cast<uint8_t*>(args_host_.get()) + offset);
  }

  // Captures every bucket's graph, on the device's worker at start-up.
  absl::Status CaptureGraphs(const std::vector<int64_t>& buckets) {
    const size_t es = kernels::DTypeSize(shape_.dtype);
    const size_t q_row = static_cast<size_t>(num_qo_heads_ * shape_.head_dim) * es;
    const size_t kv_row = static_cast<size_t>(shape_.num_kv_heads * shape_.head_dim) * es;
    const int64_t max_bucket = buckets.back();
    args_.slots = 256;
    args_.plan = (args_.slots + static_cast<size_t>(max_bucket) * 8 + 255) / 256 * 256;
    args_.indices =
        (args_.plan + static_cast<size_t>(decode_layout_.TotalInts()) * 4 + 255) / 256 * 256;
    args_.bytes = args_.indices + static_cast<size_t>(max_bucket * max_pages_per_seq_) * 4;
    if (args_.bytes > UINT32_MAX)  // the in-graph copy's ranges are 32-bit
      return absl::InvalidArgumentError(absl::StrCat(
          "graph arguments of ", args_.bytes, " bytes: lower --max_seq_len or the largest bucket"));
    auto dev = AllocateDevice(args_.bytes, "graph arguments");
    if (!dev.ok()) return dev.status();
    args_dev_ = *std::move(dev);
    void* host = nullptr;
    ATTND_CUDA_RETURN(cudaMallocHost(&host, args_.bytes), "pinned graph arguments");
    args_host_.reset(host);
    std::memset(host, 0, args_.bytes);
    for (int64_t i = 0; i < max_bucket; ++i) HostArg<int64_t>(args_.slots)[i] = -1;
    cudaEvent_t uploaded = nullptr;
    ATTND_CUDA_RETURN(cudaEventCreateWithFlags(&uploaded, cudaEventDisableTiming), "event");
    args_uploaded_.reset(uploaded);
    graph_bytes_ += args_.bytes;
    for (bool det : {false, true}) {
      for (int64_t bucket : buckets) {
        DecodeGraph g;
        g.bucket = static_cast<int>(bucket);
        g.deterministic = det;
        for (auto [buf, bytes] : {std::pair{&g.q, q_row}, std::pair{&g.out, q_row},
                                  std::pair{&g.k, kv_row}, std::pair{&g.v, kv_row},
                                  std::pair{&g.lse, size_t{4} * num_qo_heads_}}) {
          auto b = AllocateDevice(bytes * static_cast<size_t>(bucket), "graph buffers");
          if (!b.ok()) return b.status();
          *buf = *std::move(b);
          graph_bytes_ += bytes * static_cast<size_t>(bucket);
        }
        // A valid plan for an all-padding batch: capture runs nothing, but launch checks pass.
        GpuBatch empty;
        empty.kv_len.assign(static_cast<size_t>(bucket), 0);
        empty.kv_indptr.assign(static_cast<size_t>(bucket) + 1, 0);
        empty.all_single_token = true;
        std::string error;
        const kernels::DecodePlanConfig& cfg = det ? decode_det_ : decode_cfg_;
        if (!kernels::PlanDecode(empty.kv_len.data(), empty.kv_indptr.data(), g.bucket,
                                 kernels::DecodeGridX(g.bucket, cfg), cfg, decode_layout_,
                                 HostArg<int32_t>(args_.plan), &decode_plan_ints_, &error))
          return absl::InternalError(absl::StrCat("graph plan for bucket ", bucket, ": ", error));
        ATTND_CUDA_RETURN(cudaMemcpyAsync(args_dev_.get(), args_host_.get(), args_.bytes,
                                          cudaMemcpyHostToDevice, stream_.get()),
                          "graph set-up");
        ATTND_CUDA_RETURN(cudaStreamSynchronize(stream_.get()), "graph set-up");
        cudaGraph_t graph = nullptr;
        ATTND_CUDA_RETURN(cudaStreamBeginCapture(stream_.get(), cudaStreamCaptureModeThreadLocal),
                          "begin graph capture");
        kernels::cuda::AppendArgs append;
        append.kv = {pool_.get(), shape_, 0, GraphArg<int32_t>(kLayerOffset)};
        append.k = g.k.get();
        append.v = g.v.get();
        append.k_token_stride = append.v_token_stride = shape_.num_kv_heads * shape_.head_dim;
        append.slot_mapping = GraphArg<int64_t>(args_.slots);
        append.num_tokens = bucket;
        const auto* copies = GraphArg<kernels::cuda::IndirectCopy>(kCopiesOffset);
        // The call's arguments come from the pinned block inside the graph; the host may
        // rewrite the block once `args_uploaded_` (a node of the graph) has fired.
        cudaError_t e = kernels::cuda::LaunchHostRangesCopy(HostArg<uint32_t>(kRangesOffset),
                                                            args_host_.get(), args_dev_.get(),
                                                            stream_.get());
        if (e == cudaSuccess) {
          e = cudaEventRecordWithFlags(args_uploaded_.get(), stream_.get(),
                                       cudaEventRecordExternal);
        }
        if (e == cudaSuccess) e = kernels::cuda::LaunchIndirectCopies(copies, 3, stream_.get());
        if (e == cudaSuccess) e = kernels::cuda::LaunchAppendKv(append, stream_.get());
        if (e == cudaSuccess) e = kernels::cuda::LaunchBatchDecode(GraphDecodeArgs(g), stream_.get());
        if (e == cudaSuccess) e = kernels::cuda::LaunchIndirectCopies(copies + 3, 2, stream_.get());
        const cudaError_t end = cudaStreamEndCapture(stream_.get(), &graph);
        ATTND_CUDA_RETURN(e, absl::StrCat("capture bucket ", bucket));
        ATTND_CUDA_RETURN(end, absl::StrCat("end graph capture, bucket ", bucket));
        e = cudaGraphInstantiate(&g.exec, graph, 0);
        cudaGraphDestroy(graph);
        ATTND_CUDA_RETURN(e, absl::StrCat("instantiate graph, bucket ", bucket));
        graphs_.push_back(std::move(g));
      }
    }
    return absl::OkStatus();
  }

  absl::Status ReplayDecode(const DecodeGraph& g, const AttentionWork& work,
                            bool upload_indices) {
    const size_t es = kernels::DTypeSize(shape_.dtype);
    const size_t n = batch_.kv_len.size();
    const size_t q_bytes = n * static_cast<size_t>(num_qo_heads_ * shape_.head_dim) * es;
    const size_t kv_bytes = n * static_cast<size_t>(shape_.num_kv_heads * shape_.head_dim) * es;
    std::string error;
    if (!Plan(batch_, work.deterministic, &error, HostArg<int32_t>(args_.plan)))
      return absl::InternalError(absl::StrCat("decode plan: ", error));
    *HostArg<int32_t>(kLayerOffset) = static_cast<int32_t>(work.append.layer);
    auto* copies = HostArg<kernels::cuda::IndirectCopy>(kCopiesOffset);
    copies[0] = {work.q, g.q.get(), q_bytes};
    copies[1] = {work.append.k_new, g.k.get(), kv_bytes};
    copies[2] = {work.append.v_new, g.v.get(), kv_bytes};
    copies[3] = {g.out.get(), work.out, q_bytes};
    copies[4] = {g.lse.get(), work.lse, work.lse == nullptr ? 0 : n * num_qo_heads_ * 4};
    // The slots and page ids are in place (BuildGpuBatch wrote them); padded tokens: skipped.
    int64_t* slots = HostArg<int64_t>(args_.slots);
    std::fill(slots + n, slots + g.bucket, int64_t{-1});
    uint32_t* ranges = HostArg<uint32_t>(kRangesOffset);
    ranges[0] = static_cast<uint32_t>(args_.plan + static_cast<size_t>(decode_plan_ints_) * 4);
    ranges[1] = static_cast<uint32_t>(args_.indices);
    ranges[2] = upload_indices ? static_cast<uint32_t>(batch_.kv_indptr.back()) * 4 : 0;
    return Check(cudaGraphLaunch(g.exec, stream_.get()), "graph replay");
  }

  std::vector<DecodeGraph> graphs_;
  GraphArgsLayout args_;
  // The page tables whose ids the graph arguments hold (see SameTablesAsLastGraphCall).
  uint64_t last_epoch_ = 0;
  std::vector<std::pair<const int32_t*, int64_t>> last_tables_;
  DeviceBuffer args_dev_;
  PinnedBuffer args_host_;
  struct EventDestroy {
    void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
  };
  std::unique_ptr<CUevent_st, EventDestroy> args_uploaded_;
  int64_t max_pages_per_seq_ = 0;
  size_t graph_bytes_ = 0;
  std::vector<int32_t> padded_len_, padded_indptr_;

  std::string name_;
  int64_t debug_fault_layer_ = -1;
  kernels::KvCacheShape shape_;
  kernels::AttentionOptions options_;
  int64_t num_qo_heads_ = 0;
  Stream stream_;
  std::unique_ptr<CudaCompletions> completions_;  // after stream_: destroyed before it
  DeviceBuffer pool_;
  kernels::DecodePlanConfig decode_cfg_, decode_det_;
  kernels::DecodePlanLayout decode_layout_;
  kernels::PrefillPlanConfig prefill_cfg_, prefill_det_;
  kernels::PrefillPlanLayout prefill_layout_;
  DeviceBuffer plan_, indices_, slots_, counters_;
  DeviceBuffer decode_partial_out_, decode_partial_lse_;
  DeviceBuffer prefill_partial_out_, prefill_partial_lse_;
  std::vector<int32_t> plan_host_;
  int64_t decode_plan_ints_ = 0;
  GpuBatch batch_;
};

absl::StatusOr<std::unique_ptr<DeviceBackend>> CudaDeviceBackend::Create(const ServerConfig& config,
                                                                          int device) {
  std::unique_ptr<CudaDeviceBackend> b(new CudaDeviceBackend());
  const ModelShape& m = config.model;
  cudaDeviceProp prop;
  ATTND_CUDA_RETURN(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  b->name_ = prop.name;
  b->debug_fault_layer_ = config.debug_fault_layer;
  cudaStream_t stream = nullptr;
  ATTND_CUDA_RETURN(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  b->stream_.reset(stream);
  b->completions_ = std::make_unique<CudaCompletions>(device);

  // Workspaces first, then the pool takes its share of what is left.
  const int max_batch = static_cast<int>(config.max_batch_size);
  const int64_t max_kv_len = config.max_seq_len;
  ATTND_CUDA_RETURN(kernels::cuda::MakeDecodePlanConfig(device, m.dtype, m.head_dim, m.num_qo_heads,
                                                        m.num_kv_heads, m.window_left,
                                                        &b->decode_cfg_),
                    "decode plan config");
  b->decode_det_ = b->decode_cfg_;
  b->decode_det_.deterministic = true;
  b->decode_layout_ = kernels::MakeDecodePlanLayout(max_batch, max_kv_len, b->decode_cfg_);
  // Partial states are the workspaces that grow with context: a quarter of the budget for
  // decode, the rest for prefill. Batches that would need more are refused up front
  // (CheckAttentionFits), not faulted.
  const int64_t budget = config.cuda_workspace_mb << 20;
  const int64_t row_bytes = (m.num_qo_heads * m.head_dim + m.num_qo_heads) * 4;
  b->decode_layout_.max_items = std::max<int64_t>(
      kernels::DecodeGridX(max_batch, b->decode_cfg_),
      std::min<int64_t>(b->decode_layout_.max_items, budget / 4 / row_bytes));
  ATTND_CUDA_RETURN(kernels::cuda::MakePrefillPlanConfig(device, m.dtype, m.head_dim,
                                                         m.num_qo_heads, m.num_kv_heads,
                                                         m.window_left, /*causal=*/true,
                                                         &b->prefill_cfg_),
                    "prefill plan config");
  b->prefill_det_ = b->prefill_cfg_;
  b->prefill_det_.deterministic = true;
  b->prefill_layout_ = kernels::MakePrefillPlanLayout(max_batch, config.max_tokens_per_request,
                                                      max_kv_len, b->prefill_cfg_);
  const int64_t partial_bytes =
      m.num_kv_heads * kernels::kPrefillWideRows * (m.head_dim + 1) * 4;
  b->prefill_layout_.max_partials =
      std::min<int64_t>(b->prefill_layout_.max_partials, budget * 3 / 4 / partial_bytes);
  const int64_t plan_ints =
      std::max(b->decode_layout_.TotalInts(), b->prefill_layout_.TotalInts());
  b->plan_host_.assign(static_cast<size_t>(plan_ints), 0);
  b->max_pages_per_seq_ = (max_kv_len + m.page_size - 1) / m.page_size;
  const int64_t max_pages = max_batch * b->max_pages_per_seq_;
  const int64_t row = m.num_qo_heads * m.head_dim;
  struct Want {
    DeviceBuffer* dst;
    size_t bytes;
    const char* what;
  };
  const Want wants[] = {
      {&b->plan_, static_cast<size_t>(plan_ints) * 4, "plans"},
      {&b->indices_, static_cast<size_t>(max_pages) * 4, "page tables"},
      {&b->slots_, static_cast<size_t>(config.max_tokens_per_request) * 8, "slot mappings"},
      {&b->counters_, static_cast<size_t>(max_batch) * b->decode_cfg_.kv_head_blocks * 4,
       "merge counters"},
      {&b->decode_partial_out_, static_cast<size_t>(b->decode_layout_.max_items * row) * 4,
       "decode partial outputs"},
      {&b->decode_partial_lse_,
       static_cast<size_t>(b->decode_layout_.max_items * m.num_qo_heads) * 4,
       "decode partial lse"},
      {&b->prefill_partial_out_,
       static_cast<size_t>(b->prefill_layout_.max_partials * m.num_kv_heads *
                           kernels::kPrefillWideRows * m.head_dim) * 4,
       "prefill partial outputs"},
      {&b->prefill_partial_lse_,
       static_cast<size_t>(b->prefill_layout_.max_partials * m.num_kv_heads *
                           kernels::kPrefillWideRows) * 4,
       "prefill partial lse"},
  };
  size_t workspace = 0;
  for (const Want& w : wants) {
    auto buf = AllocateDevice(w.bytes, w.what);
    if (!buf.ok()) return buf.status();
    *w.dst = *std::move(buf);
    workspace += w.bytes;
  }
  ATTND_CUDA_RETURN(cudaMemsetAsync(b->counters_.get(), 0,
                                    static_cast<size_t>(max_batch) * b->decode_cfg_.kv_head_blocks * 4,
                                    stream),
                    "zero merge counters");

  size_t free_bytes = 0, total_bytes = 0;
  ATTND_CUDA_RETURN(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
  int64_t num_pages = config.pages_per_device;
  if (num_pages == 0)
    num_pages = static_cast<int64_t>(config.memory_fraction * static_cast<double>(free_bytes)) /
                m.PageBytes();
  num_pages = std::min<int64_t>(num_pages, (int64_t{1} << 31) - 1);
  if (num_pages < 1)
    return absl::ResourceExhaustedError(
        absl::StrCat("device ", device, ": no room for one KV page of ", m.PageBytes(), " bytes"));
  b->shape_ = m.CacheShape(num_pages);
  b->options_ = m.Options();
  b->num_qo_heads_ = m.num_qo_heads;
  auto pool = AllocateDevice(static_cast<size_t>(b->shape_.TotalBytes()), "the KV pool");
  if (!pool.ok()) return pool.status();
  b->pool_ = *std::move(pool);
  ATTND_CUDA_RETURN(cudaStreamSynchronize(stream), "backend set-up");
  if (config.cuda_graphs && !config.graph_buckets.empty()) {
    const auto start = std::chrono::steady_clock::now();
    if (absl::Status s = b->CaptureGraphs(config.graph_buckets); !s.ok()) return s;
    spdlog::info("device={} graphs={} buckets={}..{} capture_s={:.3f} graph_buffer_bytes={}", device,
                 b->graphs_.size(), config.graph_buckets.front(), config.graph_buckets.back(),
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
                 b->graph_bytes_);
  }
  spdlog::info("device={} gpu=\"{}\" pool_pages={} pool_bytes={} workspace_bytes={} free_bytes={}",
               device, b->name_, num_pages, b->shape_.TotalBytes(), workspace, free_bytes);
  return std::unique_ptr<DeviceBackend>(std::move(b));
}

// A mapping of another process's allocation; closed on the owning device's worker.
class CudaIpcRegion final : public Region {
 public:
  CudaIpcRegion(std::string name, int device, uint8_t* base, uint64_t byte_size,
                std::function<void(std::function<void()>)> run_on_device)
      : Region(std::move(name), Kind::kCuda, device, base, byte_size),
        run_on_device_(std::move(run_on_device)) {}
  ~CudaIpcRegion() override {
    void* base = this->base();
    run_on_device_([base] { cudaIpcCloseMemHandle(base); });
  }
  std::string source() const override { return "cuda-ipc"; }

 private:
  std::function<void(std::function<void()>)> run_on_device_;
};

using MemGetAddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);

}  // namespace

int CudaDeviceCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

absl::Status BindThreadToDevice(int device) {
  return Check(cudaSetDevice(device), absl::StrCat("cudaSetDevice(", device, ")"));
}

absl::Status CheckCudaSupport(const ServerConfig& config, int device) {
  const int count = CudaDeviceCount();
  if (device >= count)
    return absl::InvalidArgumentError(
        absl::StrCat("--devices: CUDA device ", device, " does not exist (", count, " found)"));
  const ModelShape& m = config.model;
  if (m.dtype == kernels::DType::kFloat32)
    return absl::InvalidArgumentError("--dtype=fp32: the CUDA backend serves bf16 and fp16");
  if (m.head_dim != 64 && m.head_dim != 128 && m.head_dim != 256)
    return absl::InvalidArgumentError(
        absl::StrCat("--head_dim=", m.head_dim, ": the CUDA backend serves 64, 128 and 256"));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<DeviceBackend>> CreateCudaDeviceBackend(const ServerConfig& config,
                                                                        int device) {
  return CudaDeviceBackend::Create(config, device);
}

absl::StatusOr<std::unique_ptr<Region>> OpenCudaIpcRegion(
    std::string name, const std::string& ipc_handle, int device, uint64_t byte_size,
    std::function<void(std::function<void()>)> run_on_device) {
  cudaIpcMemHandle_t handle;
  if (ipc_handle.size() != sizeof(handle))
    return absl::InvalidArgumentError(absl::StrCat("ipc_handle: ", ipc_handle.size(),
                                                   " bytes, a cudaIpcMemHandle_t has ",
                                                   sizeof(handle)));
  if (byte_size == 0) return absl::InvalidArgumentError("byte_size: must be > 0");
  std::memcpy(&handle, ipc_handle.data(), sizeof(handle));
  void* ptr = nullptr;
  const cudaError_t e = cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it
    return absl::InvalidArgumentError(absl::StrCat("ipc_handle: cannot open on device ", device,
                                                   ": ", cudaGetErrorString(e)));
  }
  // The allocation's real extent, from the driver (fetched at run time: attnd links no libcuda).
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found;
  uint64_t extent = 0;
  if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault,
                                       &found) == cudaSuccess &&
      found == cudaDriverEntryPointSuccess && fn != nullptr) {
    CUdeviceptr base = 0;
    size_t size = 0;
    if (reinterpret_cast<MemGetAddressRange>(fn)(&base, &size,
                                                 reinterpret_cast<CUdeviceptr>(ptr)) == CUDA_SUCCESS)
      extent = size - (reinterpret_cast<CUdeviceptr>(ptr) - base);
  }
  if (extent == 0 || byte_size > extent) {
    cudaIpcCloseMemHandle(ptr);
    return absl::InvalidArgumentError(
        extent == 0 ? std::string("ipc_handle: cannot read the allocation's extent")
                    : absl::StrCat("byte_size: ", byte_size, " exceeds the ", extent,
                                   " bytes of the shared allocation"));
  }
  return std::unique_ptr<Region>(new CudaIpcRegion(std::move(name), device,
                                                   static_cast<uint8_t*>(ptr), byte_size,
                                                   std::move(run_on_device)));
}

namespace {

class OpenedIpcEvent final : public CudaIpcEvent {
 public:
  OpenedIpcEvent(int device, cudaEvent_t event,
                 std::function<void(std::function<void()>)> run_on_device)
      : device_(device), event_(event), run_on_device_(std::move(run_on_device)) {}
  ~OpenedIpcEvent() override {
    cudaEvent_t e = event_;
    run_on_device_([e] { cudaEventDestroy(e); });
  }
  int device() const override { return device_; }
  void* event() const override { return event_; }

 private:
  int device_;
  cudaEvent_t event_;
  std::function<void(std::function<void()>)> run_on_device_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<CudaIpcEvent>> OpenCudaIpcEvent(
    const std::string& ipc_handle, int device,
    std::function<void(std::function<void()>)> run_on_device) {
  cudaIpcEventHandle_t handle;
  if (ipc_handle.size() != sizeof(handle))
    return absl::InvalidArgumentError(absl::StrCat("ipc_handle: ", ipc_handle.size(),
                                                   " bytes, a cudaIpcEventHandle_t has ",
                                                   sizeof(handle)));
  std::memcpy(&handle, ipc_handle.data(), sizeof(handle));
  cudaEvent_t event = nullptr;
  const cudaError_t e = cudaIpcOpenEventHandle(&event, handle);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return absl::InvalidArgumentError(absl::StrCat("ipc_handle: cannot open the event on device ",
                                                   device, ": ", cudaGetErrorString(e)));
  }
  return std::unique_ptr<CudaIpcEvent>(new OpenedIpcEvent(device, event, std::move(run_on_device)));
}

absl::Status RegisterHostMemory(void* data, size_t bytes) {
  const cudaError_t e = cudaHostRegister(data, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return absl::FailedPreconditionError(
        absl::StrCat("cannot page-lock the host region for the GPUs: ", cudaGetErrorString(e)));
  }
  return absl::OkStatus();
}

void UnregisterHostMemory(void* data) { cudaHostUnregister(data); }

}  // namespace attnd
