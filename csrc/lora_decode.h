// C interface of the small-batch decode kernel (csrc/lora_decode.cu):
//
//     y (M, N) = x (M, K) @ W^T + scaling * (x @ A^T) @ B^T (+ bias),   1 <= M <= 16, 1 <= r <= 128
//
// in ONE launch, W dense (N, K) or NF4 (bitsandbytes' packed bytes, optionally double-quantized absmax).
// Torch-free like nf4_quantize.h: the torch bindings (lora_decode_bindings.cpp) check and allocate, then pass
// raw device pointers and the stream.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "nf4_quantize.h"  // LoraOpsFloatKind

#ifdef __cplusplus
extern "C" {
#endif

// The kernels hold all M rows of x in one (M <= 8) or two (M <= 16) tensor-core column groups and the
// (M x r) LoRA product S in shared memory (16 x 128 fp32 = 8 KB): the limits of one launch.
#define LORA_OPS_DECODE_MAX_M 16
#define LORA_OPS_DECODE_MAX_RANK 128

enum LoraOpsDecodeWeight { LORA_OPS_DECODE_DENSE = 0, LORA_OPS_DECODE_NF4 = 1 };

// Which kernel a call runs (lora_ops_lora_decode_path): the tensor-core kernel needs bf16/fp16, K % 64 == 0,
// 16-byte aligned x / W / A and, for NF4, a power-of-two block size >= 64 that divides K (so no block
// straddles two rows); everything else (fp32, odd K, straddling blocks) runs the general CUDA-core kernel.
enum LoraOpsDecodePath { LORA_OPS_DECODE_PATH_GENERAL = 0, LORA_OPS_DECODE_PATH_TENSOR_CORE = 1 };

typedef struct LoraOpsDecodeArgs {
  const void* x;              // (M, K) contiguous, element type `kind`
  const void* weight;         // dense: (N, K) of `kind`; NF4: ((N*K + 1) / 2) packed bytes, element 2j high nibble
  const void* absmax;         // NF4: fp32 (nblocks), or uint8 codes when nested_absmax != NULL; dense: NULL
  const float* nested_absmax;  // NF4 double quant: fp32 (ceil(nblocks / 256)); else NULL
  const float* nested_code;    // NF4 double quant: the 256-entry fp32 8-bit map; else NULL
  const float* offset;         // NF4 double quant: fp32 scalar added after the product; else NULL
  const float* codebook;       // NF4: the 16 fp32 code values of lora_ops.nf4.NF4_CODEBOOK; else NULL
  const void* lora_A;          // (r, K) of `kind`
  const void* lora_B;          // (N, r) of `kind`
  const void* bias;            // (N) of `kind`, or NULL
  void* y;                     // (M, N) of `kind`, written completely
  int64_t M, N, K, r;
  int64_t blocksize;           // NF4 block size in elements (even); ignored for dense
  float scaling;
  int kind;                    // LoraOpsFloatKind of x, a dense W, A, B, bias and y
  int weight_format;           // LoraOpsDecodeWeight
} LoraOpsDecodeArgs;

// Launches the decode kernel on `stream`. Returns cudaErrorInvalidValue for arguments outside the limits above.
cudaError_t lora_ops_lora_decode(const LoraOpsDecodeArgs* args, cudaStream_t stream);

// The LoraOpsDecodePath lora_ops_lora_decode takes for these arguments (no launch; for tests and reports).
int lora_ops_lora_decode_path(const LoraOpsDecodeArgs* args);

#ifdef __cplusplus
}
#endif
