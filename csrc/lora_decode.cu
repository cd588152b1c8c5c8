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

#include <algorithm>
#include <type_traits>

#include "cuda_common.cuh"
#include "lora_decode.h"

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
  kDiagNoCluster = 64,     // plain launch (each block computes all of S)
};

// The W stream (tensor-core kernel). A block owns a contiguous range of units (8 consecutive rows of W, all of K)
// and streams them through a ring of kSlots shared-memory slots; a slot holds the unit's 8 rows over one chunk of
// kChunkBytes per row (one cp.async.bulk per row, issued by warp 0, completing on the slot's mbarrier), and the
// last chunk of a unit also carries the unit's rows of B and bias for its epilogue. The 4 warps split each slot's
// k range. Why this shape (H200, 4096->14336 NF4, 29 MB): the first versions gave every warp 16 rows and read
// them 32 B (register loads) or 128 B (bulk copies) per row at a time, so the chip read ~14k rows in small
// interleaved pieces, and streaming alone (decode skipped) took 19-20 us against 8.4 us for a sequential read of
// the same bytes; here each block reads kChunkBytes-long pieces of consecutive rows, and bytes in flight cost no
// registers.
constexpr int kUnitRows = 8;       // rows per unit: the n of mma.m16n8k16 (x is its 16-token A operand)
constexpr int kChunkBytes = 1024;  // per row per slot: 2048 k of NF4, 512 k of 16-bit W
constexpr int kSlots = 4;          // per block: 4 x 8 KB of W in flight
template <typename T, int FMT>
struct Slots {
  static constexpr int kIterBytes = FMT == kDense ? kIterK * static_cast<int>(sizeof(T)) : kIterK / 2;  // per row
  static constexpr int kIters = kChunkBytes / kIterBytes;  // 64-k iterations of a full chunk
  // Row stride in a slot: rows g = 0..7 of a fragment load must fall in distinct banks. NF4 lanes load 8 B
  // (a half-warp = rows 0..3 x 4 lanes): rows 32 B apart mod 128. Dense lanes load 16 B (a quarter-warp =
  // rows 0..1 x 4 lanes): rows 16 B apart mod 128.
  static constexpr int kRowStride = kChunkBytes + (FMT == kDense ? 16 : 32);
  static constexpr int kBOffset = kUnitRows * kRowStride;                               // the unit's B rows
  static constexpr int kBiasOffset = kBOffset + kUnitRows * kMaxRank * static_cast<int>(sizeof(T));
  static constexpr int kBytes = kBiasOffset + 16;
  static constexpr int kScales = kUnitRows * kIters;  // NF4: one absmax per row and iteration of a chunk
};
// Dynamic shared memory of the tensor-core kernel: the NF4 pair table (dense: none) and the slots.
template <int FMT>
__host__ __device__ constexpr int tc_table_bytes() {
  return FMT == kDense ? 0 : kTableWords * 4;
}
template <typename T, int FMT>
__host__ __device__ constexpr int tc_smem_bytes() {
  return tc_table_bytes<FMT>() + kSlots * Slots<T, FMT>::kBytes;
}

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

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the async proxy (the bulk copies) before the first copy.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// This thread's arrival, announcing `bytes` that bulk copies will complete on the barrier.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}
// [src, src + bytes) -> shared dst by the bulk-copy engine (16-byte aligned, bytes a multiple of 16); read once,
// so the copy asks L2 to evict it first.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                          uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::
          "r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
}
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// The split cluster barrier: arrive (release this thread's shared-memory writes) ... wait (acquire the others').
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }

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

