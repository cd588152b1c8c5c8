// Device helpers shared by the csrc kernels (nf4_quantize.cu, lora_decode.cu): element conversions and warp
// reductions.
//
// Torch-free like every csrc header (DESIGN.md, "csrc that compiles without a GPU"): plain CUDA, included only
// from .cu files that nvcc compiles on its own. Everything here is __forceinline__, so a kernel's code is the
// same as with the helper written out in its own file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

namespace lora_ops {

// The fp32 value of a float, __half or __nv_bfloat16 element (exact: the 16-bit types widen losslessly).
template <typename T>
__device__ __forceinline__ float to_f32(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    static_assert(std::is_same_v<T, float>, "to_f32: float, __half or __nv_bfloat16");
    return v;
  }
}

// v in T, rounded to nearest even.
template <typename T>
__device__ __forceinline__ T from_f32(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    static_assert(std::is_same_v<T, float>, "from_f32: float, __half or __nv_bfloat16");
    return v;
  }
}

// max that propagates NaN, as torch.amax (the reference) does; fmaxf would drop it.
__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// Butterfly reduction over a full warp (all 32 lanes active): every lane gets op over the 32 lanes' values.
// op(mine, other) at each level; for a commutative op every lane ends with the same bits.
template <typename Op>
__device__ __forceinline__ float warp_allreduce(float v, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  return warp_allreduce(v, [](float a, float b) { return a + b; });
}

__device__ __forceinline__ float warp_max(float v) {
  return warp_allreduce(v, [](float a, float b) { return nan_max(a, b); });
}

}  // namespace lora_ops
