"""The op's math in plain PyTorch: the CPU kernel and the oracle of every Triton/CUDA kernel test.

    xd = dropout(x) = x * mask / (1 - p)               x (M, K), mask from (seed, row * K + col)
    S  = xd @ A^T                                       (M, r)
    y  = x @ W^T + s * S @ B^T (+ bias)                 (M, N)

    dB = s * dY^T @ S                                   (N, r)
    dS = s * dY @ B                                     (M, r)
    dA = dS^T @ xd                                      (r, K)
    dX = dY @ W + (dS @ A) * mask / (1 - p)             (M, K)
    dbias = sum_rows(dY)                                (N,)

Rounding: every product runs in the input dtype through torch.matmul (fp32 accumulation on CPU and CUDA,
like PEFT), and S is rounded to the input dtype as PEFT's ``lora_A(x)`` is. Tests that need a tighter oracle
call these functions on fp32 (or fp64) copies of the inputs.

Dropout mask: a counter-based hash of (seed, flat index), the same function the Triton kernels compute
(``lora_ops.triton_kernels.lora`` holds its Triton twin), so a seed gives one mask on every device and the
backward regenerates it instead of storing M x K bits.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .nf4 import reference_dequantize_nf4

_M32 = 0xFFFFFFFF
# lowbias32's multipliers (Chris Wellons' integer hash prospector): full avalanche in two multiplies.
HASH_MUL1 = 0x7FEB352D
HASH_MUL2 = 0x846CA68B


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without int64 overflow (c split in 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, HASH_MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, HASH_MUL2)
    return x ^ (x >> 16)


def dropout_keep_threshold(p: float) -> int:
    """Keep an element when its 31-bit hash is >= this threshold: P(keep) = 1 - p."""
    return min(int(p * 2147483648.0), 2147483647)


def dropout_hash31(seed: int, index: torch.Tensor) -> torch.Tensor:
    """31-bit hash of int64 flat indices under a 62-bit seed (int64 tensor in [0, 2**31))."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    h = _mix32((index & _M32) ^ k0)
    h = _mix32(h ^ (index >> 32) ^ k1)
    return h >> 1


# The same hash on int32 bit patterns, for masks of fewer than 2**31 elements (the high index word is 0): a third
# of the int64 version's time on a CPU. Products go through uint32, whose multiply wraps mod 2**32 by definition;
# right shifts are arithmetic on int32, so the sign bits they bring in are masked off.
def _shr32(h: torch.Tensor, s: int) -> torch.Tensor:
    return (h >> s) & ((1 << (32 - s)) - 1)


def _mix32_bits(h: torch.Tensor) -> torch.Tensor:
    """The 32-bit mix of ``dropout_hash31`` on int32 bit patterns, in place (h is overwritten and returned):
    one scratch tensor instead of a new one per step, which on a CPU made the mask ~40% cheaper."""
    t = torch.empty_like(h)
    # An int32 multiply that wraps gives the uint32 product's bits ~20x faster on a CPU (uint32 has no vectorised
    # kernel); used only where a probe saw it wrap.
    wraps = _int32_multiply_wraps()
    hu = h.view(torch.uint32)
    for shift, mul in ((16, HASH_MUL1), (15, HASH_MUL2)):
        torch.bitwise_right_shift(h, shift, out=t)
        t &= (1 << (32 - shift)) - 1
        h ^= t
        if wraps:
            h.mul_(_as_int32(mul))
        else:
            hu.mul_(mul)
    torch.bitwise_right_shift(h, 16, out=t)
    t &= (1 << 16) - 1
    h ^= t
    return h


def _as_int32(v: int) -> int:
    return v - (1 << 32) if v >= (1 << 31) else v


