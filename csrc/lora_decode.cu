// Small-batch decode:  y (M, N) = x (M, K) @ W^T + scaling * (x @ A^T) @ B^T (+ bias),  M <= 16, in ONE launch.
//
// At M <= 16 the layer is a stream over W: 4096x14336 NF4 is 29 MB (about 7 us at the H200's 4.2 TB/s), the
// LoRA factors are 0.6 MB and x is at most 128 KB. So every weight byte is read once, in full 32-byte sectors,
// and everything else is arranged so that it does not compete with that stream:
//
// Tensor-core kernel (bf16/fp16, K % 64 == 0, NF4 blocks that divide K; see lora_decode.h):
//   * A warp owns a tile of 16 output rows (the M=16 side of mma.m16n8k16: W is the A operand, x the B
//     operand, one (M <= 8) or two (M <= 16) groups of 8 tokens) and streams K in iterations of 64 columns.
//     The dot product does not care about the order of k, so each lane takes 16 CONTIGUOUS k of its row
//     (8 NF4 bytes, or 2 x 16 bytes dense) and feeds them to the four mma k-steps in the matching order; the
//     same permutation applied to x keeps the products paired. The 4 lanes of a row read 32 contiguous bytes:
//     one full sector per row per iteration, 16 B/lane loads for dense W.
//   * NF4: an iteration's 64 k of a row lie in one quantization block (block size >= 64 divides K), so the
//     block's absmax is factored out of the dot product: the mma runs on the raw code values (rounded once to
//     x.dtype) and the fp32 partial sum is multiplied by the fp32 absmax. That is one rounding fewer than
//     dequantize-then-multiply, and it keeps the decode to one shared-memory load per weight byte: a
//     256-entry table maps a byte (two codes) straight to the packed pair of x.dtype values the mma takes,
//     replicated 32 times (word = byte * 32 + lane) so that 32 random bytes hit 32 different banks.
//     Double quantization: absmax = nested_code[q] * nested_absmax[blk / 256] + offset with explicit
//     __fmul_rn / __fadd_rn (no FMA contraction), the reference's arithmetic.
//     Why NF4 lanes load 8 bytes and not 16: an mma k-step takes 4 k from each of a row's 4 lanes, and absmax
//     factors out only of a step whose 16 k share a block; 32 contiguous k per lane would make every step
//     straddle two 64-blocks. The row's 4 lanes still read one full 32-byte sector per load instruction, and
//     the .L2::256B hint fetches the next iterations of the row with it.
//   * Latency: a ring of P iterations of loads per warp is in flight (P * 512 B per NF4 warp: 7 MB over the
//     1792 warps of 4096x14336, twice bandwidth x latency), and at entry each warp asks L2 for its
//     first P iterations with one bulk prefetch per row, so DRAM is busy while the block builds its tables
//     and its slice of S. W loads bypass L1 (L1::no_allocate) so that L1 keeps x, which every warp rereads.
//   * 2 or 4 warps of a block split one tile's K range (contiguous halves/quarters) when N alone gives fewer
//     than 8 warps per SM, and add their fp32 fragments in a fixed order.
//
// The LoRA term needs S = x @ A^T (M x r) in every block. Computing it per block would reread A
// (r*K*2 = 128 KB at r=16, K=4096) in each of the 448 blocks: 57 MB, twice W itself. Instead the grid is
// launched in clusters of 8 blocks; each block computes S over 1/8 of K (mma, the dense path on A), and
// after the main loop reads the other seven partial sums through distributed shared memory (in rank order,
// so every block holds bit-identical S): A is read once per cluster (56 x 128 KB = 7 MB of L2 traffic,
// L2-resident after the first clusters). The cluster barrier is split (arrive after S, wait after the main
// loop), so nobody waits for it.
// S stays fp32 (not rounded to x.dtype as PEFT does); the epilogue adds scaling * S @ B^T and bias in fp32
// and rounds y once.
//
// Measured (H200, 2026-11-29, scripts/decode_bench.cu; docs/PERF_NOTES.md log item 10): 4096->14336 NF4 at M=1
// takes 27-29 us in a CUDA graph against 8.3 us for a plain read of its 29 MB. With the decode skipped the stream
// alone takes ~12.7 us (about 2.3 TB/s, not the ~4 TB/s the bytes in flight above were sized for), and the
// decode/mma adds ~9 us that does not overlap it. Two bulk-copy (cp.async.bulk + mbarrier) designs measured
// slower (36.6 and 52.6 us), so this register-ring kernel stays.
//
// General kernel (anything else: fp32, odd K, blocks straddling rows, misaligned pointers): CUDA cores, one
// warp per output row at a time, per-element NF4 decode with the reference's exact fp32 dequantization;
// S through the same cluster scheme. Correct for every shape; not tuned.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "cuda_common.cuh"
#include "lora_decode.h"

// Thread-block clusters, the split cluster barrier and the bulk L2 prefetch are sm_90 instructions. For older
// architectures (sm_80/86/89 in a multi-architecture build) the kernels compile to a trap and the host entry
// refuses the call (lora_ops_lora_decode: cudaErrorNotSupported), so lora_linear keeps the training path there.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define LORA_OPS_DECODE_SM90 0
#pragma nv_diag_suppress 177  // the helpers only the sm_90 kernels call are unused here
#else
#define LORA_OPS_DECODE_SM90 1
#endif

namespace cg = cooperative_groups;

