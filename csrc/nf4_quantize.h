// C interface of the NF4 / 8-bit blockwise quantization kernels (csrc/nf4_quantize.cu).
//
// Torch-free on purpose: the .cu is compiled by plain nvcc (CI, and a CPU build of torch has no c10/cuda
// headers); the torch bindings (bindings.cpp) allocate, check and pass raw device pointers and the stream.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of the weight handed to lora_ops_nf4_quantize.
enum LoraOpsFloatKind { LORA_OPS_FLOAT32 = 0, LORA_OPS_FLOAT16 = 1, LORA_OPS_BFLOAT16 = 2 };

// Number of NF4 decision bounds (16 codes -> 15 bounds).
#define LORA_OPS_NF4_NUM_BOUNDS 15

// NF4 blockwise quantization, byte-identical to bitsandbytes' CUDA quantize_4bit (quant_type "nf4").
//   weight:   n elements of `kind`, flat row-major, device memory
//   bounds:   15 ascending fp32 decision bounds in device memory: code = #{i : scaled > bounds[i]}
//             (lora_ops.nf4._nf4_thresholds(): the midpoints, with the tie-up ones moved one ulp down)
//   packed:   (n + 1) / 2 bytes, element 2j in the high nibble; an odd n pads the last low nibble with
//             the code of 0.0 scaled by that block
//   absmax:   ceil(n / blocksize) fp32, max |w| per block
// blocksize must be even (bitsandbytes' sizes are 32..4096). Returns the launch status.
cudaError_t lora_ops_nf4_quantize(const void* weight, int kind, int64_t n, int blocksize, const float* bounds,
                                  uint8_t* packed, float* absmax, cudaStream_t stream);

// 8-bit blockwise quantization against a sorted 256-entry map (double quantization of NF4 absmax),
// replicating bitsandbytes' CUDA dQuantize binary search (NaN -> code 0).
//   values: n fp32; code: 256 fp32 in device memory; out: n uint8; absmax: ceil(n / blocksize) fp32
cudaError_t lora_ops_quantize_blockwise_8bit(const float* values, int64_t n, int blocksize, const float* code,
                                             uint8_t* out, float* absmax, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