// 16 contiguous k of rows g and g+8 of a 16-bit matrix (W, or A for S): 2 x 16 B each.
struct DenseRows {
  uint4 r0lo, r0hi, r1lo, r1hi;
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

// acc += rows (g, g+8) x tokens over one iteration of dense rows.
template <typename T, int MT>
__device__ __forceinline__ void mma_dense(const DenseRows& s, const uint4 (&xv)[MT][2], float (&acc)[MT][4]) {
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

// A block's share of the W stream: units [u_begin, u_end), each `chunks` slots long.
template <typename T, int FMT>
struct BlockStream {
  const char* w;      // W bytes
  char* slots;        // kSlots x Slots::kBytes
  uint64_t* bars;     // kSlots barriers
  int64_t row_bytes;  // W bytes per row
  int64_t blocks_per_row;
  int u_begin, chunks, total;  // total = slots of this block
  uint64_t policy;
};

// Slot j -> (unit, chunk).
struct SlotPos {
  int unit, chunk, iters;  // iters: 64-k iterations in this chunk
  bool last;
};
template <typename T, int FMT>
__device__ __forceinline__ SlotPos slot_pos(const Params& p, const BlockStream<T, FMT>& bs, int j) {
  using S = Slots<T, FMT>;
  SlotPos sp;
  sp.unit = bs.u_begin + j / bs.chunks;
  sp.chunk = j - (j / bs.chunks) * bs.chunks;
  sp.last = sp.chunk == bs.chunks - 1;
  const int64_t left = bs.row_bytes - static_cast<int64_t>(sp.chunk) * kChunkBytes;
  sp.iters = static_cast<int>(min(left, static_cast<int64_t>(kChunkBytes)) / S::kIterBytes);
  return sp;
}

// NF4 absmax of this thread's kScales / kThreads entries of a slot, held in registers from the slot's issue to
// the iteration before it is used (nested: the 8-bit codes; plain: the fp32 bits).
template <typename T, int FMT>
struct SlotAbs {
  uint32_t q[FMT == kDense ? 1 : Slots<T, FMT>::kScales / kThreads];
};

// Entry e of a slot's scales: row e / kIters of the unit, iteration e % kIters of the chunk (clamped to the
// chunk and to row N-1).
template <typename T, int FMT>
__device__ __forceinline__ int64_t scale_block(const Params& p, const BlockStream<T, FMT>& bs, const SlotPos& sp,
                                               int e) {
  using S = Slots<T, FMT>;
  const int64_t row = min(static_cast<int64_t>(sp.unit) * kUnitRows + e / S::kIters, static_cast<int64_t>(p.N - 1));
  const int it = sp.chunk * S::kIters + min(e % S::kIters, sp.iters - 1);
  return row * bs.blocks_per_row + (it >> (p.bs_log2 - 6));  // blocksize >= 64 divides K
}

// Bulk copies move whole 16-byte multiples: a partial last unit's B rows and bias are copied up to the last full
// 16 bytes (a full unit's always are: 8 rows x r x 2 B, 8 x 2 B), the rest is read from global by the epilogue.
__device__ __forceinline__ uint32_t copied_bytes(size_t bytes) { return static_cast<uint32_t>(bytes & ~size_t{15}); }

// Issues slot j: thread 0 announces its bytes, threads 0..7 copy their row's chunk (rows past N copy row N-1,
// computed and never stored), and on a unit's last chunk threads 8 and 9 copy its B rows and bias; every thread
// loads the absmax of its scale entries.
template <typename T, int FMT>
__device__ __forceinline__ void issue_slot(const Params& p, const BlockStream<T, FMT>& bs, int j, SlotAbs<T, FMT>& ab) {
  using S = Slots<T, FMT>;
  const SlotPos sp = slot_pos(p, bs, j);
  char* dst = bs.slots + (j % kSlots) * S::kBytes;
  uint64_t* bar = bs.bars + (j % kSlots);
  const uint32_t chunk = static_cast<uint32_t>(sp.iters * S::kIterBytes);
  const int64_t row0 = static_cast<int64_t>(sp.unit) * kUnitRows;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kUnitRows), p.N - row0));
  const uint32_t b_bytes = sp.last ? copied_bytes(rows * p.r * sizeof(T)) : 0u;
  const uint32_t bias_bytes = sp.last && p.bias ? copied_bytes(rows * sizeof(T)) : 0u;
  const int tid = threadIdx.x;
  if (tid == 0) mbar_arrive_expect_tx(bar, chunk * kUnitRows + b_bytes + bias_bytes);
  if (tid < kUnitRows) {
    const int64_t row = min(row0 + tid, static_cast<int64_t>(p.N - 1));
    bulk_copy(dst + tid * S::kRowStride, bs.w + row * bs.row_bytes + static_cast<int64_t>(sp.chunk) * kChunkBytes,
              chunk, bar, bs.policy);
  } else if (tid == kUnitRows && b_bytes) {  // B rows are contiguous: 8 * r * sizeof(T) bytes, 16-B aligned
    bulk_copy(dst + S::kBOffset, static_cast<const T*>(p.B) + row0 * p.r, b_bytes, bar, bs.policy);
  } else if (tid == kUnitRows + 1 && bias_bytes) {
    bulk_copy(dst + S::kBiasOffset, static_cast<const T*>(p.bias) + row0, bias_bytes, bar, bs.policy);
  }
  if constexpr (FMT != kDense) {
#pragma unroll
    for (int i = 0; i < S::kScales / kThreads; ++i) {
      const int64_t blk = scale_block(p, bs, sp, tid + i * kThreads);
      ab.q[i] = FMT == kNf4 ? __float_as_uint(__ldg(static_cast<const float*>(p.absmax) + blk))
                            : static_cast<uint32_t>(__ldg(static_cast<const uint8_t*>(p.absmax) + blk));
    }
  }
}