namespace {

using lora_ops::from_f32;
using lora_ops::to_f32;
using lora_ops::warp_sum;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kCluster = 8;                      // portable maximum; every block computes 1/8 of S
constexpr int kMaxM = LORA_OPS_DECODE_MAX_M;
constexpr int kMaxRank = LORA_OPS_DECODE_MAX_RANK;
constexpr int kTileN = 16;                       // output rows per warp (the mma's M)
constexpr int kIterK = 64;                       // k per warp iteration: four k16 mma steps
constexpr int kSFullWords = kMaxM * (kMaxRank + 1);  // S at an odd row stride: a row's 4 lanes, 4 banks
constexpr int kTableWords = 256 * 32;            // byte -> packed code pair, one copy per bank (32 KB)
constexpr int kGeneralRowsPerWarp = 4;
static_assert(kMaxM == 16, "the tensor-core kernel covers M with at most two groups of 8 tokens");
static_assert(kSFullWords <= kTableWords, "S reuses the NF4 table's shared memory");

enum Format { kDense = 0, kNf4 = 1, kNf4Nested = 2 };

// Diagnostics build only (scripts/decode_bench.cu compiles this file with -DLORA_OPS_DECODE_DIAG=1): the
// environment variable LORA_OPS_DECODE_DIAG=<mask> leaves stages out so that each one's cost can be timed by
// difference (the results are then wrong). In every other build the mask is the constant 0 and the branches
// compile away.
#ifndef LORA_OPS_DECODE_DIAG
#define LORA_OPS_DECODE_DIAG 0
#endif
enum Diag {
  kDiagNoS = 1,            // no S slice (S = 0); the cluster barriers stay
  kDiagNoLoraEpilogue = 2,  // the epilogue skips scaling * S @ B^T (no B loads)
  kDiagLoadsOnly = 4,      // the main loop loads W but does no decode or mma
  kDiagNoMainLoop = 8,     // no main loop at all: what is left is the fixed cost
  kDiagNoTable = 16,       // no NF4 pair table fill
  kDiagNoPrefetch = 32,    // no bulk L2 prefetch at entry
  kDiagNoCluster = 64,     // plain launch (each block computes all of S)
};

// Ring depth (iterations in flight per warp): the largest that compiles without spills at 128 registers
// (ptxas -v for sm_90: double quant with two token groups spills at 6 slots, so it gets 5).
template <int FMT, int MT>
struct Depth {
  static constexpr int value = FMT == kDense ? (MT == 1 ? 4 : 3) : FMT == kNf4 ? (MT == 1 ? 8 : 6) : (MT == 1 ? 8 : 5);
};

struct Params {
  const void* x;
  const void* w;
  const void* absmax;
  const float* nested_absmax;
  const float* nested_code;
  const float* offset;
  const float* codebook;
  const void* A;
  const void* B;
  const void* bias;
  void* y;
  int M, N, K, r;
  int bs_log2;    // log2(NF4 block size)
  int ksplit;     // tensor-core kernel: warps sharing one row tile (1, 2 or 4)
  float scaling;
  int diag;       // Diag mask; always 0 outside the diagnostics build
};

__device__ __forceinline__ bool diag(const Params& p, int bit) { return LORA_OPS_DECODE_DIAG && (p.diag & bit); }

// ------------------------------------------------------------------------------------------ small helpers

// Two values as the 32-bit register an mma operand takes: `lo` is the element of the lower k.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  uint32_t u;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&u, &h, 4);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "pack_pair: __half or __nv_bfloat16");
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &h, 4);
  }
  return u;
}

// D = A (16x16, row) * B (16x8, col) + D with fp32 accumulation. Fragments (PTX ISA, m16n8k16): lane = 4g + t;
// a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]; b0 = B[2t..2t+1][g],
// b1 = B[2t+8..][g]; d0,d1 = D[g][2t..2t+1], d2,d3 = D[g+8][2t..2t+1].
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Streaming loads of W: read once, so they skip L1 (which keeps x) and ask L2 for the whole 256 B line pair
// that the next iterations of the same row will want.
__device__ __forceinline__ uint2 ld_stream_v2(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 ld_stream_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Bulk prefetch of [p, p + bytes) into L2 (sm_90; p 16-byte aligned, bytes a multiple of 16). No registers.
#if LORA_OPS_DECODE_SM90
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
}

// The split cluster barrier: arrive (release this thread's shared-memory writes) ... wait (acquire the others').
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }
#endif

template <typename T>
__device__ __forceinline__ T ld_ro(const T* p) { return __ldg(p); }

__device__ __forceinline__ uint32_t word_of(const uint4& lo, const uint4& hi, int w) {
  const uint4& h = w < 4 ? lo : hi;
  switch (w & 3) {
    case 0: return h.x;
    case 1: return h.y;
    case 2: return h.z;
    default: return h.w;
  }
}

// -------------------------------------------------------------------------------- tensor-core kernel parts

template <int FMT>
struct Slot;
template <>
struct Slot<kDense> {  // 16 contiguous k of rows g and g+8 (2 x 16 B each)
  uint4 r0lo, r0hi, r1lo, r1hi;
};
template <>
struct Slot<kNf4> {  // 16 contiguous k of rows g and g+8 (8 bytes each) and the rows' fp32 absmax
  uint2 r0, r1;
  float s0, s1;
};
template <>
struct Slot<kNf4Nested> {  // ... with the two rows' 8-bit absmax codes (q0 | q1 << 8) and their nested absmax
  uint2 r0, r1;
  uint32_t q;
  float n0, n1;
};

