#include "server/cpu/cpu_backend.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cpu_attention.h"
#include "server/cpu/thread_pool.h"

namespace attnd {
namespace {

// Anonymous mapping: pages of the pool cost RAM only once written.
class HostPool {
 public:
  static absl::StatusOr<std::unique_ptr<HostPool>> Create(size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot reserve ", bytes, " bytes of host memory for the KV pool"));
    }
    return std::unique_ptr<HostPool>(new HostPool(p, bytes));
  }
  ~HostPool() { munmap(data_, bytes_); }
  uint8_t* data() const { return static_cast<uint8_t*>(data_); }
  size_t bytes() const { return bytes_; }

 private:
  HostPool(void* data, size_t bytes) : data_(data), bytes_(bytes) {}
  void* const data_;
  const size_t bytes_;
};

// Every layer's scales as configured; layers the config does not cover start at 1 and 1.
std::vector<kernels::KvScales> InitialScales(const ModelShape& model) {
  std::vector<kernels::KvScales> scales(static_cast<size_t>(model.num_layers));
  const size_t given = std::min(scales.size(), model.kv_scales.size());
  std::copy_n(model.kv_scales.begin(), given, scales.begin());
  return scales;
}

class CpuDeviceBackend final : public DeviceBackend {
 public:
  CpuDeviceBackend(const ServerConfig& config, int64_t num_pages, std::unique_ptr<HostPool> pool)
      : shape_(config.model.CacheShape(num_pages)),
        options_(config.model.Options()),
        num_qo_heads_(config.model.num_qo_heads),
        pool_(std::move(pool)),
        scales_(InitialScales(config.model)),
        threads_(std::max(0, config.cpu_threads - 1)) {}

  std::string name() const override { return "cpu"; }
  int64_t num_pages() const override { return shape_.num_pages; }
  int64_t pool_bytes() const override { return shape_.TotalBytes(); }
  KvPoolMemory pool_memory() const override { return {pool_->data(), pool_bytes(), false}; }

  // A page is its K and V blocks of every layer and, in a per-token pool, their scales (one
  // contiguous [2][kv_heads][page_size] run per layer after the pages).
  absl::Status CopyPages(absl::Span<const PageCopy> copies) override {
    const size_t page_bytes = static_cast<size_t>(shape_.PageElems() * shape_.ElemBytes());
    const size_t scale_bytes = static_cast<size_t>(shape_.PageScales()) * sizeof(float);
    for (const PageCopy& c : copies) {
      for (int64_t layer = 0; layer < shape_.num_layers; ++layer) {
        std::memcpy(ElementPtr(shape_.Offset(layer, c.dst, 0, 0, 0)),
                    ElementPtr(shape_.Offset(layer, c.src, 0, 0, 0)), page_bytes);
        if (scale_bytes == 0) continue;
        std::memcpy(ScalesPtr(shape_.ScaleOffset(layer, c.dst, 0, 0, 0)),
                    ScalesPtr(shape_.ScaleOffset(layer, c.src, 0, 0, 0)), scale_bytes);
      }
    }
    return absl::OkStatus();
  }

  absl::StatusOr<LaunchResult> Append(const AppendWork& work) override {
    const int64_t row_bytes = RowBytes(shape_.num_kv_heads);
    int64_t row = 0;
    for (const BatchEntry& e : work.entries) {
      kernels::CpuAppendKv(pool_->data(), shape_, work.layer, e.page_table.data(), e.start,
                           e.num_new, static_cast<const uint8_t*>(work.k_new) + row * row_bytes,
                           static_cast<const uint8_t*>(work.v_new) + row * row_bytes,
                           LayerScales(work.layer));
      row += e.num_new;
    }
    return LaunchResult{std::chrono::steady_clock::now()};
  }

  // One kernel for every batch, and nothing to stage: the pool is reached directly.
  absl::StatusOr<AttentionPlan> PlanAttention(const AttentionBatch&) override {
    return AttentionPlan{};
  }

