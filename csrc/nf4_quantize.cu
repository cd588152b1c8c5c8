// NF4 and 8-bit blockwise quantization kernels (bitsandbytes' exact CUDA numerics).
//
// No torch header here (see nf4_quantize.h). One warp owns one quantization block: the block's absmax is a
// warp reduction, then each lane encodes element pairs (one output byte each). Quantization runs once per
// weight, so the kernels favour obviously-exact arithmetic over speed:
//   * every rounding step is explicit, so the results do not depend on --use_fast_math, -prec-div or FMA
//     contraction: the block scale is bitsandbytes' fast-math reciprocal (rcp.approx.ftz.f32, then mul.ftz.f32),
//     the rest _rn intrinsics;
//   * the NF4 decision bounds and the 8-bit map come in as data (from lora_ops.nf4), never as literals.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda_common.cuh"
#include "nf4_quantize.h"

namespace {

using lora_ops::nan_max;
using lora_ops::to_f32;
using lora_ops::warp_max;

// bitsandbytes' CUDA build is compiled with fast math, so its `1.0f / absmax` is the approximate reciprocal and
// the scale product flushes denormals. Measured on the H200 (scripts/probe_nf4_rounding.py, 2026-11-29): of
// 5 bytes (in 3 x 29M-element fp32 weights) where an IEEE reciprocal disagreed with bitsandbytes, this pair
// reproduced all 5; IEEE division reproduced 3. (The PyTorch reference keeps the IEEE reciprocal, as
// bitsandbytes' CPU path does.)
__device__ __forceinline__ float bnb_reciprocal(float m) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(m));
  return r;
}

