"""``lora_linear``: the public functional op. Validates at the boundary, then calls ``lora_ops::lora_fwd``.

    y = x @ W^T + scaling * dropout(x) @ A^T @ B^T (+ bias)

x (..., in); W (out, in) tensor or NF4Weight; A (r, in); B (out, r); bias (out,); y (..., out).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Union

import torch

from . import _backend, _launch
from . import decode as _decode
from . import ops as _ops  # registers torch.ops.lora_ops.*
from .nf4 import FLOAT_DTYPES, NF4Weight

# x dtypes lora_linear accepts: the NF4/kernel dtypes, plus float64, which runs on the reference path only
# (gradcheck and float64 oracles need it; ops.py never sends it to a fast kernel).
X_DTYPES = FLOAT_DTYPES + (torch.float64,)

# Seeds are drawn below 2**62 so that (seed >> 32) stays a non-negative 32-bit key.
_SEED_HIGH = 1 << 62


def draw_dropout_seed(device: torch.device) -> torch.Tensor:
    """A 0-d int64 seed from torch's default generator of ``device`` (so manual_seed and checkpointing's
    RNG restore reproduce the dropout mask)."""
    return torch.randint(0, _SEED_HIGH, (), device=device, dtype=torch.int64)


def _check_tensor(name: str, t, dims: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:  # the kernels address memory through strides
        raise TypeError(f"{name} is a {t.layout} tensor; lora_linear takes dense tensors (use {name}.to_dense())")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name}.dtype={t.dtype} differs from x.dtype={dtype}; cast it with .to({dtype})")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; move it with .to({str(device)!r})")


def validate_lora_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p) -> None:
    """Raise ValueError/TypeError naming the bad value and the fix; return None when all is well."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x.dtype={x.dtype} is not supported; use float32, float16 or bfloat16 "
                        "(float64 runs on the PyTorch reference only)")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., in_features), got a 0-d tensor")
    if x.layout != torch.strided:
        raise TypeError(f"x is a {x.layout} tensor; lora_linear takes dense tensors (use x.to_dense())")
    if isinstance(weight, NF4Weight):
        out_f, in_f = weight.out_features, weight.in_features
        if weight.device != x.device:
            raise ValueError(f"the NF4 weight is on {weight.device} but x is on {x.device}; use weight.to(x.device)")
        weight.check_one_device()
    elif isinstance(weight, torch.Tensor):
        _check_tensor("weight", weight, 2, x.dtype, x.device)
        out_f, in_f = weight.shape
    else:
        raise TypeError(f"weight must be a torch.Tensor (out, in) or an NF4Weight, got {type(weight).__name__}")
    if x.shape[-1] != in_f:
        raise ValueError(f"x.shape[-1]={x.shape[-1]} does not match the weight's in_features={in_f}")
    _check_tensor("lora_A", lora_A, 2, x.dtype, x.device)
    _check_tensor("lora_B", lora_B, 2, x.dtype, x.device)
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A has rank {r}; the rank must be >= 1")
    if lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)}; expected (r, in_features={in_f})")
    if tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}; expected (out_features={out_f}, r={r})")
    if bias is not None:
        _check_tensor("bias", bias, 1, x.dtype, x.device)
        if bias.shape[0] != out_f:
            raise ValueError(f"bias has shape {tuple(bias.shape)}; expected (out_features={out_f},)")
    if isinstance(scaling, bool) or not isinstance(scaling, Real) or not math.isfinite(float(scaling)):
        raise ValueError(f"scaling={scaling!r} must be a finite real number (lora_alpha / r)")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, Real) or not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p={dropout_p!r} must be in [0, 1); 1.0 would zero the adapter")


def lora_linear(x: torch.Tensor, weight: Union[torch.Tensor, NF4Weight], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float, bias: Optional[torch.Tensor] = None,
                dropout_p: float = 0.0, training: bool = True) -> torch.Tensor:
    """y = x @ W^T + scaling * dropout(x) @ A^T @ B^T (+ bias); dropout only when ``training``.

    Differentiable in x, lora_A, lora_B and bias; never in the frozen weight.
    """
    if not torch.compiler.is_compiling() and isinstance(x, torch.Tensor) and _launch.takes(x):
        # Eager training and prefill on CUDA: one call into C++ (checks, kernels, autograd); None when the call
        # needs the general path below (bad input, for its message; decode; torch.compile; another backend).
        y = _launch.linear(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training)
        if y is not None:
            return y
    validate_lora_args(x, weight, lora_A, lora_B, scaling, bias, dropout_p)
    p = float(dropout_p) if training else 0.0
    seed = draw_dropout_seed(x.device) if p > 0.0 else None
    k = x.shape[-1]
    x2 = x.reshape(math.prod(x.shape[:-1]), k)  # not reshape(-1, k): ambiguous when in_features == 0
    if isinstance(weight, NF4Weight):
        wargs = weight.tensors()
        blocksize = weight.blocksize
    else:
        wargs = (weight, None, None, None, None)
        blocksize = 0
    # The decode kernel takes one nested offset; a projection group's stacked weight may carry one per nested
    # block (lora_ops.grouped), which only the training path's kernels read.
    offsets = isinstance(weight, NF4Weight) and weight.offset is not None and weight.offset.numel() > 1
    if not offsets and _decode.use_decode(x2, lora_A, lora_B, bias, p):
        # Inference at small M (no gradient possible, dropout off): one CUDA kernel for the whole layer instead
        # of the training path's launches; decode.py says when (the threshold is a committed GPU measurement).
        if (impl := _backend.eager_decode_impl(x2)) is not None:  # eager: the kernel without the op's dispatch
            y = _ops.lora_decode_eager(impl, x2, *wargs, blocksize, lora_A, lora_B, float(scaling), bias)
        else:
            y = torch.ops.lora_ops.lora_decode(x2, *wargs, blocksize, lora_A, lora_B, float(scaling), bias)
    elif (impl := _ops.eager_impl(x2)) is not None:
        # Eager mode: the op's kernels and math without its dispatcher overhead.
        y = _ops.lora_fwd_eager(impl, x2, *wargs, blocksize, lora_A, lora_B, float(scaling), bias, p, seed)
    else:
        y, _ = torch.ops.lora_ops.lora_fwd(x2, *wargs, blocksize, lora_A, lora_B, float(scaling), bias, p, seed)
    return y.reshape(*x.shape[:-1], lora_B.shape[0])