// This lane's x: token mt*8 + g (clamped to M-1: columns of tokens >= M are computed, never stored), at k = 16t.
template <typename T, int MT>
struct XRows {
  const T* p[MT];
};

template <typename T, int MT>
__device__ __forceinline__ void load_x(const XRows<T, MT>& xr, int it, uint4 (&xv)[MT][2]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const uint4* px = reinterpret_cast<const uint4*>(xr.p[mt] + static_cast<int64_t>(it) * kIterK);
    xv[mt][0] = __ldg(px);
    xv[mt][1] = __ldg(px + 1);
  }
}

// acc += rows (g, g+8) x tokens over one iteration of dense rows (W, or A for S).
template <typename T, int MT>
__device__ __forceinline__ void mma_dense(const Slot<kDense>& s, const uint4 (&xv)[MT][2], float (&acc)[MT][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t a0 = word_of(s.r0lo, s.r0hi, 2 * i), a1 = word_of(s.r1lo, s.r1hi, 2 * i);
    const uint32_t a2 = word_of(s.r0lo, s.r0hi, 2 * i + 1), a3 = word_of(s.r1lo, s.r1hi, 2 * i + 1);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      mma16816<T>(acc[mt], a0, a1, a2, a3, word_of(xv[mt][0], xv[mt][1], 2 * i),
                  word_of(xv[mt][0], xv[mt][1], 2 * i + 1));
  }
}

// The packed code pair of byte j of r (table word = byte * 32 + lane; lane4 = lane * 4 has no bit in 0x7f80).
__device__ __forceinline__ uint32_t code_pair(const uint32_t* table, uint32_t r, int j, uint32_t lane4) {
  const uint32_t shifted = j == 0 ? (r << 7) : (r >> (8 * j - 7));
  const uint32_t off = (shifted & 0x7f80u) | lane4;
  return *reinterpret_cast<const uint32_t*>(reinterpret_cast<const char*>(table) + off);
}

template <typename T, int MT>
__device__ __forceinline__ void mma_nf4(uint2 r0, uint2 r1, const uint4 (&xv)[MT][2], float (&part)[MT][4],
                                        const uint32_t* table, uint32_t lane4) {
  // Step i takes k = 16t + 4i .. 4i+3 of the lane's 16: bytes 2i and 2i+1 of its 8 (element 2j = high nibble,
  // which the table puts in the low half, the lower k).
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t w0 = i < 2 ? r0.x : r0.y, w1 = i < 2 ? r1.x : r1.y;
    const int j = 2 * (i & 1);
    const uint32_t a0 = code_pair(table, w0, j, lane4), a1 = code_pair(table, w1, j, lane4);
    const uint32_t a2 = code_pair(table, w0, j + 1, lane4), a3 = code_pair(table, w1, j + 1, lane4);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      mma16816<T>(part[mt], a0, a1, a2, a3, word_of(xv[mt][0], xv[mt][1], 2 * i),
                  word_of(xv[mt][0], xv[mt][1], 2 * i + 1));
  }
}

// Where one warp's rows are: byte pointers of this lane's chunk of rows g and g+8 at iteration 0, and (NF4) the
// absmax index of those rows' first block.
struct RowPtrs {
  const char* w0;
  const char* w1;
  int64_t b0, b1;
};

template <typename T, int FMT>
__device__ __forceinline__ void load_slot(Slot<FMT>& s, const Params& p, const RowPtrs& rp, int it) {
  if constexpr (FMT == kDense) {
    const char* q0 = rp.w0 + static_cast<int64_t>(it) * kIterK * sizeof(T);
    const char* q1 = rp.w1 + static_cast<int64_t>(it) * kIterK * sizeof(T);
    s.r0lo = ld_stream_v4(q0);
    s.r0hi = ld_stream_v4(q0 + 16);
    s.r1lo = ld_stream_v4(q1);
    s.r1hi = ld_stream_v4(q1 + 16);
  } else {
    s.r0 = ld_stream_v2(rp.w0 + static_cast<int64_t>(it) * (kIterK / 2));
    s.r1 = ld_stream_v2(rp.w1 + static_cast<int64_t>(it) * (kIterK / 2));
    // blocksize >= 64 divides K, so iteration it of a row lies in the row's block it >> log2(blocksize / 64).
    const int64_t blk0 = rp.b0 + (it >> (p.bs_log2 - 6)), blk1 = rp.b1 + (it >> (p.bs_log2 - 6));
    if constexpr (FMT == kNf4) {
      s.s0 = __ldg(static_cast<const float*>(p.absmax) + blk0);
      s.s1 = __ldg(static_cast<const float*>(p.absmax) + blk1);
    } else {
      s.q = static_cast<uint32_t>(__ldg(static_cast<const uint8_t*>(p.absmax) + blk0)) |
            (static_cast<uint32_t>(__ldg(static_cast<const uint8_t*>(p.absmax) + blk1)) << 8);
      s.n0 = __ldg(p.nested_absmax + (blk0 >> 8));
      s.n1 = __ldg(p.nested_absmax + (blk1 >> 8));
    }
  }
}