// A slot's absmax values -> the scale table (bitsandbytes' double-quant arithmetic: product, then sum, each
// rounded; no FMA).
template <typename T, int FMT>
__device__ __forceinline__ void write_scales(const Params& p, const BlockStream<T, FMT>& bs, int j,
                                             const SlotAbs<T, FMT>& ab, float* scales, const float* s_ncode,
                                             float offset) {
  using S = Slots<T, FMT>;
  if constexpr (FMT != kDense) {
    const SlotPos sp = slot_pos(p, bs, j);
#pragma unroll
    for (int i = 0; i < S::kScales / kThreads; ++i) {
      const int e = threadIdx.x + i * kThreads;
      float v;
      if constexpr (FMT == kNf4) {
        v = __uint_as_float(ab.q[i]);
      } else {
        const int64_t blk = scale_block(p, bs, sp, e);
        v = __fadd_rn(__fmul_rn(s_ncode[ab.q[i]], __ldg(p.nested_absmax + (blk >> 8))), offset);
      }
      scales[e] = v;
    }
  }
}

// One 64-k iteration of a landed slot: acc (tokens g, g+8 x rows 2t, 2t+1 of the unit) += x . W^T. The mma's B
// operand is W: lane (g, t) holds row g's 16 contiguous k of the iteration and feeds them to the four k-steps in
// order; x, the A operand, takes the same permutation (its 16 contiguous k at 16t), so products stay paired.
template <typename T, int FMT, bool TWO>
__device__ __forceinline__ void compute_iter(const Params& p, const char* slot, int it, int it_global,
                                             const T* x0, const T* x1, float (&acc)[4], const uint32_t* table,
                                             const float* scales, int lane) {
  using S = Slots<T, FMT>;
  const int g = lane >> 2, t = lane & 3;
  uint4 xa[2], xb[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
  const uint4* pa = reinterpret_cast<const uint4*>(x0 + static_cast<int64_t>(it_global) * kIterK);
  xa[0] = __ldg(pa);
  xa[1] = __ldg(pa + 1);
  if constexpr (TWO) {
    const uint4* pb = reinterpret_cast<const uint4*>(x1 + static_cast<int64_t>(it_global) * kIterK);
    xb[0] = __ldg(pb);
    xb[1] = __ldg(pb + 1);
  }
  const char* wrow = slot + g * S::kRowStride + it * S::kIterBytes + t * (S::kIterBytes / 4);
  if constexpr (FMT == kDense) {
    const uint4 lo = *reinterpret_cast<const uint4*>(wrow), hi = *reinterpret_cast<const uint4*>(wrow + 16);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      mma16816<T>(acc, word_of(xa[0], xa[1], 2 * i), word_of(xb[0], xb[1], 2 * i), word_of(xa[0], xa[1], 2 * i + 1),
                  word_of(xb[0], xb[1], 2 * i + 1), word_of(lo, hi, 2 * i), word_of(lo, hi, 2 * i + 1));
  } else {
    // Step i takes k = 16t + 4i .. 4i+3: bytes 2i and 2i+1 of the lane's 8 (element 2j = high nibble, which the
    // table puts in the low half, the lower k). The absmax of the iteration's block is factored out.
    const uint2 w = *reinterpret_cast<const uint2*>(wrow);
    const uint32_t lane4 = static_cast<uint32_t>(lane) << 2;
    float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t wd = i < 2 ? w.x : w.y;
      const int jb = 2 * (i & 1);
      mma16816<T>(part, word_of(xa[0], xa[1], 2 * i), word_of(xb[0], xb[1], 2 * i), word_of(xa[0], xa[1], 2 * i + 1),
                  word_of(xb[0], xb[1], 2 * i + 1), code_pair(table, wd, jb, lane4),
                  code_pair(table, wd, jb + 1, lane4));
    }
    const float sc0 = scales[(2 * t) * S::kIters + it], sc1 = scales[(2 * t + 1) * S::kIters + it];
    acc[0] = fmaf(part[0], sc0, acc[0]);
    acc[1] = fmaf(part[1], sc1, acc[1]);
    acc[2] = fmaf(part[2], sc0, acc[2]);
    acc[3] = fmaf(part[3], sc1, acc[3]);
  }
}

