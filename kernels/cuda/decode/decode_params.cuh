// Device-side parameters and tile shapes of the batch decode kernel.
#ifndef ATTND_KERNELS_CUDA_DECODE_DECODE_PARAMS_CUH_
#define ATTND_KERNELS_CUDA_DECODE_DECODE_PARAMS_CUH_

#include <cstdint>

#include "kernels/cuda/common/device_utils.cuh"

namespace attnd::kernels::cuda::detail {

struct DecodeParams {
  const void* kv_layer;  // pool + layer offset
  const int32_t* layer_ptr;  // non-null: the layer is *layer_ptr, kv_layer the pool
  int64_t layer_elems;
  int64_t page_stride;   // elements between pages
  int64_t v_offset;      // elements from a page's K block to its V block
  int64_t slot_stride;   // elements between slots of a page (one head)
  int64_t head_stride;   // elements between kv heads within a page
  FastDivmod page_div;
  const int32_t* kv_indices;
  const void* q;
  int64_t q_sb, q_sh;
  void* out;
  int64_t o_sb, o_sh;
  float* lse;
  int num_qo_heads;
  int group;         // query heads per (kernel) kv head
  int m_blocks;
  int soft_cap;      // 0: s = pre * q.k; 1: s = post * tanh(pre * q.k)   (log2 units)
  float scale_pre;
  float scale_post;
  const int32_t* plan;
  int item_indptr_offset;
  int items_offset;
  float* partial_out;
  float* partial_lse;
  int* counters;     // [batch][gridDim.x], zero between launches
  int fused_merge;   // 1: the CTA finishing a request's last item merges it; 0: merge kernel
  // fp8 pools: the layer (when layer_ptr is null) and the device [layers][2] K/V scales.
  int layer;
  const float* scales;
  // Per-token scales (kFp8E4M3PerToken): the pool's [layers][pages][2][kv_heads][page_size].
  const float* token_scales;
  int64_t layer_scales, page_scales;  // floats per layer and per page
  int page_size;
  int scale_v_offset;                 // floats from a page's K scales to its V scales
  // A column's CTAs let programmatic dependents (PDL) launch this many tiles before the end of
  // their last item; 0: at their end (ATTND_DECODE_TRIGGER_TILES).
  int trigger_tiles;
  // Head pairs (decode.cu, PairsHeads): a head_dim-64 pool read as head_dim 128, kv head v being
  // heads 2v and 2v + 1; the real group g: query columns [0, g) are head 2v's, [g, 2g) head
  // 2v + 1's, each a 64-dim query and output in its half of the 128 dims. 0: no pairs.
  int pair_group;
};

// A CTA owns one (work item, kv head, block of query heads of the GQA group); at head_dim 64 in
// the NHD layout the kernel's kv head may be a pair of the pool's (DecodeParams::pair_group).
// Its 4 warps each run an independent cp.async pipeline over their own slice of kWarpTokens
// tokens of every tile and keep their own online-softmax state. Groups of up to 8 heads run in
// the key-rows layout (below); larger ones in blocks of 16 in the query-rows layout, the heads
// (padded to 16) as the M dimension of mma.m16n8k16. Warps merge in shared memory at the end,
// in a fixed order. head_dim 64 takes 32-token slices so that a stage moves as many bytes as at 128.
//
// An fp8 pool (kKvBytes 1) stages e4m3 bytes and widens them to fp16 as the fragments are
// loaded: ldmatrix reads the bytes as 16-bit pairs, so a K fragment holds 4 consecutive head
// dims (the query fragment is permuted to match) and a transposed V fragment two tokens of two
// dims (split into an even- and an odd-dim tile: the output dims are interleaved, undone when
// the accumulators are stored). Its warp slices hold twice bf16's tokens in the same bytes (64
// at head_dim 64, two per lane): the work per token, not the bytes in flight, bounds it (16-token
// slices with deeper rings measured slower). Not the conversions, though: widening by bit moves
// (seven integer operations per four bytes, the 2^-8 they leave folded into the scales) measured
// 1-12% slower than cvt.rn.f16x2.e4m3x2 on an H200, and a two-operation stand-in no faster (ncu:
// 27% of issue slots busy, waits on loads the largest stall). A pool with per-token scales also
// stages each token's K and V scale (4-byte copies in the same group): the K scale multiplies
// the token's logit, and the V scale times 256 its probability before P.V (the 256, undone
// exactly at the end, keeps the fp16 operand in the range a per-layer pool's probabilities use).
// ATTND_DECODE_FP8_TOKENS / _STAGES (head_dim 128, 256), _FP8_D64_TOKENS, _BF16_STAGES and
// _MIN_BLOCKS override the choices (benchmark experiments).
#ifndef ATTND_DECODE_FP8_TOKENS
#define ATTND_DECODE_FP8_TOKENS 32
#endif
#ifndef ATTND_DECODE_BF16_STAGES
#define ATTND_DECODE_BF16_STAGES 3
#endif
#ifndef ATTND_DECODE_MIN_BLOCKS
#define ATTND_DECODE_MIN_BLOCKS 2
#endif
#ifndef ATTND_DECODE_FP8_D64_TOKENS
#define ATTND_DECODE_FP8_D64_TOKENS 64
#endif
#ifndef ATTND_DECODE_FP8_STAGES
#define ATTND_DECODE_FP8_STAGES 3
#endif
// How many tiles before their end a column's CTAs signal programmatic dependents (PDL): the
// next decode or the merge then launches, and its CTAs take the slots ours free and run their
// prologue during our tail (their GridDependencyWait still waits for the whole grid). Measured
// on an H200 against signalling at the end: B1 L4096 11% faster, B16 2%, B32 L32768 1%. Only
// for a grid of one wave: behind a second wave it cost head_dim-64 fp8 3.5% (5% when signalled
// at the start); and not in deterministic mode (B1 2% slower). 0: at the end (experiments).
#ifndef ATTND_DECODE_TRIGGER_TILES
#define ATTND_DECODE_TRIGGER_TILES 4
#endif

// Key rows (GQA groups of up to 8 query heads): the mma runs transposed, s^T = K q^T and
// o^T = V^T p^T, so the keys fill its 16 rows and the group's heads its 8 columns: half the mmas
// of the query-rows layout, whose 16 rows a group of 4 fills a quarter of, and half its
// accumulator and query registers. A probability tile becomes p^T's operand by movmatrix.
// Measured on an H200 (decode_bench, same run): fp8 pools 1-16% faster (head_dim 256 most),
// bf16 0-1% (deterministic B1 10%).
// ATTND_DECODE_KEY_ROWS_BF16 / _FP8 = 0 keep every group on the query-rows layout (experiments).
#ifndef ATTND_DECODE_KEY_ROWS_BF16
#define ATTND_DECODE_KEY_ROWS_BF16 1
#endif
#ifndef ATTND_DECODE_KEY_ROWS_FP8
#define ATTND_DECODE_KEY_ROWS_FP8 1
#endif
constexpr int kKeyRowsMaxGroup = 8;

template <int D, int kKvBytes = 2, bool kPerTokenScales = false, bool kKeyRowsLayout = false,
          bool kHeadPairs = false>
struct DecodeTraits {
  static constexpr int kHeadDim = D;
  static constexpr bool kFp8 = kKvBytes == 1;
  static constexpr bool kTokenScales = kPerTokenScales;
  // Per-token scales of head pairs: a token's K and V scales of both pool heads of the pair.
  static constexpr int kScaleHeads = kPerTokenScales && kHeadPairs ? 2 : 1;
  static constexpr bool kKeyRows = kKeyRowsLayout;
  static constexpr bool kKeyRowsEnabled =
      kFp8 ? ATTND_DECODE_KEY_ROWS_FP8 != 0 : ATTND_DECODE_KEY_ROWS_BF16 != 0;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = kKeyRows ? kKeyRowsMaxGroup : 16;  // query rows per CTA
  // Tokens per warp per stage; a lane resolves kRowsPerLane of them.
  static constexpr int kWarpTokens = kFp8 ? (D == 64 ? ATTND_DECODE_FP8_D64_TOKENS
                                                     : ATTND_DECODE_FP8_TOKENS)
                                          : (D == 64 ? 32 : 16);
  static constexpr int kRowsPerLane = (kWarpTokens + 31) / 32;
  static constexpr int kSubTiles = kWarpTokens / 16;     // 16-token mma blocks per slice
  static constexpr int kTileTokens = kWarps * kWarpTokens;
  static constexpr int kStages =
      kFp8 ? (D == 64 ? (kWarpTokens == 64 ? 3 : 6) : ATTND_DECODE_FP8_STAGES)
           : ATTND_DECODE_BF16_STAGES;
  static constexpr int kRowBytes = D * kKvBytes;
  static constexpr int kChunks = kRowBytes / 16;             // 16-byte chunks per K/V row
  static constexpr int kChunkElems = 16 / kKvBytes;
  static constexpr int kQChunks = D / 8;                     // 16-byte chunks of a q/out row
  static constexpr int kLoadsPerLane = kWarpTokens * kChunks / 32;  // per K (or V) per stage
  static constexpr int kStageElems = 2 * kWarpTokens * D;    // K + V of one warp's slice
  static constexpr bool kQInRegs = kKeyRows || D <= 128;
  static constexpr int kMinBlocks = D == 256 ? 1 : ATTND_DECODE_MIN_BLOCKS;
  static constexpr int kPipeBytes = kWarps * kStages * kStageElems * kKvBytes;
  static constexpr int kQBytes = kRows * D * 2;
  static constexpr int kMergeBytes = 2 * kWarps * kRows * 4;  // per-warp m and l
  // Per-token scales: each warp stages its slice's K and V scales beside the K/V bytes.
  static constexpr int kScaleBytes =
      kTokenScales ? kWarps * kStages * 2 * kScaleHeads * kWarpTokens * 4 : 0;
  static constexpr int kSmemBytes = kPipeBytes + kQBytes + kMergeBytes + kScaleBytes;
  // The fp32 per-warp accumulators reuse the pipeline buffers at the end.
  static_assert(kWarps * kRows * D * 4 <= kPipeBytes, "merge scratch must fit the pipeline");
  static_assert(kChunks >= 4, "the swizzle needs 4 chunks per row");
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][kRowBytes] fp8 tile:
// rows of 8 or more chunks XOR by row & 7; rows of 4 (head_dim 64) pair up into 128-byte
// lines and XOR by (row / 2) & 3. Either way the 8 rows an ldmatrix reads hit 8 bank groups.
template <int kRowBytes>
__device__ __forceinline__ int SwzFp8(int row, int chunk) {
  if constexpr (kRowBytes >= 128) {
    return row * kRowBytes + ((chunk ^ (row & 7)) << 4);
  } else {
    return row * kRowBytes + ((chunk ^ ((row >> 1) & 3)) << 4);
  }
}

// Keys [16 sub, 16 sub + 16) of dims [32 dd, 32 dd + 32) of a warp's fp8 V stage, widened to
// fp16 pairs of two keys: a transposed ldmatrix of the bytes gives a thread keys 2c, 2c + 1 of
// dims 2g, 2g + 1 of each 16-dim block j, and the byte permute splits them into even[j][h]
// (dim 32 dd + 16 j + 2g) and odd[j][h] (that dim + 1), for keys 8h + 2c, 8h + 2c + 1.
template <int kRowBytes, typename KV>
__device__ __forceinline__ void LoadFp8VPairs(const KV* vs, int sub, int dd, int lane,
                                              uint32_t (&even)[2][2], uint32_t (&odd)[2][2]) {
  const int mi = lane >> 3;
  uint32_t vb[4];  // keys 0-7 | 8-15 of chunk 2 dd, then of chunk 2 dd + 1
  LdMatrixX4Trans(vb, SmemAddr(vs + SwzFp8<kRowBytes>(sub * 16 + ((mi & 1) << 3) + (lane & 7),
                                                      2 * dd + (mi >> 1))));
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      Fp8x4ToHalf2x2(__byte_perm(vb[2 * j + h], 0, 0x3120), even[j][h], odd[j][h]);
    }
}

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_DECODE_DECODE_PARAMS_CUH_