template <typename T, int FMT, int MT>
__device__ __forceinline__ void compute_slot(const Slot<FMT>& s, const XRows<T, MT>& xr, int it, float (&acc)[MT][4],
                                             const uint32_t* table, uint32_t lane4, const float* s_ncode,
                                             float offset) {
  uint4 xv[MT][2];
  load_x<T, MT>(xr, it, xv);
  if constexpr (FMT == kDense) {
    mma_dense<T, MT>(s, xv, acc);
  } else {
    float part[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) part[mt][0] = part[mt][1] = part[mt][2] = part[mt][3] = 0.0f;
    mma_nf4<T, MT>(s.r0, s.r1, xv, part, table, lane4);
    float sc0, sc1;
    if constexpr (FMT == kNf4) {
      sc0 = s.s0;
      sc1 = s.s1;
    } else {  // bitsandbytes' reconstruction: product, then sum, each rounded (no FMA)
      sc0 = __fadd_rn(__fmul_rn(s_ncode[s.q & 0xffu], s.n0), offset);
      sc1 = __fadd_rn(__fmul_rn(s_ncode[s.q >> 8], s.n1), offset);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      acc[mt][0] = fmaf(part[mt][0], sc0, acc[mt][0]);
      acc[mt][1] = fmaf(part[mt][1], sc0, acc[mt][1]);
      acc[mt][2] = fmaf(part[mt][2], sc1, acc[mt][2]);
      acc[mt][3] = fmaf(part[mt][3], sc1, acc[mt][3]);
    }
  }
}

// Iterations [it_begin, it_end) of one row tile with P iterations of loads in flight.
template <typename T, int FMT, int MT, int P>
__device__ __forceinline__ void stream_tile(const Params& p, const RowPtrs& rp, const XRows<T, MT>& xr, int it_begin,
                                            int it_end, float (&acc)[MT][4], const uint32_t* table, uint32_t lane4,
                                            const float* s_ncode, float offset) {
  Slot<FMT> ring[P];
#pragma unroll
  for (int s = 0; s < P; ++s)
    if (it_begin + s < it_end) load_slot<T, FMT>(ring[s], p, rp, it_begin + s);
  for (int base = it_begin; base < it_end; base += P) {
#pragma unroll
    for (int s = 0; s < P; ++s) {
      const int it = base + s;
      if (it < it_end) {
        const Slot<FMT> cur = ring[s];
        if (it + P < it_end) load_slot<T, FMT>(ring[s], p, rp, it + P);
        if (diag(p, kDiagLoadsOnly))  // wait for the slot's bytes, skip the work
          acc[0][0] += __uint_as_float(reinterpret_cast<const uint32_t&>(cur) & 1u);
        else
          compute_slot<T, FMT, MT>(cur, xr, it, acc, table, lane4, s_ncode, offset);
      }
    }
  }
}

// This block's slice of S = x @ A^T: k iterations [rank * per, ...) of the cluster's split, all r, fp32, written
// to s_part[m * r + j] for m < M, j < r (zeros where the slice is empty). The four warps take interleaved
// iterations and their fragments are added in warp order.
template <typename T, int MT>
__device__ void lora_s_slice_tc(const Params& p, const XRows<T, MT>& xr, float* s_part, float* s_red,
                                unsigned rank, unsigned csize, int warp, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const int nit = p.K / kIterK;
  const int per = (nit + static_cast<int>(csize) - 1) / static_cast<int>(csize);
  const int begin = min(nit, static_cast<int>(rank) * per), end = min(nit, begin + per);
  const T* A = static_cast<const T*>(p.A);
  for (int rt = 0; rt * kTileN < p.r; ++rt) {
    float acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.0f;
    const int j0 = min(rt * kTileN + g, p.r - 1), j1 = min(rt * kTileN + g + 8, p.r - 1);
    const T* a0 = A + static_cast<int64_t>(j0) * p.K + 16 * t;
    const T* a1 = A + static_cast<int64_t>(j1) * p.K + 16 * t;
    for (int it = begin + warp; it < end; it += kWarps) {
      // A is reread by every cluster: default caching (L2-resident after the first cluster), unlike W.
      Slot<kDense> s;
      const uint4* q0 = reinterpret_cast<const uint4*>(a0 + static_cast<int64_t>(it) * kIterK);
      const uint4* q1 = reinterpret_cast<const uint4*>(a1 + static_cast<int64_t>(it) * kIterK);
      s.r0lo = __ldg(q0);
      s.r0hi = __ldg(q0 + 1);
      s.r1lo = __ldg(q1);
      s.r1hi = __ldg(q1 + 1);
      uint4 xv[MT][2];
      load_x<T, MT>(xr, it, xv);
      mma_dense<T, MT>(s, xv, acc);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c) s_red[(warp * 8 + mt * 4 + c) * 32 + lane] = acc[mt][c];
    __syncthreads();
    for (int idx = threadIdx.x; idx < MT * 4 * 32; idx += kThreads) {
      const int e = idx >> 5, l = idx & 31;
      float v = s_red[(0 * 8 + e) * 32 + l];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) v += s_red[(w * 8 + e) * 32 + l];
      const int j = rt * kTileN + (l >> 2) + ((e & 2) ? 8 : 0);
      const int m = (e >> 2) * 8 + 2 * (l & 3) + (e & 1);
      if (j < p.r && m < p.M) s_part[m * p.r + j] = v;
    }
    __syncthreads();
  }
}