// A unit's outputs: the 4 warps' fragments (s_red, added in warp order) + scaling * S @ B^T + bias, in fp32,
// rounded once. Thread (m, n) = (tid >> 3, tid & 7); only m < M and rows < N are stored.
template <typename T>
__device__ __forceinline__ void unit_epilogue(const Params& p, int unit, const float* s_red, const char* slot_b,
                                              const char* slot_bias, const float* s_full, int rs) {
  const int m = threadIdx.x >> 3, n = threadIdx.x & 7;
  const int64_t row = static_cast<int64_t>(unit) * kUnitRows + n;
  if (m >= p.M || row >= p.N) return;
  // D fragment of token m, row n: lane 4 * (m & 7) + (n >> 1), element 2 * (m >> 3) + (n & 1).
  const int idx = ((2 * (m >> 3) + (n & 1)) * 32) + 4 * (m & 7) + (n >> 1);
  float v = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) v += s_red[w * 128 + idx];
  const int rows = static_cast<int>(min(static_cast<int64_t>(kUnitRows), p.N - static_cast<int64_t>(unit) * kUnitRows));
  const int b_copied = static_cast<int>(copied_bytes(rows * p.r * sizeof(T)) / sizeof(T));
  const int bias_copied = static_cast<int>(copied_bytes(rows * sizeof(T)) / sizeof(T));
  const T* b_smem = reinterpret_cast<const T*>(slot_b);
  const T* b_glob = static_cast<const T*>(p.B) + static_cast<int64_t>(unit) * kUnitRows * p.r;
  const float* srow = s_full + m * rs;
  float l = 0.0f;
  if (!diag(p, kDiagNoLoraEpilogue))
    for (int j = 0, e = n * p.r; j < p.r; ++j, ++e) l = fmaf(srow[j], to_f32(e < b_copied ? b_smem[e] : b_glob[e]), l);
  float bias = 0.0f;
  if (p.bias)
    bias = to_f32(n < bias_copied ? reinterpret_cast<const T*>(slot_bias)[n] : static_cast<const T*>(p.bias)[row]);
  static_cast<T*>(p.y)[static_cast<int64_t>(m) * p.N + row] = from_f32<T>(v + p.scaling * l + bias);
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
      DenseRows s;
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