__device__ __forceinline__ float bnb_scale(float v, float inv) {
  float r;
  asm("mul.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(v), "f"(inv));
  return r;
}

constexpr int kWarpsPerCta = 8;
constexpr int kThreads = 32 * kWarpsPerCta;

// absmax of [start, end) by one warp (all lanes get it). |w| in fp32, as bitsandbytes and the reference.
template <typename T>
__device__ __forceinline__ float block_absmax(const T* __restrict__ x, int64_t start, int64_t end, int lane) {
  float m = 0.0f;
  for (int64_t i = start + lane; i < end; i += 32) m = nan_max(m, fabsf(to_f32(x[i])));
  return warp_max(m);
}

// Code = number of bounds strictly below x. NaN (an all-zero block: 0 * (1/0)) compares false -> code 0.
__device__ __forceinline__ uint32_t nf4_code(float x, const float (&bounds)[LORA_OPS_NF4_NUM_BOUNDS]) {
  uint32_t c = 0;
#pragma unroll
  for (int i = 0; i < LORA_OPS_NF4_NUM_BOUNDS; ++i) c += (x > bounds[i]) ? 1u : 0u;
  return c;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
nf4_quantize_kernel(const T* __restrict__ w, int64_t n, int blocksize, int64_t nblocks,
                    const float* __restrict__ bounds_in, uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  float bounds[LORA_OPS_NF4_NUM_BOUNDS];
#pragma unroll
  for (int i = 0; i < LORA_OPS_NF4_NUM_BOUNDS; ++i) bounds[i] = __ldg(bounds_in + i);
  const int lane = threadIdx.x & 31;
  const int64_t blk = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (blk >= nblocks) return;  // whole warp leaves together: no shuffle below is left half-empty
  const int64_t start = blk * blocksize;
  const int64_t end = start + blocksize < n ? start + blocksize : n;
  const float m = block_absmax(w, start, end, lane);
  if (lane == 0) absmax[blk] = m;
  // A reciprocal multiply, as bitsandbytes' kernel does (not x / absmax), with its fast-math reciprocal.
  const float inv = bnb_reciprocal(m);
  // blocksize is even, so byte j = elements (2j, 2j+1) never straddles two blocks.
  const int64_t pend = (end + 1) / 2;
  for (int64_t p = start / 2 + lane; p < pend; p += 32) {
    const int64_t i = 2 * p;
    const float hi = bnb_scale(to_f32(w[i]), inv);
    // Odd n: the missing element is 0.0 scaled by this block (code 7, or 0 for an all-zero block).
    const float lo = bnb_scale(i + 1 < n ? to_f32(w[i + 1]) : 0.0f, inv);
    packed[p] = static_cast<uint8_t>((nf4_code(hi, bounds) << 4) | nf4_code(lo, bounds));
  }
}

// bitsandbytes' dQuantize: 7 halving steps from the middle of the sorted map, then the pivot or its
// bracketing neighbour by the fp32 midpoint. Mirrors lora_ops.nf4.reference_quantize_blockwise_8bit.
__device__ __forceinline__ uint8_t quantize_8bit(const float* __restrict__ code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
#pragma unroll
  for (int step = 64; step > 0; step >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[255];
  if (lower_pivot == 0) lower = code[0];
  if (x > val) {
    const float mid = __fmul_rn(__fadd_rn(upper, val), 0.5f);
    return static_cast<uint8_t>(x > mid ? upper_pivot : pivot);
  }
  const float mid = __fmul_rn(__fadd_rn(lower, val), 0.5f);
  return static_cast<uint8_t>(x < mid ? lower_pivot : pivot);
}

__global__ void __launch_bounds__(kThreads)
quantize_8bit_kernel(const float* __restrict__ values, int64_t n, int blocksize, int64_t nblocks,
                     const float* __restrict__ code_in, uint8_t* __restrict__ out, float* __restrict__ absmax) {
  __shared__ float code[256];
  for (int i = threadIdx.x; i < 256; i += kThreads) code[i] = code_in[i];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t blk = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (blk >= nblocks) return;
  const int64_t start = blk * blocksize;
  const int64_t end = start + blocksize < n ? start + blocksize : n;
  const float m = block_absmax(values, start, end, lane);
  if (lane == 0) absmax[blk] = m;
  const float inv = bnb_reciprocal(m);
  for (int64_t i = start + lane; i < end; i += 32) out[i] = quantize_8bit(code, bnb_scale(values[i], inv));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
cudaError_t launch_nf4(const void* weight, int64_t n, int blocksize, const float* bounds, uint8_t* packed,
                       float* absmax, cudaStream_t stream) {
  const int64_t nblocks = ceil_div(n, blocksize);
  const int64_t grid = ceil_div(nblocks, kWarpsPerCta);
  if (grid > 0x7fffffffLL) return cudaErrorInvalidValue;
  nf4_quantize_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      static_cast<const T*>(weight), n, blocksize, nblocks, bounds, packed, absmax);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t lora_ops_nf4_quantize(const void* weight, int kind, int64_t n, int blocksize,
                                             const float* bounds, uint8_t* packed, float* absmax,
                                             cudaStream_t stream) {
  if (n < 0 || blocksize <= 0 || blocksize % 2 != 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  switch (kind) {
    case LORA_OPS_FLOAT32: return launch_nf4<float>(weight, n, blocksize, bounds, packed, absmax, stream);
    case LORA_OPS_FLOAT16: return launch_nf4<__half>(weight, n, blocksize, bounds, packed, absmax, stream);
    case LORA_OPS_BFLOAT16:
      return launch_nf4<__nv_bfloat16>(weight, n, blocksize, bounds, packed, absmax, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t lora_ops_quantize_blockwise_8bit(const float* values, int64_t n, int blocksize,
                                                        const float* code, uint8_t* out, float* absmax,
                                                        cudaStream_t stream) {
  if (n < 0 || blocksize <= 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int64_t nblocks = ceil_div(n, blocksize);
  const int64_t grid = ceil_div(nblocks, kWarpsPerCta);
  if (grid > 0x7fffffffLL) return cudaErrorInvalidValue;
  quantize_8bit_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(values, n, blocksize, nblocks, code,
                                                                            out, absmax);
  return cudaGetLastError();
}
