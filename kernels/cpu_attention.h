// CPU paths over a paged KV cache in host memory: the fp32 append and attention the CPU backend
// serves with, and the fp64 reference tests compare every backend against.
#ifndef ATTND_KERNELS_CPU_ATTENTION_H_
#define ATTND_KERNELS_CPU_ATTENTION_H_

#include <cstdint>
#include <vector>

#include "kernels/paged_kv.h"

namespace attnd::kernels {

// Writes n tokens' K and V, each [n][num_kv_heads][head_dim] of shape.dtype contiguous, into
// positions [start, start + n) of `layer`, following seq.page_table. `pool` covers
// shape.TotalBytes().
// A model-dtype pool copies K and V and ignores the scales. A kFp8E4M3 pool stores
// fp8(K / scales.k) and fp8(V / scales.v), saturating, the division in fp32. A kFp8E4M3PerToken
// pool ignores `scales` too: each (token, kv head) row of K, and of V, is quantized with its own
// scale (QuantizeTokenRow), which goes to the row's place among the pool's scales.
void CpuAppendKv(void* pool, const KvCacheShape& shape, int64_t layer, const int32_t* page_table,
                 int64_t start, int64_t n, const void* k, const void* v, KvScales scales = {});

// The attention functions read a kFp8E4M3 pool's K and V as scales.k * fp8 and scales.v * fp8,
// a kFp8E4M3PerToken pool's as the row's own scale * fp8 (the dequantized truth the GPU kernels
// are compared against); model-dtype and per-token pools ignore `scales`.
// Causal attention of one sequence's num_queries new queries over its kv_len positions.
// q and out are [num_queries][num_qo_heads][head_dim] of shape.dtype; lse (may be null) is
// [num_queries][num_qo_heads] float32, natural log of the softmax denominator. Computes in fp32
// with an online softmax, one pass over the KV. A query that sees no key (only possible when
// num_queries > kv_len) gets a zero output row and lse = -inf; num_queries == 0 is a no-op.
void CpuPagedAttention(const void* pool, const KvCacheShape& shape, int64_t layer,
                       const SequenceView& seq, const AttentionOptions& opts, const void* q,
                       void* out, float* lse, KvScales scales = {});

// CpuPagedAttention restricted to kv heads [kv_head_begin, kv_head_end) and the query heads of
// their GQA groups; writes only those heads' rows of out and lse. Calls on disjoint head ranges
// touch disjoint memory, so a backend may run them on different threads.
void CpuPagedAttentionKvHeads(const void* pool, const KvCacheShape& shape, int64_t layer,
                              const SequenceView& seq, const AttentionOptions& opts,
                              const void* q, void* out, float* lse, int64_t kv_head_begin,
                              int64_t kv_head_end, KvScales scales = {});

// fp64 reference of CpuPagedAttention: gathers the sequence's K/V densely and computes
// softmax(logits) V in double, two passes. Output in double, [num_queries][qo_heads][head_dim];
// lse [num_queries][qo_heads].
void ReferencePagedAttention(const void* pool, const KvCacheShape& shape, int64_t layer,
                             const SequenceView& seq, const AttentionOptions& opts,
                             const void* q, std::vector<double>* out, std::vector<double>* lse,
                             KvScales scales = {});

// Conversions between the storage dtypes and float (round-to-nearest-even on the way down;
// fp8 e4m3 saturates at +-448, infinities included, and maps NaN to 0x7f, like CUDA's
// __NV_SATFINITE conversion).
float LoadAsFloat(const void* base, int64_t index, DType dtype);
void StoreFromFloat(void* base, int64_t index, DType dtype, float value);

// The same for n consecutive elements starting at element `index`; the same results as the
// scalar forms, but vectorised (for the CPU backend's bulk conversions).
void LoadRowAsFloat(const void* base, int64_t index, int64_t n, DType dtype, float* dst);
void StoreRowFromFloat(const float* src, int64_t n, DType dtype, void* base, int64_t index);

// kFp8E4M3PerToken pools: the scale of the (token, kv head) row of K (kv 0) or V (kv 1) at
// (layer, page, slot, head), an f32 at byte ScalesByteOffset() + 4 * ScaleOffset(...) of the
// pool. For tests and the CPU backend's transfers; the paths above find the scales themselves.
float LoadTokenScale(const void* pool, const KvCacheShape& shape, int64_t layer, int64_t page,
                     int kv, int64_t slot, int64_t head);
void StoreTokenScale(void* pool, const KvCacheShape& shape, int64_t layer, int64_t page, int kv,
                     int64_t slot, int64_t head, float scale);

// Quantizes one row of n model-dtype values (elements [index, index + n) of src) as a
// kFp8E4M3PerToken append does, into dst: scale = max |x| / kFp8E4M3Max (NaN ignored; 1 when the
// maximum is 0), dst[i] = fp8(x_i / scale) with the division in fp32, saturating. Returns the
// scale. The CUDA append computes the same bits.
float QuantizeTokenRow(const void* src, int64_t index, int64_t n, DType dtype, uint8_t* dst);

}  // namespace attnd::kernels

#endif  // ATTND_KERNELS_CPU_ATTENTION_H_
