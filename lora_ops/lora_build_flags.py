"""Compiler flags for lora_ops._C, shared by setup.py and the JIT build (kept import-free of torch)."""
# sm_90 machine code for Hopper plus compute_90 PTX so newer GPUs can JIT it.
NVCC_FLAGS = ["-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90",
              "-gencode=arch=compute_90,code=compute_90", "--expt-relaxed-constexpr"]
# LORA_OPS_LAUNCH_CUDA: csrc/lora_launch.cpp launches kernels (its CPU test build only compares argument lists).
CXX_FLAGS = ["-O3", "-std=c++17", "-DLORA_OPS_LAUNCH_CUDA"]