// 256 x 32 words: word (byte * 32 + lane) = the packed pair (code[byte >> 4], code[byte & 15]) in T.
template <typename T>
__device__ __forceinline__ void fill_pair_table(uint32_t* table, const float* __restrict__ codebook) {
  // uint4 q covers words 4q..4q+3, all of entry q >> 3; with 128 threads: high code = s, low code = tid >> 3.
  const float lo_in_byte = __ldg(codebook + (threadIdx.x >> 3));
#pragma unroll 4
  for (int s = 0; s < kTableWords / 4 / kThreads; ++s) {
    const uint32_t v = pack_pair<T>(__ldg(codebook + s), lo_in_byte);
    reinterpret_cast<uint4*>(table)[threadIdx.x + s * kThreads] = make_uint4(v, v, v, v);
  }
}
static_assert(kThreads == 128 && kTableWords / 4 / kThreads == 16, "fill_pair_table's index arithmetic");

#if LORA_OPS_DECODE_SM90
// S = sum over the cluster's blocks of their slices, in rank order (bit-identical in every block), into s_full
// with row stride rs.
__device__ __forceinline__ void gather_s(const Params& p, const cg::cluster_group& cluster, float* s_part,
                                         float* s_full, int rs) {
  const unsigned csize = cluster.num_blocks();
  const int mr = p.M * p.r;
  for (int idx = threadIdx.x; idx < mr; idx += kThreads) {
    float v = 0.0f;
    for (unsigned q = 0; q < csize; ++q) v += cluster.map_shared_rank(s_part, q)[idx];
    const int m = idx / p.r;
    s_full[m * rs + (idx - m * p.r)] = v;
  }
}
#endif

// y[m][n] = acc + scaling * (S[m] . B[n]) + bias[n], in fp32, rounded once; only m < M, n < N.
template <typename T>
__device__ __forceinline__ float lora_dot(const Params& p, const float* s_row, int n) {
  const T* brow = static_cast<const T*>(p.B) + static_cast<int64_t>(n) * p.r;
  float l = 0.0f;
  for (int j = 0; j < p.r; ++j) l = fmaf(s_row[j], to_f32(ld_ro(brow + j)), l);
  return l;
}

template <typename T, int MT>
__device__ __forceinline__ void epilogue_tc(const Params& p, const float (&acc)[MT][4], const float* s_full, int rs,
                                            int tile, int g, int t) {
  T* y = static_cast<T*>(p.y);
  const T* B = static_cast<const T*>(p.B);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int n = tile * kTileN + g + 8 * h;
    if (n >= p.N) continue;
    float l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) l[mt][0] = l[mt][1] = 0.0f;
    const T* brow = B + static_cast<int64_t>(n) * p.r;
    for (int j = 0; j < (diag(p, kDiagNoLoraEpilogue) ? 0 : p.r); ++j) {
      const float b = to_f32(ld_ro(brow + j));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int c = 0; c < 2; ++c) l[mt][c] = fmaf(s_full[(mt * 8 + 2 * t + c) * rs + j], b, l[mt][c]);
    }
    const float bias = p.bias ? to_f32(ld_ro(static_cast<const T*>(p.bias) + n)) : 0.0f;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int m = mt * 8 + 2 * t + c;
        if (m < p.M)
          y[static_cast<int64_t>(m) * p.N + n] = from_f32<T>(acc[mt][2 * h + c] + p.scaling * l[mt][c] + bias);
      }
  }
}

