"""Triton kernels, installed as ``lora_ops.triton_kernels`` (never as a top-level ``triton_kernels``, a name
OpenAI Triton's own package owns). Import submodules only where Triton is present."""
