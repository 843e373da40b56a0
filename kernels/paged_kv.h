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

// How the pool stores K and V: in the model's dtype; as fp8 e4m3 with per-layer scales
// (value = fp8 * scale, vLLM's kv_cache_dtype=fp8 with k_scale/v_scale); or as fp8 e4m3 with a
// scale per (token, kv head) of K and of V, which append computes from the row it quantizes
// (scale = max |x| / 448, 1 for an all-zero row), so no calibration is needed and one outlier
// token costs only its own row's precision.
enum class KvStorage : int { kModelDType = 0, kFp8E4M3 = 1, kFp8E4M3PerToken = 2 };

// The e4m3 value a per-token scale maps a row's largest magnitude to.
inline constexpr float kFp8E4M3Max = 448.0f;

// The dequantization scales of one layer of an fp8 pool (1 and 1 for a model-dtype pool):
// K = k * fp8(K / k), V = v * fp8(V / v), the quantization saturating at +-448.
struct KvScales {
  float k = 1.0f;
  float v = 1.0f;
};

// NHD: a page's K (or V) block is [page_size][kv_heads][head_dim].
// HND: a page's K (or V) block is [kv_heads][page_size][head_dim].
enum class KvLayout : int { kNHD = 0, kHND = 1 };

// One device's pool: [layers][pages][2][page block], K block then V block of each page. A
// kFp8E4M3PerToken pool holds, after the pages (at byte ScalesByteOffset(), 256-aligned), f32
// scales [layers][pages][2][kv_heads][page_size]: indexed by the same page ids, so every page
// operation (copy-on-write, pulls, transfers) moves a page's scales with it, and one head's
// scales of a page are contiguous (a head range of a page is one run, as in HND blocks).
struct KvCacheShape {
  int64_t num_layers = 0;
  int64_t num_pages = 0;
  int64_t page_size = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  KvLayout layout = KvLayout::kNHD;
  DType dtype = DType::kBFloat16;  // the model's: q, k_new, v_new, out, transfer buffers
  KvStorage storage = KvStorage::kModelDType;

  constexpr bool Fp8() const { return storage != KvStorage::kModelDType; }
  constexpr bool TokenScales() const { return storage == KvStorage::kFp8E4M3PerToken; }
  // What a pool element is, and its bytes (offsets below count elements of it).
  constexpr DType StorageDType() const { return Fp8() ? DType::kFloat8E4M3 : dtype; }
  constexpr int64_t ElemBytes() const { return static_cast<int64_t>(DTypeSize(StorageDType())); }

  // Elements of one K (or V) block of one page.
  constexpr int64_t BlockElems() const { return page_size * num_kv_heads * head_dim; }
  constexpr int64_t PageElems() const { return 2 * BlockElems(); }
  constexpr int64_t LayerElems() const { return num_pages * PageElems(); }
  constexpr int64_t TotalElems() const { return num_layers * LayerElems(); }
  constexpr int64_t KvBytes() const { return TotalElems() * ElemBytes(); }
  // The whole pool's bytes: K/V pages, then (kFp8E4M3PerToken) the scales.
  constexpr int64_t TotalBytes() const {
    return TokenScales() ? ScalesByteOffset() + num_layers * LayerScales() * 4 : KvBytes();
  }
  // Per-token scales: floats per page (K and V, every head and slot) and per layer; 0 for other
  // pools. Scale offsets count floats from the pool's byte ScalesByteOffset().
  constexpr int64_t PageScales() const { return TokenScales() ? 2 * num_kv_heads * page_size : 0; }
  constexpr int64_t LayerScales() const { return num_pages * PageScales(); }
  constexpr int64_t ScalesByteOffset() const { return (KvBytes() + 255) / 256 * 256; }
  constexpr int64_t ScaleOffset(int64_t layer, int64_t page, int kv, int64_t slot,
                                int64_t head) const {
    return layer * LayerScales() + page * PageScales() + (kv * num_kv_heads + head) * page_size +
           slot;
  }
  // Bytes of one page across all layers: its K and V blocks and its scales.
  constexpr int64_t PageBytes() const {
    return num_layers * (PageElems() * ElemBytes() + PageScales() * 4);
  }
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
