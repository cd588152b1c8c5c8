// A CPU build of csrc/lora_launch.cpp for the tests: without CUDA it can only do dry runs, which is what the
// tests compare with the Triton interpreter's launch records (tests/test_launch_path.py).
#include <torch/extension.h>

void lora_ops_register_launch(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { lora_ops_register_launch(m); }
