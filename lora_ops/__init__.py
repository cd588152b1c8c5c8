"""lora_ops: fused LoRA / QLoRA layers (Triton + CUDA) with bitsandbytes-exact NF4.

Importing never needs Triton, bitsandbytes or the compiled extension: those load lazily when a kernel runs.
"""
from . import ops as _ops  # noqa: F401  (registers torch.ops.lora_ops.*)
from .functional import lora_linear
from .nf4 import NF4Weight, quantize_nf4
from .modules import LoRALinear, QLoRALinear
from .inject import apply_lora, load_adapter, merge_and_unload, save_adapter

__version__ = "0.1.0"

__all__ = ["lora_linear", "NF4Weight", "quantize_nf4", "LoRALinear", "QLoRALinear", "apply_lora", "save_adapter",
           "load_adapter", "merge_and_unload", "__version__"]