def dropout_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask (rows, cols) of the LoRA-branch dropout for ``seed``; all True when p == 0."""
    if p == 0.0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    seed = int(seed)
    on_cpu = device is None or torch.device(device).type == "cpu"
    if on_cpu and rows * cols < 1 << 31 and _uint32_multiply():
        k0, k1 = _as_int32(seed & _M32), _as_int32((seed >> 32) & _M32)
        h = torch.arange(rows * cols, dtype=torch.int32)
        h ^= k0
        h = _mix32_bits(h)
        h ^= k1
        h = _mix32_bits(h)
        return (_shr32(h, 1) >= dropout_keep_threshold(p)).reshape(rows, cols)
    index = torch.arange(rows * cols, dtype=torch.int64, device=device).reshape(rows, cols)
    return dropout_hash31(seed, index) >= dropout_keep_threshold(p)


@functools.lru_cache(maxsize=None)
def _int32_multiply_wraps() -> bool:
    """Whether this torch's CPU int32 multiply wraps modulo 2**32 (the vectorised body and the scalar tail)."""
    vals = [(i * 2654435761 + 12345) % (1 << 32) for i in range(37)]
    h = torch.tensor([_as_int32(v) for v in vals], dtype=torch.int32)
    got = h.mul_(_as_int32(HASH_MUL1)).tolist()
    return got == [_as_int32((v * HASH_MUL1) & _M32) for v in vals]


@functools.lru_cache(maxsize=None)
def _uint32_multiply() -> bool:
    """Whether this torch multiplies uint32 tensors on the CPU (older releases lack the kernel)."""
    try:
        return int((torch.tensor([3], dtype=torch.int32).view(torch.uint32) * HASH_MUL2).view(torch.int32)) \
            == _as_int32((3 * HASH_MUL2) & _M32)
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


def dense_weight(weight, absmax, nested_absmax, nested_code, offset, blocksize: int, out_features: int,
                 in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in ``dtype``: the tensor itself, or NF4 bytes dequantized (a temporary)."""
    if absmax is None:
        return weight if weight.dtype == dtype else weight.to(dtype)
    return reference_dequantize_nf4(weight, absmax, nested_absmax, nested_code, offset, blocksize,
                                    out_features, in_features, dtype)


def _apply_dropout(x: torch.Tensor, mask: Optional[torch.Tensor], p: float) -> torch.Tensor:
    if mask is None or p == 0.0:
        return x
    return x * mask.to(x.dtype) * (1.0 / (1.0 - p))


def lora_forward(x: torch.Tensor, w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float, bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                 mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), w (N, K) dense -> (y (M, N), S (M, r)). ``mask`` is the (M, K) keep-mask or None."""
    s = _apply_dropout(x, mask, dropout_p) @ lora_A.t()
    # Fewer passes over y: addmm adds the bias, add_ scales and adds the LoRA term in one go. Not addmm_ with
    # alpha=scaling: BLAS skips the product when alpha is 0, and an Inf in S must still give NaN (Inf * 0).
    y = x @ w.t() if bias is None else torch.addmm(bias, x, w.t())
    y.add_(s @ lora_B.t(), alpha=scaling)
    return y, s


def lora_backward(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, lora_A: torch.Tensor,
                  lora_B: torch.Tensor, s: torch.Tensor, scaling: float, dropout_p: float = 0.0,
                  mask: Optional[torch.Tensor] = None, need_dx: bool = True, need_dA: bool = True,
                  need_dB: bool = True, need_dbias: bool = False):
    """Gradients (dx, dA, dB, dbias); an entry is None when not needed."""
    dx = dA = dB = dbias = None
    ds = (dy @ lora_B) * scaling if (need_dx or need_dA) else None
    if need_dB:
        dB = (dy.t() @ s) * scaling
    if need_dA:
        dA = ds.t() @ _apply_dropout(x, mask, dropout_p)
    if need_dx:
        dx = _apply_dropout(ds @ lora_A, mask, dropout_p).addmm_(dy, w)
    if need_dbias:
        dbias = dy.sum(0)
    return dx, dA, dB, dbias
