// Hopper warpgroup MMA (wgmma.mma_async, sm_90a) helpers: shared-memory matrix descriptors for
// 128-byte-swizzled tiles, fences, and the m64nNk16 instructions the prefill kernel uses. The
// instruction wrappers are spelled out per shape because inline PTX needs one operand per
// accumulator register.
//
// Tile layout the descriptors describe ("swizzle atoms"): a [rows][cols] tile of 16-bit values is
// stored as cols / 64 atoms of [rows][64]; a row of an atom is 128 bytes whose 16-byte chunks are
// XOR-ed with (row & 7). Atoms start at multiples of 1024 bytes.
#ifndef ATTND_KERNELS_CUDA_COMMON_WGMMA_CUH_
#define ATTND_KERNELS_CUDA_COMMON_WGMMA_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace attnd::kernels::cuda::detail {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ATTND_WGMMA_AVAILABLE 1
#else
#define ATTND_WGMMA_AVAILABLE 0
#endif

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of `rows` rows.
__device__ __forceinline__ uint32_t SwizzledOffset(int rows, int row, int chunk) {
  const int atom_row = (chunk >> 3) * rows + row;
  return static_cast<uint32_t>((atom_row << 7) + (((chunk & 7) ^ (row & 7)) << 4));
}

// Descriptor of a 128-byte-swizzled operand at shared address `addr` (its atom 1024-aligned, or
// a 32-byte step into such a row). sbo: bytes between groups of 8 rows. lbo: bytes between atoms
// along the contiguous dimension (N-major operands wider than one atom; unused for K-major).
__device__ __forceinline__ uint64_t SmemDescriptor(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (uint64_t{1} << 62);
}

__device__ __forceinline__ void WgmmaFence() {
#if ATTND_WGMMA_AVAILABLE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WgmmaCommit() {
#if ATTND_WGMMA_AVAILABLE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void WgmmaWait() {
#if ATTND_WGMMA_AVAILABLE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Makes shared-memory writes of this thread (st.shared, cp.async) visible to wgmma's reads.
__device__ __forceinline__ void FenceProxyAsync() {
#if ATTND_WGMMA_AVAILABLE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving register reads or writes across an in-flight wgmma.
template <int N>
__device__ __forceinline__ void FenceRegisters(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// mbarriers in shared memory (phase-parity waits) and warpgroup register reallocation.
__device__ __forceinline__ void MbarInit(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Arrives on `bar` where `pred` holds, as one predicated instruction: a branch between a
// wgmma's issue and its wait makes ptxas wait for the wgmma before the branch.
__device__ __forceinline__ void MbarArriveIf(uint32_t bar, bool pred) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %1, 0;\n"
      "@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(bar),
      "r"(static_cast<int>(pred))
      : "memory");
}
// Arrives on `bar` once every cp.async this thread issued so far has landed, without waiting:
// the copy engine performs the arrival, which counts as one of the arrivals the barrier expects
// (.noinc). A reader still needs FenceProxyAsync after its wait before wgmma reads the data.
__device__ __forceinline__ void CpAsyncMbarArrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Returns once the phase with this parity has completed (a fresh barrier counts parity 1 as
// completed, so a producer's first wait on an "empty" barrier passes).
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Warpgroup register reallocation (all warps of the warpgroup execute it).
template <int N>
__device__ __forceinline__ void GrowRegisters() {
#if ATTND_WGMMA_AVAILABLE
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}
template <int N>
__device__ __forceinline__ void ShrinkRegisters() {
#if ATTND_WGMMA_AVAILABLE
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

template <typename T, int N>
struct Wgmma;

// Accumulator registers {%0, ..., %(N/2 - 1)} and their operands, per N.
#define ATTND_WGMMA_REGS_64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define ATTND_WGMMA_OPS_64 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define ATTND_WGMMA_REGS_128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define ATTND_WGMMA_OPS_128 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

// Wgmma<T, N>: the two forms attnd uses. SS: d (+)= A * B with A [64][16] and B [N][16], both
// K-major in shared memory. RS: d (+)= A * B with A [64][16] from registers (mma.m16n8k16 A
// fragments, one 16-row slice per warp) and B [16][N] N-major in shared memory (transposed on
// the fly). `accumulate` 0 overwrites d.
#if ATTND_WGMMA_AVAILABLE
#define ATTND_DEFINE_WGMMA(T, PTX, N, A0, A1, A2, A3, A4, A5)                                  \
  template <>                                                                                 \
  struct Wgmma<T, N> {                                                                        \
    static __device__ __forceinline__ void SS(float (&d)[N / 2], uint64_t a, uint64_t b,      \
                                              int accumulate) {                               \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" A2 ", 0;\n"                           \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " "          \
                   ATTND_WGMMA_REGS_##N ", %" A0 ", %" A1 ", p, 1, 1, 0, 0;\n}\n"            \
                   : ATTND_WGMMA_OPS_##N                                                      \
                   : "l"(a), "l"(b), "r"(accumulate));                                       \
    }                                                                                         \
    static __device__ __forceinline__ void RS(float (&d)[N / 2], const uint32_t (&a)[4],      \
                                              uint64_t b, int accumulate) {                   \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" A5 ", 0;\n"                           \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " "          \
                   ATTND_WGMMA_REGS_##N ", {%" A0 ", %" A1 ", %" A2 ", %" A3 "}, %" A4        \
                   ", p, 1, 1, 1;\n}\n"                                                      \
                   : ATTND_WGMMA_OPS_##N                                                      \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));   \
    }                                                                                         \
  };
#else
#define ATTND_DEFINE_WGMMA(T, PTX, N, A0, A1, A2, A3, A4, A5)                                  \
  template <>                                                                                 \
  struct Wgmma<T, N> {                                                                        \
    static __device__ __forceinline__ void SS(float (&)[N / 2], uint64_t, uint64_t, int) {}   \
    static __device__ __forceinline__ void RS(float (&)[N / 2], const uint32_t (&)[4],        \
                                              uint64_t, int) {}                               \
  };
#endif

// The operand numbers after the accumulators: N / 2, N / 2 + 1, ... (SS uses the first three).
ATTND_DEFINE_WGMMA(__nv_bfloat16, "bf16", 64, "32", "33", "34", "35", "36", "37")
ATTND_DEFINE_WGMMA(__half, "f16", 64, "32", "33", "34", "35", "36", "37")
ATTND_DEFINE_WGMMA(__nv_bfloat16, "bf16", 128, "64", "65", "66", "67", "68", "69")
ATTND_DEFINE_WGMMA(__half, "f16", 128, "64", "65", "66", "67", "68", "69")
#undef ATTND_DEFINE_WGMMA

}  // namespace attnd::kernels::cuda::detail

#endif  // ATTND_KERNELS_CUDA_COMMON_WGMMA_CUH_