template <typename T, int FMT, int MT>
__global__ void __launch_bounds__(kThreads, 4) lora_decode_tc_kernel(const Params p) {
#if LORA_OPS_DECODE_SM90
  constexpr int P = Depth<FMT, MT>::value;
  constexpr int kUnionWords = FMT == kDense ? kSFullWords : kTableWords;
  constexpr int kIterBytes = FMT == kDense ? kIterK * static_cast<int>(sizeof(T)) : kIterK / 2;
  __shared__ __align__(16) uint32_t s_union[kUnionWords];  // NF4 table during the main loop, then S
  __shared__ __align__(16) float s_part[kMaxM * kMaxRank];  // this block's slice of S (read by the cluster)
  __shared__ __align__(16) float s_red[kWarps * 8 * 32];    // fragments of the 4 warps
  __shared__ float s_ncode[FMT == kNf4Nested ? 256 : 1];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), csize = cluster.num_blocks();

  const int tile = blockIdx.x * (kWarps / p.ksplit) + warp / p.ksplit;
  const int ks = warp % p.ksplit;
  const bool has_tile = tile * kTileN < p.N;
  const int nit = p.K / kIterK;
  const int it_begin = static_cast<int>(static_cast<int64_t>(nit) * ks / p.ksplit);
  const int it_end = static_cast<int>(static_cast<int64_t>(nit) * (ks + 1) / p.ksplit);
  const int64_t row_bytes = FMT == kDense ? static_cast<int64_t>(p.K) * static_cast<int64_t>(sizeof(T)) : p.K / 2;
  const char* W = static_cast<const char*>(p.w);

  // (1) Start DRAM on this warp's first P iterations (one bulk L2 prefetch per row) before anything waits.
  if (has_tile && lane < kTileN && it_begin < it_end && tile * kTileN + lane < p.N && !diag(p, kDiagNoPrefetch)) {
    const int64_t row = static_cast<int64_t>(tile) * kTileN + lane;
    prefetch_l2(W + row * row_bytes + static_cast<int64_t>(it_begin) * kIterBytes,
                static_cast<uint32_t>(min(P, it_end - it_begin) * kIterBytes));
  }

  XRows<T, MT> xr;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    xr.p[mt] = static_cast<const T*>(p.x) + static_cast<int64_t>(min(mt * 8 + g, p.M - 1)) * p.K + 16 * t;

  // (2) Tables from lora_ops.nf4's constants (device tensors; never literals here).
  if constexpr (FMT != kDense)
    if (!diag(p, kDiagNoTable)) fill_pair_table<T>(s_union, p.codebook);
  if constexpr (FMT == kNf4Nested)
    for (int i = threadIdx.x; i < 256; i += kThreads) s_ncode[i] = __ldg(p.nested_code + i);
  __syncthreads();

  // (3) This block's slice of S, published to the cluster (the wait comes after the main loop).
  if (diag(p, kDiagNoS)) {
    for (int i = threadIdx.x; i < p.M * p.r; i += kThreads) s_part[i] = 0.0f;
    __syncthreads();
  } else {
    lora_s_slice_tc<T, MT>(p, xr, s_part, s_red, rank, csize, warp, lane);
  }
  cluster_arrive();

  // (4) The stream over W.
  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.0f;
  if (has_tile && !diag(p, kDiagNoMainLoop)) {
    // Rows past N (the last tile) read row N-1 and are never stored.
    const int64_t row0 = min(tile * kTileN + g, p.N - 1), row1 = min(tile * kTileN + g + 8, p.N - 1);
    RowPtrs rp;
    rp.w0 = W + row0 * row_bytes + t * (kIterBytes / 4);
    rp.w1 = W + row1 * row_bytes + t * (kIterBytes / 4);
    rp.b0 = rp.b1 = 0;
    float offset = 0.0f;
    if constexpr (FMT != kDense) {
      const int64_t blocks_per_row = static_cast<int64_t>(p.K) >> p.bs_log2;
      rp.b0 = row0 * blocks_per_row;
      rp.b1 = row1 * blocks_per_row;
    }
    if constexpr (FMT == kNf4Nested) offset = __ldg(p.offset);
    stream_tile<T, FMT, MT, P>(p, rp, xr, it_begin, it_end, acc, s_union, static_cast<uint32_t>(lane) << 2, s_ncode,
                               offset);
  }

  // (5) Warps that split a tile's K add their fragments in order (ks = 0, 1, ...).
  if (p.ksplit > 1) {
    if (has_tile && ks != 0)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int c = 0; c < 4; ++c) s_red[(warp * 8 + mt * 4 + c) * 32 + lane] = acc[mt][c];
    __syncthreads();
    if (has_tile && ks == 0)
      for (int q = 1; q < p.ksplit; ++q)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[mt][c] += s_red[((warp + q) * 8 + mt * 4 + c) * 32 + lane];
  }
  __syncthreads();  // the table is dead: s_union becomes S

  // (6) S from the cluster's slices, then (7) the epilogue. No block leaves while another may read its s_part.
  cluster_wait();
  float* s_full = reinterpret_cast<float*>(s_union);
  const int rs = p.r | 1;
  gather_s(p, cluster, s_part, s_full, rs);
  __syncthreads();
  cluster_arrive();
  if (has_tile && ks == 0) epilogue_tc<T, MT>(p, acc, s_full, rs, tile, g, t);
  cluster_wait();
#else
  __trap();  // not launched: the host refuses sm < 90 (see LORA_OPS_DECODE_SM90)
#endif
}

// ----------------------------------------------------------------------------------------- general kernel

// W[n][k] in fp32 exactly as lora_ops.nf4.reference_dequantize_nf4 computes it before its final rounding.
template <typename T, bool NF4>
__device__ __forceinline__ float weight_at(const Params& p, int64_t f, const float* s_code, const float* s_ncode,
                                           float offset) {
  if constexpr (!NF4) {
    return to_f32(ld_ro(static_cast<const T*>(p.w) + f));
  } else {
    const uint32_t byte = __ldg(static_cast<const uint8_t*>(p.w) + (f >> 1));
    const uint32_t code = (f & 1) ? (byte & 15u) : (byte >> 4);
    const int64_t blk = f >> p.bs_log2;
    float scale;
    if (p.nested_absmax != nullptr)
      scale = __fadd_rn(__fmul_rn(s_ncode[__ldg(static_cast<const uint8_t*>(p.absmax) + blk)],
                                  __ldg(p.nested_absmax + (blk >> 8))),
                        offset);
    else
      scale = __ldg(static_cast<const float*>(p.absmax) + blk);
    return __fmul_rn(s_code[code], scale);
  }
}

// One warp's dot products of the M rows of x with a row w over k in [kb, ke): lanes stride k by 32 (w_at(k) is the
// row's fp32 value at k), fp32 fmaf, then a warp sum; store(m, sum) runs in lane m for each m < M.
template <typename T, typename WeightAt, typename Store>
__device__ __forceinline__ void warp_x_dot(const Params& p, int64_t kb, int64_t ke, int lane, WeightAt w_at,
                                           Store store) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t K = p.K;
  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.0f;
  for (int64_t k = kb + lane; k < ke; k += 32) {
    const float w = w_at(k);
#pragma unroll
    for (int m = 0; m < kMaxM; ++m)
      if (m < p.M) acc[m] = fmaf(to_f32(ld_ro(x + m * K + k)), w, acc[m]);
  }
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    const float v = warp_sum(acc[m]);
    if (m < p.M && lane == m) store(m, v);
  }
}