  absl::StatusOr<LaunchResult> Attention(const AttentionWork& work,
                                         const AttentionPlan&) override {
    if (auto appended = Append(work.append); !appended.ok()) return appended.status();
    // One task per (sequence, kv head): disjoint rows of out and lse, so tasks run in parallel
    // and each task's arithmetic does not depend on how they are spread (deterministic).
    const int64_t q_row_bytes = RowBytes(num_qo_heads_);
    const auto& entries = work.append.entries;
    std::vector<int64_t> first_row(entries.size());
    for (size_t i = 1; i < entries.size(); ++i)
      first_row[i] = first_row[i - 1] + entries[i - 1].num_new;
    const int64_t heads = shape_.num_kv_heads;
    const kernels::KvScales scales = LayerScales(work.append.layer);
    threads_.ParallelFor(static_cast<int64_t>(entries.size()) * heads, [&](int64_t task) {
      const BatchEntry& e = entries[static_cast<size_t>(task / heads)];
      const int64_t head = task % heads;
      const int64_t row = first_row[static_cast<size_t>(task / heads)];
      kernels::SequenceView view{e.page_table.data(), e.start + e.num_new, e.num_new};
      kernels::CpuPagedAttentionKvHeads(
          pool_->data(), shape_, work.append.layer, view, options_,
          static_cast<const uint8_t*>(work.q) + row * q_row_bytes,
          static_cast<uint8_t*>(work.out) + row * q_row_bytes,
          work.lse == nullptr ? nullptr : work.lse + row * num_qo_heads_, head, head + 1, scales);
    });
    return LaunchResult{std::chrono::steady_clock::now()};
  }

  // Every check before any write, so a refused call changes nothing.
  absl::Status SetKvScales(int64_t layer_begin,
                           absl::Span<const kernels::KvScales> scales) override {
    if (!shape_.Fp8()) {
      return absl::FailedPreconditionError(
          "SetKvScales: the pool is not fp8 (it stores K and V in the model's dtype, unscaled)");
    }
    if (shape_.TokenScales()) {
      return absl::FailedPreconditionError(
          "SetKvScales: the pool has per-token scales (fp8_per_token), computed at append "
          "for every token and kv head; it has no per-layer scales to set");
    }
    const int64_t n = static_cast<int64_t>(scales.size());
    if (layer_begin < 0 || n > shape_.num_layers - layer_begin) {
      return absl::InvalidArgumentError(absl::StrCat(
          "SetKvScales: layer_begin ", layer_begin, " with ", n,
          " layers of scales is outside the ", shape_.num_layers, " layers of the model"));
    }
    for (int64_t i = 0; i < n; ++i) {
      const kernels::KvScales& s = scales[static_cast<size_t>(i)];
      // A zero, negative or non-finite scale would turn every value of the layer into 0 or NaN.
      if (!(s.k > 0.0f && s.v > 0.0f && std::isfinite(s.k) && std::isfinite(s.v))) {
        return absl::InvalidArgumentError(absl::StrCat("SetKvScales: the scales of layer ",
                                                       layer_begin + i, " (k ", s.k, ", v ", s.v,
                                                       ") are not positive and finite"));
      }
    }
    std::copy(scales.begin(), scales.end(), scales_.begin() + layer_begin);
    return absl::OkStatus();
  }

  // The buffer holds the model's dtype. A model-dtype pool copies bytes; an fp8 pool exports
  // scale * fp8 (the float product rounded to the model's dtype) and imports fp8(value / scale),
  // as the append quantizes, with the layer's scale or (per-token pools) the row's, which an
  // import computes from the row as append does: a sequence exported and imported again gets
  // back the same codes and scales.
  absl::Status TransferKv(const KvTransferWork& w) override {
    const int64_t heads = w.head_end - w.head_begin;
    const int64_t d = shape_.head_dim;
    const size_t run_bytes = static_cast<size_t>(RowBytes(1));
    const bool fp8 = shape_.Fp8();
    std::vector<float> run(fp8 ? static_cast<size_t>(d) : 0);
    auto* buffer = static_cast<uint8_t*>(w.buffer);
    size_t cursor = 0;
    for (int64_t layer = w.layer_begin; layer < w.layer_end; ++layer) {
      for (int kv = 0; kv < 2; ++kv) {
        const float scale = kv == 0 ? LayerScales(layer).k : LayerScales(layer).v;
        for (int64_t t = 0; t < w.num_tokens; ++t) {
          const int32_t page = w.page_table[static_cast<size_t>(t / shape_.page_size)];
          for (int64_t h = 0; h < heads; ++h, cursor += run_bytes) {
            const int64_t slot = t % shape_.page_size;
            const int64_t element = shape_.Offset(layer, page, kv, slot, w.head_begin + h);
            if (shape_.TokenScales()) {
              TransferTokenRow(layer, page, kv, slot, w.head_begin + h, buffer + cursor,
                               w.to_pool, run.data());
            } else if (fp8) {
              ConvertRun(element, buffer + cursor, w.to_pool, scale, run.data());
            } else if (w.to_pool) {
              std::memcpy(ElementPtr(element), buffer + cursor, run_bytes);
            } else {
              std::memcpy(buffer + cursor, ElementPtr(element), run_bytes);
            }
          }
        }
      }
    }
    return absl::OkStatus();
  }