// y[m][n] = acc + scaling * (S[m] . B[n]) + bias[n], in fp32, rounded once; only m < M, n < N.
template <typename T>
__device__ __forceinline__ float lora_dot(const Params& p, const float* s_row, int n) {
  const T* brow = static_cast<const T*>(p.B) + static_cast<int64_t>(n) * p.r;
  float l = 0.0f;
  for (int j = 0; j < p.r; ++j) l = fmaf(s_row[j], to_f32(ld_ro(brow + j)), l);
  return l;
}

template <typename T, int FMT, int MT>
__global__ void __launch_bounds__(kThreads, 2) lora_decode_tc_kernel(const Params p) {
  using S = Slots<T, FMT>;
  constexpr bool kTwo = MT == 2;
  extern __shared__ __align__(128) unsigned char dyn_smem[];
  const uint32_t* table = reinterpret_cast<const uint32_t*>(dyn_smem);
  __shared__ __align__(8) uint64_t s_bars[kSlots];
  __shared__ float s_scales[2][FMT == kDense ? 1 : S::kScales];  // slot j's in [j & 1]
  __shared__ __align__(16) float s_part[kMaxM * kMaxRank];        // this block's slice of S (read by the cluster)
  __shared__ __align__(16) float s_full[kSFullWords];             // S, summed over the cluster
  __shared__ __align__(16) float s_red[kWarps * 8 * 32];          // fragments of the 4 warps
  __shared__ float s_ncode[FMT == kNf4Nested ? 256 : 1];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), csize = cluster.num_blocks();

  // (1) Start the W stream before anything waits: this block's first kSlots slots.
  const int units = (p.N + kUnitRows - 1) / kUnitRows;
  BlockStream<T, FMT> bs;
  bs.w = static_cast<const char*>(p.w);
  bs.slots = reinterpret_cast<char*>(dyn_smem) + tc_table_bytes<FMT>();
  bs.bars = s_bars;
  bs.row_bytes = FMT == kDense ? static_cast<int64_t>(p.K) * static_cast<int64_t>(sizeof(T)) : p.K / 2;
  bs.blocks_per_row = FMT == kDense ? 0 : static_cast<int64_t>(p.K) >> p.bs_log2;
  bs.u_begin = static_cast<int>(static_cast<int64_t>(units) * blockIdx.x / gridDim.x);
  const int u_end = static_cast<int>(static_cast<int64_t>(units) * (blockIdx.x + 1) / gridDim.x);
  bs.chunks = static_cast<int>((bs.row_bytes + kChunkBytes - 1) / kChunkBytes);
  bs.total = diag(p, kDiagNoMainLoop) ? 0 : (u_end - bs.u_begin) * bs.chunks;
  bs.policy = evict_first_policy();
  if (threadIdx.x == 0) {
    for (int i = 0; i < kSlots; ++i) mbar_init(s_bars + i, 1);
    mbar_init_fence();
  }
  __syncthreads();
  SlotAbs<T, FMT> ab[kSlots];
