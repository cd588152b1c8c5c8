// Torch binding of the decode kernel: lora_ops::lora_decode_cuda, a CUDA-only helper op.
//
// Not the public op: lora_ops::lora_decode is a Python custom op (lora_ops/ops.py, with a fake and a CPU
// reference) whose CUDA path calls this helper through lora_ops/_ext.py. Here: check every tensor (device,
// dtype, shape, contiguity), fill the torch-free argument struct of csrc/lora_decode.h, launch on the current
// stream. The module init lives in bindings.cpp; this file only adds ops to the lora_ops library.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "lora_decode.h"

namespace {

constexpr const char* kOp = "lora_ops::lora_decode_cuda";

int float_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return LORA_OPS_FLOAT32;
    case at::kHalf: return LORA_OPS_FLOAT16;
    case at::kBFloat16: return LORA_OPS_BFLOAT16;
    default:
      TORCH_CHECK(false, kOp, ": x.dtype ", t, " is not supported; use float32, float16 or bfloat16");
  }
  return -1;
}

void check_tensor(const at::Tensor& t, const at::Tensor& x, const char* name, at::ScalarType dtype,
                  at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == x.device(), kOp, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == dtype, kOp, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, kOp, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous (call .contiguous())");
}

// A tensor of `numel` elements (any shape: absmax and the NF4 bytes come as (n,) or (n, 1)).
void check_flat(const at::Tensor& t, const at::Tensor& x, const char* name, at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.device() == x.device(), kOp, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == dtype, kOp, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, kOp, ": ", name, " must have ", numel, " elements, got ", t.numel());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous (call .contiguous())");
}

// Writes y = x @ W^T + scaling * (x @ A^T) @ B^T (+ bias) into `out` (M, N); returns the LoraOpsDecodePath taken.
int64_t lora_decode_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& absmax,
                         const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& offset, int64_t blocksize, const at::Tensor& lora_A,
                         const at::Tensor& lora_B, double scaling, const std::optional<at::Tensor>& bias,
                         const at::Tensor& codebook, const at::Tensor& out) {
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), kOp, ": x must be a contiguous (M, K) tensor, got shape ",
              x.sizes());
  const int kind = float_kind(x.scalar_type());
  const at::ScalarType dt = x.scalar_type();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(lora_B.dim() == 2 && lora_A.dim() == 2, kOp, ": lora_A and lora_B must be 2-D");
  const int64_t N = lora_B.size(0), r = lora_B.size(1);
  TORCH_CHECK(M >= 1 && M <= LORA_OPS_DECODE_MAX_M, kOp, ": M=", M, " rows of x; the kernel takes 1..",
              LORA_OPS_DECODE_MAX_M);
  TORCH_CHECK(r >= 1 && r <= LORA_OPS_DECODE_MAX_RANK, kOp, ": rank ", r, "; the kernel takes 1..",
              LORA_OPS_DECODE_MAX_RANK);
  TORCH_CHECK(N >= 1 && K >= 1, kOp, ": empty weight (N=", N, ", K=", K, ")");
  check_tensor(lora_A, x, "lora_A", dt, {r, K});
  check_tensor(lora_B, x, "lora_B", dt, {N, r});
  check_tensor(out, x, "out", dt, {M, N});
  if (bias.has_value()) check_tensor(*bias, x, "bias", dt, {N});

  LoraOpsDecodeArgs a{};
  const bool nf4 = absmax.has_value();
  if (nf4) {
    TORCH_CHECK(blocksize >= 2 && (blocksize & (blocksize - 1)) == 0, kOp, ": blocksize=", blocksize,
                " must be a power of two (bitsandbytes' 32..4096)");
    const int64_t n = N * K, nblocks = (n + blocksize - 1) / blocksize;
    check_flat(weight, x, "weight (packed NF4)", at::kByte, (n + 1) / 2);
    const bool nested = nested_absmax.has_value();
    TORCH_CHECK(nested == nested_code.has_value() && nested == offset.has_value(), kOp,
                ": nested_absmax, nested_code and offset come together (double quantization) or not at all");
    check_flat(*absmax, x, "absmax", nested ? at::kByte : at::kFloat, nblocks);
    if (nested) {
      check_flat(*nested_absmax, x, "nested_absmax", at::kFloat, (nblocks + 255) / 256);
      check_flat(*nested_code, x, "nested_code", at::kFloat, 256);
      check_flat(*offset, x, "offset", at::kFloat, 1);
      a.nested_absmax = nested_absmax->data_ptr<float>();
      a.nested_code = nested_code->data_ptr<float>();
      a.offset = offset->data_ptr<float>();
    }
    check_flat(codebook, x, "codebook", at::kFloat, 16);
    a.absmax = absmax->data_ptr();
    a.codebook = codebook.data_ptr<float>();
    a.weight_format = LORA_OPS_DECODE_NF4;
    a.blocksize = blocksize;
  } else {
    TORCH_CHECK(!nested_absmax.has_value() && !nested_code.has_value() && !offset.has_value(), kOp,
                ": a dense weight has no nested absmax state");
    check_tensor(weight, x, "weight", dt, {N, K});
    a.weight_format = LORA_OPS_DECODE_DENSE;
  }
  a.x = x.data_ptr();
  a.weight = weight.data_ptr();
  a.lora_A = lora_A.data_ptr();
  a.lora_B = lora_B.data_ptr();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.y = out.data_ptr();
  a.M = M;
  a.N = N;
  a.K = K;
  a.r = r;
  a.scaling = static_cast<float>(scaling);
  a.kind = kind;
  const int path = lora_ops_lora_decode_path(&a);
  TORCH_CHECK(path >= 0, kOp, ": arguments outside the kernel's limits (see csrc/lora_decode.h)");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = lora_ops_lora_decode(&a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err != cudaErrorNotSupported, kOp, ": the decode kernel needs an sm_90+ GPU (thread-block clusters); "
              "lora_linear uses the training path on ", x.device(), " (set LORA_OPS_BACKEND=triton to skip decode)");
  TORCH_CHECK(err == cudaSuccess, kOp, ": CUDA error: ", cudaGetErrorString(err));
  return path;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lora_ops, m) {
  m.def(
      "lora_decode_cuda(Tensor x, Tensor weight, Tensor? absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? offset, int blocksize, Tensor lora_A, Tensor lora_B, float scaling, Tensor? bias, Tensor codebook, "
      "Tensor(a!) out) -> int");
}

TORCH_LIBRARY_IMPL(lora_ops, CUDA, m) { m.impl("lora_decode_cuda", &lora_decode_cuda); }