template <typename T, bool NF4>
__global__ void __launch_bounds__(kThreads) lora_decode_general_kernel(const Params p) {
#if LORA_OPS_DECODE_SM90
  __shared__ float s_code[16];
  __shared__ float s_ncode[256];
  __shared__ float s_part[kMaxM * kMaxRank];
  __shared__ float s_full[kSFullWords];
  __shared__ float s_rows[kWarps][kGeneralRowsPerWarp][kMaxM];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), csize = cluster.num_blocks();
  const int64_t K = p.K;
  float offset = 0.0f;
  if constexpr (NF4) {
    if (threadIdx.x < 16) s_code[threadIdx.x] = __ldg(p.codebook + threadIdx.x);
    if (p.nested_absmax != nullptr) {
      for (int i = threadIdx.x; i < 256; i += kThreads) s_ncode[i] = __ldg(p.nested_code + i);
      offset = __ldg(p.offset);
    }
  }
  __syncthreads();

  // This block's slice of S: k in [rank * kc, ...), warp w takes j = w, w + 4, ...
  const int64_t kc = (K + csize - 1) / csize;
  const int64_t kb = min(K, static_cast<int64_t>(rank) * kc), ke = min(K, kb + kc);
  for (int j = warp; j < p.r; j += kWarps) {
    const T* arow = static_cast<const T*>(p.A) + static_cast<int64_t>(j) * K;
    warp_x_dot<T>(
        p, kb, ke, lane, [&](int64_t k) { return to_f32(ld_ro(arow + k)); },
        [&](int m, float v) { s_part[m * p.r + j] = v; });
  }
  __syncthreads();
  cluster_arrive();

  const int row_base = (blockIdx.x * kWarps + warp) * kGeneralRowsPerWarp;
  for (int rr = 0; rr < kGeneralRowsPerWarp; ++rr) {
    const int n = row_base + rr;
    if (n >= p.N) break;
    const int64_t row = static_cast<int64_t>(n) * K;
    warp_x_dot<T>(
        p, 0, K, lane, [&](int64_t k) { return weight_at<T, NF4>(p, row + k, s_code, s_ncode, offset); },
        [&](int m, float v) { s_rows[warp][rr][m] = v; });
  }

  cluster_wait();
  const int rs = p.r | 1;
  gather_s(p, cluster, s_part, s_full, rs);
  __syncthreads();
  cluster_arrive();
  for (int rr = 0; rr < kGeneralRowsPerWarp; ++rr) {
    const int n = row_base + rr;
    if (n >= p.N) break;
    if (lane < p.M) {
      const float bias = p.bias ? to_f32(ld_ro(static_cast<const T*>(p.bias) + n)) : 0.0f;
      const float v = s_rows[warp][rr][lane] + p.scaling * lora_dot<T>(p, s_full + lane * rs, n) + bias;
      static_cast<T*>(p.y)[static_cast<int64_t>(lane) * p.N + n] = from_f32<T>(v);
    }
  }
  cluster_wait();
#else
  __trap();  // not launched: the host refuses sm < 90 (see LORA_OPS_DECODE_SM90)
#endif
}

// ----------------------------------------------------------------------------------------------- launch

int sm_count() {
  static int cache[64] = {0};  // per device; a benign race fills it with the same value
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (dev >= 0 && dev < 64 && cache[dev] > 0) return cache[dev];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
  if (dev >= 0 && dev < 64) cache[dev] = n;
  return n;
}

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

