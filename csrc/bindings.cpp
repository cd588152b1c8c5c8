// Torch bindings of lora_ops._C: CUDA-only helper ops under the lora_ops namespace.
//
// These are NOT the public ops: lora_ops::nf4_quantize / quantize_blockwise_8bit are Python custom ops
// (lora_ops/ops.py) whose CUDA path calls these helpers through lora_ops/_ext.py. Compiled only against a CUDA
// build of torch (setup.py / the JIT in _ext.py); the kernels themselves live torch-free in the .cu files.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <tuple>

#include "nf4_quantize.h"

namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "lora_ops::", what, ": CUDA error: ", cudaGetErrorString(err));
}

void check_table(const at::Tensor& table, const at::Tensor& like, int64_t numel, const char* op, const char* name) {
  TORCH_CHECK(table.device() == like.device(), "lora_ops::", op, ": ", name, " must be on ", like.device(),
              ", got ", table.device());
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.numel() == numel, "lora_ops::",
              op, ": ", name, " must be a contiguous float32 tensor of ", numel, " elements, got ",
              table.scalar_type(), " with ", table.numel(), " elements");
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& weight, const at::Tensor& bounds,
                                                     int64_t blocksize) {
  TORCH_CHECK(weight.is_cuda(), "lora_ops::nf4_quantize_cuda: weight must be a CUDA tensor, got ", weight.device());
  TORCH_CHECK(weight.is_contiguous(), "lora_ops::nf4_quantize_cuda: weight must be contiguous (call .contiguous())");
  int kind = -1;
  switch (weight.scalar_type()) {
    case at::kFloat: kind = LORA_OPS_FLOAT32; break;
    case at::kHalf: kind = LORA_OPS_FLOAT16; break;
    case at::kBFloat16: kind = LORA_OPS_BFLOAT16; break;
    default:
      TORCH_CHECK(false, "lora_ops::nf4_quantize_cuda: weight dtype ", weight.scalar_type(),
                  " is not supported; use float32, float16 or bfloat16");
  }
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0 && blocksize <= (1 << 30),
              "lora_ops::nf4_quantize_cuda: blocksize must be a positive even int, got ", blocksize);
  check_table(bounds, weight, LORA_OPS_NF4_NUM_BOUNDS, "nf4_quantize_cuda", "bounds");
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t n = weight.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, weight.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, weight.options().dtype(at::kFloat));
  check_cuda(lora_ops_nf4_quantize(weight.data_ptr(), kind, n, static_cast<int>(blocksize),
                                   bounds.data_ptr<float>(), packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                   c10::cuda::getCurrentCUDAStream()),
             "nf4_quantize_cuda");
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cuda(const at::Tensor& values, const at::Tensor& code,
                                                                int64_t blocksize) {
  TORCH_CHECK(values.is_cuda(), "lora_ops::quantize_blockwise_8bit_cuda: values must be a CUDA tensor, got ",
              values.device());
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.is_contiguous(),
              "lora_ops::quantize_blockwise_8bit_cuda: values must be contiguous float32, got ", values.scalar_type());
  TORCH_CHECK(blocksize > 0 && blocksize <= (1 << 30),
              "lora_ops::quantize_blockwise_8bit_cuda: blocksize must be a positive int, got ", blocksize);
  check_table(code, values, 256, "quantize_blockwise_8bit_cuda", "code");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t n = values.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor out = at::empty({n}, values.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, values.options().dtype(at::kFloat));
  check_cuda(lora_ops_quantize_blockwise_8bit(values.data_ptr<float>(), n, static_cast<int>(blocksize),
                                              code.data_ptr<float>(), out.data_ptr<uint8_t>(),
                                              absmax.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
             "quantize_blockwise_8bit_cuda");
  return {out, absmax};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lora_ops, m) {
  m.def("nf4_quantize_cuda(Tensor weight, Tensor bounds, int blocksize) -> (Tensor, Tensor)");
  m.def("quantize_blockwise_8bit_cuda(Tensor values, Tensor code, int blocksize) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lora_ops, CUDA, m) {
  m.impl("nf4_quantize_cuda", &nf4_quantize_cuda);
  m.impl("quantize_blockwise_8bit_cuda", &quantize_blockwise_8bit_cuda);
}

void lora_ops_register_launch(pybind11::module_& m);  // csrc/lora_launch.cpp

// A Python module so that both `import lora_ops._C` (setup.py) and torch.utils.cpp_extension.load (the JIT
// build in _ext.py) can load the library; the ops register themselves when it loads, and the module carries the
// launch path's functions (launch_*).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_ops CUDA helpers (registers torch.ops.lora_ops.*_cuda) and the fused layer's launch path";
  lora_ops_register_launch(m);
}
