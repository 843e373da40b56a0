#include "server/cuda/pool_transfer.h"

#include <algorithm>

#include "kernels/cuda/attention_cuda.h"
#include "server/cuda/cuda_check.h"

namespace attnd {

// One (layer, K or V) of a transfer between the pool and `dense` ([tokens][heads][head_dim] of
// the pool's elements, device memory or mapped host memory), one 2D copy per page (NHD) or
// per page and head (HND).
absl::Status PoolTransfer::CopyKvBlock(int64_t layer, int kv, const KvTransferWork& w,
                                            uint8_t* dense, size_t es) {
  const int64_t heads = w.head_end - w.head_begin;
  const size_t buffer_row = static_cast<size_t>(heads * shape_.head_dim) * es;
  const cudaMemcpyKind kind = cudaMemcpyDefault;  // UVA: the buffer may be host or device
  const auto copy = [&](uint8_t* pool, size_t pool_row, uint8_t* buf, size_t width,
                        int64_t rows) {
    return Check(w.to_pool ? cudaMemcpy2DAsync(pool, pool_row, buf, buffer_row, width, rows,
                                               kind, stream_)
                           : cudaMemcpy2DAsync(buf, buffer_row, pool, pool_row, width, rows,
                                               kind, stream_),
                 "KV transfer");
  };
  for (int64_t t0 = 0; t0 < w.num_tokens; t0 += shape_.page_size) {
    const int32_t page = w.page_table[static_cast<size_t>(t0 / shape_.page_size)];
    const int64_t rows = std::min(shape_.page_size, w.num_tokens - t0);
    uint8_t* buf = dense + static_cast<size_t>(t0) * buffer_row;
    if (shape_.layout == kernels::KvLayout::kNHD) {
      // Rows of the page are tokens; the head range of a row is contiguous.
      const size_t pool_row = static_cast<size_t>(shape_.num_kv_heads * shape_.head_dim) * es;
      if (absl::Status s = copy(PoolAt(shape_.Offset(layer, page, kv, 0, w.head_begin)),
                                pool_row, buf, buffer_row, rows);
          !s.ok())
        return s;
      continue;
    }
    // HND: each head's slots are contiguous rows of head_dim.
    const size_t head_row = static_cast<size_t>(shape_.head_dim) * es;
    for (int64_t h = 0; h < heads; ++h) {
      if (absl::Status s = copy(PoolAt(shape_.Offset(layer, page, kv, 0, w.head_begin + h)),
                                head_row, buf + static_cast<size_t>(h) * head_row, head_row,
                                rows);
          !s.ok())
        return s;
    }
  }
  return absl::OkStatus();
}

absl::Status PoolTransfer::Run(const KvTransferWork& w) {
  if (shape_.Fp8()) return RunFp8(w);
  const size_t es = static_cast<size_t>(shape_.ElemBytes());
  const size_t block =
      static_cast<size_t>(w.num_tokens * (w.head_end - w.head_begin) * shape_.head_dim) * es;
  auto* cursor = static_cast<uint8_t*>(w.buffer);
  for (int64_t layer = w.layer_begin; layer < w.layer_end; ++layer) {
    for (int kv = 0; kv < 2; ++kv, cursor += block) {
      if (absl::Status s = CopyKvBlock(layer, kv, w, cursor, es); !s.ok()) return s;
    }
  }
  return Check(cudaStreamSynchronize(stream_), "KV transfer");
}

// Per-token scale pools: the scales of one (layer, K or V) of a transfer between the pool and
// `dense` ([heads][tokens] floats, device memory), one 2D copy per page (a page's head range
// is [heads][page_size] there).
absl::Status PoolTransfer::CopyScaleBlock(int64_t layer, int kv, const KvTransferWork& w,
                                               float* dense) {
  const int64_t heads = w.head_end - w.head_begin;
  const size_t pool_pitch = static_cast<size_t>(shape_.page_size) * sizeof(float);
  const size_t dense_pitch = static_cast<size_t>(w.num_tokens) * sizeof(float);
  for (int64_t t0 = 0; t0 < w.num_tokens; t0 += shape_.page_size) {
    const int32_t page = w.page_table[static_cast<size_t>(t0 / shape_.page_size)];
    const size_t width = static_cast<size_t>(std::min(shape_.page_size, w.num_tokens - t0)) *
                         sizeof(float);
    float* pool = ScalesAt(shape_.ScaleOffset(layer, page, kv, 0, w.head_begin));
    float* buf = dense + t0;
    const cudaError_t e =
        w.to_pool ? cudaMemcpy2DAsync(pool, pool_pitch, buf, dense_pitch, width, heads,
                                      cudaMemcpyDeviceToDevice, stream_)
                  : cudaMemcpy2DAsync(buf, dense_pitch, pool, pool_pitch, width, heads,
                                      cudaMemcpyDeviceToDevice, stream_);
    if (absl::Status s = Check(e, "KV transfer scales"); !s.ok()) return s;
  }
  return absl::OkStatus();
}

// The buffer is in the model dtype: each (layer, K or V) block goes through device scratch,
// an fp8 part the page copies use and a model-dtype part the conversion kernel uses (the
// client's buffer is only element-aligned and may be host memory: plain copies reach it), and
// is converted with the layer's scale (export: scale * fp8; import: fp8(x / scale)) or, in a
// per-token scale pool, with each row's scale, which import computes as append does (a third
// part of the scratch holds the block's scales on their way to or from the pool).
absl::Status PoolTransfer::RunFp8(const KvTransferWork& w) {
  const int64_t heads = w.head_end - w.head_begin;
  const int64_t elems = w.num_tokens * heads * shape_.head_dim;
  const size_t model_block = static_cast<size_t>(elems) * kernels::DTypeSize(shape_.dtype);
  const size_t fp8_part = (static_cast<size_t>(elems) + 255) / 256 * 256;
  const size_t model_part = (model_block + 255) / 256 * 256;
  const size_t scales_part =
      shape_.TokenScales() ? static_cast<size_t>(w.num_tokens * heads) * sizeof(float) : 0;
  auto scratch = staging_->Scratch(std::max<size_t>(fp8_part + model_part + scales_part, 16));
  if (!scratch.ok()) return scratch.status();
  auto* dense = static_cast<uint8_t*>(*scratch);
  uint8_t* model = dense + fp8_part;
  float* row_scales = shape_.TokenScales() ? reinterpret_cast<float*>(model + model_part) : nullptr;
  auto* cursor = static_cast<uint8_t*>(w.buffer);
  for (int64_t layer = w.layer_begin; layer < w.layer_end; ++layer) {
    const kernels::KvScales sc = staging_->scales(layer);
    for (int kv = 0; kv < 2; ++kv, cursor += model_block) {
      kernels::cuda::ConvertKvArgs c;
      c.n = elems;
      c.dtype = shape_.dtype;
      c.to_fp8 = w.to_pool;
      c.scale = kv == 0 ? sc.k : sc.v;
      c.row_scales = row_scales;
      c.head_dim = shape_.head_dim;
      c.heads = heads;
      c.tokens = w.num_tokens;
      c.src = w.to_pool ? static_cast<const void*>(model) : dense;
      c.dst = w.to_pool ? static_cast<void*>(dense) : model;
      const auto convert = [&] {
        return Annotate(kernels::cuda::LaunchConvertKv(c, stream_), "KV conversion");
      };
      const auto copy = [&](void* dst, const void* src) {
        return Check(cudaMemcpyAsync(dst, src, model_block, cudaMemcpyDefault, stream_),
                     "KV transfer");
      };
      // To the pool: the buffer's block, converted, then its bytes and scales into the pages.
      // From it: the pages' bytes and scales, converted, then into the buffer.
      const auto pages = [&] {
        absl::Status s = CopyKvBlock(layer, kv, w, dense, 1);
        if (s.ok() && row_scales != nullptr) s = CopyScaleBlock(layer, kv, w, row_scales);
        return s;
      };
      absl::Status s = w.to_pool ? copy(model, cursor) : pages();
      if (s.ok()) s = convert();
      if (s.ok()) s = w.to_pool ? pages() : copy(cursor, model);
      if (!s.ok()) return s;
    }
  }
  return Check(cudaStreamSynchronize(stream_), "KV transfer");
}

}  // namespace attnd