 private:
  uint8_t* ElementPtr(int64_t element) const {
    return pool_->data() + element * shape_.ElemBytes();
  }
  // The per-token scale at `scale` (floats from the scales' start).
  uint8_t* ScalesPtr(int64_t scale) const {
    return pool_->data() + shape_.ScalesByteOffset() + scale * static_cast<int64_t>(sizeof(float));
  }
  // Bytes of `heads` rows of the model's dtype (k_new, q, out, transfer buffers).
  int64_t RowBytes(int64_t heads) const {
    return heads * shape_.head_dim * static_cast<int64_t>(kernels::DTypeSize(shape_.dtype));
  }
  kernels::KvScales LayerScales(int64_t layer) const { return scales_[static_cast<size_t>(layer)]; }

  // One head's row between the fp8 pool at `element` and `model_row` (head_dim values of the
  // model's dtype), through `scratch` (head_dim floats).
  void ConvertRun(int64_t element, uint8_t* model_row, bool to_pool, float scale,
                  float* scratch) const {
    const int64_t d = shape_.head_dim;
    if (to_pool) {
      kernels::LoadRowAsFloat(model_row, 0, d, shape_.dtype, scratch);
      for (int64_t x = 0; x < d; ++x) scratch[x] /= scale;
      kernels::StoreRowFromFloat(scratch, d, kernels::DType::kFloat8E4M3, pool_->data(), element);
    } else {
      kernels::LoadRowAsFloat(pool_->data(), element, d, kernels::DType::kFloat8E4M3, scratch);
      for (int64_t x = 0; x < d; ++x) scratch[x] *= scale;
      kernels::StoreRowFromFloat(scratch, d, shape_.dtype, model_row, 0);
    }
  }

  // One (token, head) row of a per-token pool and `model_row`: export dequantizes with the
  // row's scale; import quantizes as append does, scale and codes.
  void TransferTokenRow(int64_t layer, int64_t page, int kv, int64_t slot, int64_t head,
                        uint8_t* model_row, bool to_pool, float* scratch) const {
    const int64_t element = shape_.Offset(layer, page, kv, slot, head);
    if (to_pool) {
      const float scale = kernels::QuantizeTokenRow(model_row, 0, shape_.head_dim, shape_.dtype,
                                                    ElementPtr(element));
      kernels::StoreTokenScale(pool_->data(), shape_, layer, page, kv, slot, head, scale);
      return;
    }
    const float scale = kernels::LoadTokenScale(pool_->data(), shape_, layer, page, kv, slot, head);
    ConvertRun(element, model_row, /*to_pool=*/false, scale, scratch);
  }

  const kernels::KvCacheShape shape_;
  const kernels::AttentionOptions options_;
  const int64_t num_qo_heads_;
  const std::unique_ptr<HostPool> pool_;
  // Per layer; ignored by a model-dtype pool. Changed only by SetKvScales, on the worker thread
  // that makes every other call.
  std::vector<kernels::KvScales> scales_;
  ThreadPool threads_;  // its own lock: ParallelFor callers take turns
};

int64_t PhysicalMemoryBytes() {
  return static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) *
         static_cast<int64_t>(sysconf(_SC_PAGESIZE));
}

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceBackend>> CreateCpuDeviceBackend(const ServerConfig& config,
                                                                       int device) {
  (void)device;
  // PageBytes() counts a page's per-token scales; the pool adds at most 255 bytes of alignment
  // before them (TotalBytes()).
  const int64_t page_bytes = config.model.PageBytes();
  int64_t num_pages = config.pages_per_device;
  if (num_pages == 0) {
    num_pages = static_cast<int64_t>(config.memory_fraction *
                                     static_cast<double>(PhysicalMemoryBytes())) /
                page_bytes;
    num_pages = std::min<int64_t>(num_pages, (int64_t{1} << 31) - 1);
  }
  if (num_pages < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--memory_fraction leaves no room for one page of ", page_bytes, " bytes"));
  }
  auto pool =
      HostPool::Create(static_cast<size_t>(config.model.CacheShape(num_pages).TotalBytes()));
  if (!pool.ok()) return pool.status();
  return std::make_unique<CpuDeviceBackend>(config, num_pages, *std::move(pool));
}

}  // namespace attnd
