// Shapes and addressing of a paged KV cache, shared by the CPU reference, the CPU backend's
// fp32 attention and the CUDA kernels. Knows nothing of sequences, regions or gRPC: it sees
// pointers, page tables and shapes.
#ifndef ATTND_KERNELS_PAGED_KV_H_
#define ATTND_KERNELS_PAGED_KV_H_

#include <cstddef>
#include <cstdint>

namespace attnd::kernels {

// kFloat8E4M3 is a storage type of the KV pool only (OCP e4m3fn: no infinities, max 448);
// q, k_new, v_new and out stay in the model's 16- or 32-bit dtype.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat8E4M3 = 3 };

inline constexpr size_t DTypeSize(DType t) {
  return t == DType::kFloat32 ? 4 : t == DType::kFloat8E4M3 ? 1 : 2;
}

// How the pool stores K and V: in the model's dtype, or as fp8 e4m3 with per-layer scales
// (value = fp8 * scale, vLLM's kv_cache_dtype=fp8 with k_scale/v_scale).
enum class KvStorage : int { kModelDType = 0, kFp8E4M3 = 1 };

// The dequantization scales of one layer of an fp8 pool (1 and 1 for a model-dtype pool):
// K = k * fp8(K / k), V = v * fp8(V / v), the quantization saturating at +-448.
struct KvScales {
  float k = 1.0f;
  float v = 1.0f;
};

// NHD: a page's K (or V) block is [page_size][kv_heads][head_dim].
// HND: a page's K (or V) block is [kv_heads][page_size][head_dim].
enum class KvLayout : int { kNHD = 0, kHND = 1 };

// One device's pool: [layers][pages][2][page block], K block then V block of each page.
struct KvCacheShape {
  int64_t num_layers = 0;
  int64_t num_pages = 0;
  int64_t page_size = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  KvLayout layout = KvLayout::kNHD;
  DType dtype = DType::kBFloat16;  // the model's: q, k_new, v_new, out, transfer buffers
  KvStorage storage = KvStorage::kModelDType;

  // What a pool element is, and its bytes (offsets below count elements of it).
  constexpr DType StorageDType() const {
    return storage == KvStorage::kFp8E4M3 ? DType::kFloat8E4M3 : dtype;
  }
  constexpr int64_t ElemBytes() const { return static_cast<int64_t>(DTypeSize(StorageDType())); }

  // Elements of one K (or V) block of one page.
  constexpr int64_t BlockElems() const { return page_size * num_kv_heads * head_dim; }
  constexpr int64_t PageElems() const { return 2 * BlockElems(); }
  constexpr int64_t LayerElems() const { return num_pages * PageElems(); }
  constexpr int64_t TotalElems() const { return num_layers * LayerElems(); }
  constexpr int64_t TotalBytes() const { return TotalElems() * ElemBytes(); }
  // Elements between consecutive slots (tokens) of a block, and between consecutive heads.
  constexpr int64_t SlotStride() const {
    return layout == KvLayout::kNHD ? num_kv_heads * head_dim : head_dim;
  }
  constexpr int64_t HeadStride() const {
    return layout == KvLayout::kNHD ? head_dim : page_size * head_dim;
  }
  // Element offset of (layer, page, kv: 0 = K / 1 = V, slot in page, head, 0).
  constexpr int64_t Offset(int64_t layer, int64_t page, int kv, int64_t slot,
                           int64_t head) const {
    return layer * LayerElems() + page * PageElems() + kv * BlockElems() + slot * SlotStride() +
           head * HeadStride();
  }
};

// Attention options fixed by the model. logits = soft_cap * tanh(sm_scale * q.k / soft_cap)
// when soft_cap > 0, else sm_scale * q.k. Key j is visible to the query at position i when
// j <= i and (window_left < 0 or i - j <= window_left).
struct AttentionOptions {
  int64_t num_qo_heads = 0;  // a multiple of num_kv_heads (GQA group = qo / kv)
  float sm_scale = 0.0f;
  float logits_soft_cap = 0.0f;
  int64_t window_left = -1;
};

// One sequence of a batch as the CPU paths see it: its page table (page ids of positions
// [0, kv_len) in order, page_size positions each) and the new queries, which are the last
// num_queries positions [kv_len - num_queries, kv_len).
struct SequenceView {
  const int32_t* page_table = nullptr;
  int64_t kv_len = 0;
  int64_t num_queries = 0;
};

}  // namespace attnd::kernels

#endif  // ATTND_KERNELS_PAGED_KV_H_