#pragma unroll
  for (int i = 0; i < kSlots; ++i)
    if (i < bs.total) issue_slot<T, FMT>(p, bs, i, ab[i]);

  XRows<T, MT> xr;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    xr.p[mt] = static_cast<const T*>(p.x) + static_cast<int64_t>(min(mt * 8 + g, p.M - 1)) * p.K + 16 * t;

  // (2) Tables from lora_ops.nf4's constants (device tensors; never literals here).
  if constexpr (FMT != kDense)
    if (!diag(p, kDiagNoTable)) fill_pair_table<T>(reinterpret_cast<uint32_t*>(dyn_smem), p.codebook);
  if constexpr (FMT == kNf4Nested)
    for (int i = threadIdx.x; i < 256; i += kThreads) s_ncode[i] = __ldg(p.nested_code + i);
  __syncthreads();

  // (3) S: this block's slice, then the cluster's sum (in rank order: bit-identical in every block). The first
  // slots are in flight meanwhile, so DRAM does not wait for this.
  if (diag(p, kDiagNoS)) {
    for (int i = threadIdx.x; i < p.M * p.r; i += kThreads) s_part[i] = 0.0f;
    __syncthreads();
  } else {
    lora_s_slice_tc<T, MT>(p, xr, s_part, s_red, rank, csize, warp, lane);
  }
  cluster_arrive();
  cluster_wait();
  const int rs = p.r | 1;
  gather_s(p, cluster, s_part, s_full, rs);
  cluster_arrive();  // this block is done reading the others' slices (the matching wait is at the very end)
  const float offset = FMT == kNf4Nested ? __ldg(p.offset) : 0.0f;
  if (bs.total > 0) write_scales<T, FMT>(p, bs, 0, ab[0], s_scales[0], s_ncode, offset);
  __syncthreads();

  // (4) The stream: slot j lands, the warps compute their quarter of its k, the unit's epilogue runs after its
  // last chunk, and the slot is refilled with slot j + kSlots.
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int base = 0; base < bs.total; base += kSlots) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int j = base + s;
      if (j >= bs.total) break;
      const SlotPos sp = slot_pos(p, bs, j);
      const char* slot = bs.slots + s * S::kBytes;
      mbar_wait(s_bars + s, static_cast<uint32_t>((base / kSlots) & 1));
      const int it_b = sp.iters * warp / kWarps, it_e = sp.iters * (warp + 1) / kWarps;
      if (diag(p, kDiagLoadsOnly)) {
        acc[0] += static_cast<float>(slot[lane] & 1);
      } else {
        for (int it = it_b; it < it_e; ++it)
          compute_iter<T, FMT, kTwo>(p, slot, it, sp.chunk * S::kIters + it, xr.p[0], xr.p[MT - 1], acc, table,
                                     s_scales[j & 1], lane);
      }
      if (sp.last) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          s_red[warp * 128 + c * 32 + lane] = acc[c];
          acc[c] = 0.0f;
        }
      }
      if (j + 1 < bs.total) write_scales<T, FMT>(p, bs, j + 1, ab[(s + 1) % kSlots], s_scales[(j + 1) & 1], s_ncode,
                                                 offset);
      __syncthreads();  // slot j (and the unit's fragments) complete; slot j + 1's scales visible
      if (sp.last) {
        unit_epilogue<T>(p, sp.unit, s_red, slot + S::kBOffset, slot + S::kBiasOffset, s_full, rs);
        __syncthreads();  // the epilogue read the slot's B and bias and s_red
      }
      if (j + kSlots < bs.total) issue_slot<T, FMT>(p, bs, j + kSlots, ab[s]);
    }
  }
  cluster_wait();  // no block leaves while another may still read its s_part
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
  // 16-byte alignment: x and A for vector loads, W, B and bias for the bulk copies.
  if (!aligned16(a->x) || !aligned16(a->weight) || !aligned16(a->lora_A) || !aligned16(a->lora_B) ||
      (a->bias != nullptr && !aligned16(a->bias)))
    return LORA_OPS_DECODE_PATH_GENERAL;
  if (a->weight_format == LORA_OPS_DECODE_NF4 && (a->blocksize < kIterK || a->K % a->blocksize != 0))
    return LORA_OPS_DECODE_PATH_GENERAL;
  return LORA_OPS_DECODE_PATH_TENSOR_CORE;
}