int ilog2(int64_t v) {
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

bool valid_args(const LoraOpsDecodeArgs* a) {
  if (a == nullptr || !a->x || !a->weight || !a->lora_A || !a->lora_B || !a->y) return false;
  if (a->M < 1 || a->M > kMaxM || a->r < 1 || a->r > kMaxRank || a->N < 1 || a->K < 1) return false;
  if (a->N > 0x7fffffffLL || a->K > 0x7fffffffLL) return false;
  if (a->kind != LORA_OPS_FLOAT32 && a->kind != LORA_OPS_FLOAT16 && a->kind != LORA_OPS_BFLOAT16) return false;
  if (a->weight_format == LORA_OPS_DECODE_NF4) {
    if (!a->absmax || !a->codebook || !is_pow2(a->blocksize) || a->blocksize < 2 || a->blocksize > (1 << 30))
      return false;
    const bool nested = a->nested_absmax != nullptr;
    if ((a->nested_code != nullptr) != nested || (a->offset != nullptr) != nested) return false;
    return true;
  }
  return a->weight_format == LORA_OPS_DECODE_DENSE;
}

int choose_path(const LoraOpsDecodeArgs* a) {
  if (a->kind == LORA_OPS_FLOAT32 || a->K % kIterK != 0) return LORA_OPS_DECODE_PATH_GENERAL;
  if (!aligned16(a->x) || !aligned16(a->weight) || !aligned16(a->lora_A)) return LORA_OPS_DECODE_PATH_GENERAL;
  if (a->weight_format == LORA_OPS_DECODE_NF4 && (a->blocksize < kIterK || a->K % a->blocksize != 0))
    return LORA_OPS_DECODE_PATH_GENERAL;
  return LORA_OPS_DECODE_PATH_TENSOR_CORE;
}

// Clusters of kCluster blocks (the grid padded to a multiple; padding blocks only help with S). Should a
// cluster launch be refused, the same kernel runs without clusters: each block is then a cluster of one and
// computes all of S itself (correct, more L2 traffic).
cudaError_t launch_clustered(void (*kernel)(Params), int blocks, const Params& p, cudaStream_t stream) {
  if (LORA_OPS_DECODE_DIAG && (p.diag & kDiagNoCluster)) {
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  const int padded = (blocks + kCluster - 1) / kCluster * kCluster;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(padded), 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kCluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (cudaLaunchKernelEx(&cfg, kernel, p) == cudaSuccess) return cudaSuccess;
  (void)cudaGetLastError();
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// LORA_OPS_DECODE_KSPLIT=1|2|4 fixes the split (a tuning knob for the timing test); anything else: automatic.
int ksplit_override() {
  const char* s = getenv("LORA_OPS_DECODE_KSPLIT");
  if (s == nullptr) return 0;
  const int v = atoi(s);
  return (v == 1 || v == 2 || v == 4) ? v : 0;
}

template <typename T>
cudaError_t launch_tc(const Params& p, int fmt, cudaStream_t stream) {
  // Bytes in flight: each warp keeps P iterations of loads outstanding, so the warp count sets the total. Split
  // a tile's K over 2 or 4 warps until there are >= 8 warps per SM (4096->14336: 896 tiles x 2 = 1792 warps,
  // 7 MB in flight against the ~3.5 MB that bandwidth x latency asks for).
  const int tiles = (p.N + kTileN - 1) / kTileN;
  Params q = p;
  q.ksplit = ksplit_override();
  if (q.ksplit == 0) {
    q.ksplit = 1;
    while (q.ksplit < kWarps && static_cast<int64_t>(tiles) * q.ksplit < 8LL * sm_count()) q.ksplit *= 2;
  }
  const int tiles_per_block = kWarps / q.ksplit;
  const int blocks = (tiles + tiles_per_block - 1) / tiles_per_block;
  const bool two = p.M > 8;
  switch (fmt) {
    case kDense:
      return launch_clustered(two ? lora_decode_tc_kernel<T, kDense, 2> : lora_decode_tc_kernel<T, kDense, 1>, blocks,
                              q, stream);
    case kNf4:
      return launch_clustered(two ? lora_decode_tc_kernel<T, kNf4, 2> : lora_decode_tc_kernel<T, kNf4, 1>, blocks, q,
                              stream);
    default:
      return launch_clustered(two ? lora_decode_tc_kernel<T, kNf4Nested, 2> : lora_decode_tc_kernel<T, kNf4Nested, 1>,
                              blocks, q, stream);
  }
}

template <typename T>
cudaError_t launch_general(const Params& p, bool nf4, cudaStream_t stream) {
  const int rows_per_block = kWarps * kGeneralRowsPerWarp;
  const int blocks = (p.N + rows_per_block - 1) / rows_per_block;
  return launch_clustered(nf4 ? lora_decode_general_kernel<T, true> : lora_decode_general_kernel<T, false>, blocks, p,
                          stream);
}

}  // namespace

extern "C" int lora_ops_lora_decode_path(const LoraOpsDecodeArgs* args) {
  if (!valid_args(args)) return -1;
  return choose_path(args);
}

// Whether the current device has the sm_90 instructions the kernels use (clusters, bulk prefetch).
bool device_has_sm90() {
  static int cache[64] = {0};  // per device: 0 unknown, 1 yes, 2 no; a benign race fills it with the same value
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (dev >= 0 && dev < 64 && cache[dev] != 0) return cache[dev] == 1;
  int major = 0;
  const bool yes = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9;
  if (dev >= 0 && dev < 64) cache[dev] = yes ? 1 : 2;
  return yes;
}

extern "C" cudaError_t lora_ops_lora_decode(const LoraOpsDecodeArgs* a, cudaStream_t stream) {
  if (!valid_args(a)) return cudaErrorInvalidValue;
  if (!device_has_sm90()) return cudaErrorNotSupported;
  Params p;
  p.x = a->x;
  p.w = a->weight;
  p.absmax = a->absmax;
  p.nested_absmax = a->nested_absmax;
  p.nested_code = a->nested_code;
  p.offset = a->offset;
  p.codebook = a->codebook;
  p.A = a->lora_A;
  p.B = a->lora_B;
  p.bias = a->bias;
  p.y = a->y;
  p.M = static_cast<int>(a->M);
  p.N = static_cast<int>(a->N);
  p.K = static_cast<int>(a->K);
  p.r = static_cast<int>(a->r);
  p.bs_log2 = a->weight_format == LORA_OPS_DECODE_NF4 ? ilog2(a->blocksize) : 0;
  p.ksplit = 1;
  p.scaling = a->scaling;
  p.diag = 0;
  if (LORA_OPS_DECODE_DIAG) {
    const char* d = getenv("LORA_OPS_DECODE_DIAG");
    p.diag = d ? atoi(d) : 0;
  }
  const bool nf4 = a->weight_format == LORA_OPS_DECODE_NF4;
  if (choose_path(a) == LORA_OPS_DECODE_PATH_TENSOR_CORE) {
    const int fmt = !nf4 ? kDense : (a->nested_absmax != nullptr ? kNf4Nested : kNf4);
    return a->kind == LORA_OPS_BFLOAT16 ? launch_tc<__nv_bfloat16>(p, fmt, stream) : launch_tc<__half>(p, fmt, stream);
  }
  switch (a->kind) {
    case LORA_OPS_FLOAT32: return launch_general<float>(p, nf4, stream);
    case LORA_OPS_FLOAT16: return launch_general<__half>(p, nf4, stream);
    default: return launch_general<__nv_bfloat16>(p, nf4, stream);
  }
}