// Clusters of kCluster blocks (the grid padded to a multiple; padding blocks only help with S). Should a
// cluster launch be refused, the same kernel runs without clusters: each block is then a cluster of one and
// computes all of S itself (correct, more L2 traffic).
cudaError_t launch_clustered(void (*kernel)(Params), int blocks, int smem, const Params& p, cudaStream_t stream) {
  if (LORA_OPS_DECODE_DIAG && (p.diag & kDiagNoCluster)) {
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  }
  const int padded = (blocks + kCluster - 1) / kCluster * kCluster;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(padded), 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
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
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// The tensor-core kernel for one (T, format, token groups): dynamic shared memory opted in once, and how many of its
// blocks the chip holds at once in clusters of kCluster (a GPC holds whole clusters only, so this can be less than
// blocks per SM x SMs).
template <typename T, int FMT, int MT>
cudaError_t prepare_tc(int* resident_blocks) {
  static int cached = 0;  // per instantiation and process; a benign race sets the same value
  if (cached == 0) {
    auto kernel = lora_decode_tc_kernel<T, FMT, MT>;
    const int smem = tc_smem_bytes<T, FMT>();
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    int per_sm = 0;
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
    if (e != cudaSuccess) return e;
    int n = std::max(per_sm, 1) * sm_count();
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(kCluster), 1, 1);
    cfg.blockDim = dim3(kThreads, 1, 1);
    cfg.dynamicSmemBytes = static_cast<size_t>(smem);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = kCluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess && clusters > 0)
      n = std::min(n, clusters * kCluster);
    else
      (void)cudaGetLastError();
    cached = n;
  }
  *resident_blocks = cached;
  return cudaSuccess;
}

template <typename T, int FMT, int MT>
cudaError_t launch_tc_as(const Params& p, cudaStream_t stream) {
  int resident = 0;
  const cudaError_t e = prepare_tc<T, FMT, MT>(&resident);
  if (e != cudaSuccess) return e;
  // As many blocks as the chip holds at once (a second wave would only add its latency), each streaming a
  // contiguous range of units; never more blocks than units.
  const int units = (p.N + kUnitRows - 1) / kUnitRows;
  const int blocks = std::min(units, resident);
  return launch_clustered(lora_decode_tc_kernel<T, FMT, MT>, blocks, tc_smem_bytes<T, FMT>(), p, stream);
}

template <typename T>
cudaError_t launch_tc(const Params& p, int fmt, cudaStream_t stream) {
  const bool two = p.M > 8;
  switch (fmt) {
    case kDense: return two ? launch_tc_as<T, kDense, 2>(p, stream) : launch_tc_as<T, kDense, 1>(p, stream);
    case kNf4: return two ? launch_tc_as<T, kNf4, 2>(p, stream) : launch_tc_as<T, kNf4, 1>(p, stream);
    default: return two ? launch_tc_as<T, kNf4Nested, 2>(p, stream) : launch_tc_as<T, kNf4Nested, 1>(p, stream);
  }
}

template <typename T>
cudaError_t launch_general(const Params& p, bool nf4, cudaStream_t stream) {
  const int rows_per_block = kWarps * kGeneralRowsPerWarp;
  const int blocks = (p.N + rows_per_block - 1) / rows_per_block;
  return launch_clustered(nf4 ? lora_decode_general_kernel<T, true> : lora_decode_general_kernel<T, false>, blocks, 0,
                          p, stream);
}

}  // namespace

extern "C" int lora_ops_lora_decode_path(const LoraOpsDecodeArgs* args) {
  if (!valid_args(args)) return -1;
  return choose_path(args);
}

extern "C" cudaError_t lora_ops_lora_decode(const LoraOpsDecodeArgs* a, cudaStream_t stream) {
  if (!valid_args(a)) return cudaErrorInvalidValue;
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
