"""The ``lora_ops::`` custom ops: schema (from the signatures), fake, autograd, and one kernel per device.

Every op has a default kernel that dispatches through ``_backend.implementation``: the fast Triton/CUDA
implementation where one loads for the tensors' device, else the PyTorch reference (``reference.py``,
``nf4.reference_*``). ``torch.library.custom_op`` (not ``triton_op``) keeps ``torch.compile(fullgraph=True)``
and ``opcheck`` working on machines without a GPU.

Weights travel as the tensors of ``NF4Weight.tensors()``: ``weight`` is the dense (N, K) tensor when
``absmax`` is None, else the packed NF4 bytes with their (possibly double-quantized) absmax.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _backend
from . import nf4 as _nf4
from . import reference as _ref


# ------------------------------------------------------------------------------------------------ NF4 ops

@torch.library.custom_op("lora_ops::nf4_quantize", mutates_args=())
def nf4_quantize(weight: Tensor, blocksize: int) -> Tuple[Tensor, Tensor]:
    """(out, in) float weight -> (packed uint8 ((n+1)//2, 1), absmax fp32 (nblocks,))."""
    impl = _backend.implementation("nf4_quantize", weight.device.type)
    if impl is not None:
        return impl(weight, blocksize)
    return _nf4.reference_quantize_nf4(weight, blocksize)


@nf4_quantize.register_fake
def _(weight, blocksize):
    n = weight.numel()
    return (weight.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
            weight.new_empty((-(-n // blocksize),), dtype=torch.float32))


@torch.library.custom_op("lora_ops::quantize_blockwise_8bit", mutates_args=())
def quantize_blockwise_8bit(values: Tensor, code: Tensor, blocksize: int) -> Tuple[Tensor, Tensor]:
    """fp32 values -> (uint8 codes, fp32 absmax per block) against the 256-entry ``code`` map."""
    impl = _backend.implementation("quantize_blockwise_8bit", values.device.type)
    if impl is not None:
        return impl(values, code, blocksize)
    return _nf4.reference_quantize_blockwise_8bit(values, code, blocksize)


@quantize_blockwise_8bit.register_fake
def _(values, code, blocksize):
    n = values.numel()
    return (values.new_empty((n,), dtype=torch.uint8), values.new_empty((-(-n // blocksize),), dtype=torch.float32))


@torch.library.custom_op("lora_ops::nf4_dequantize", mutates_args=())
def nf4_dequantize(packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                   offset: Optional[Tensor], blocksize: int, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """Packed NF4 (+ absmax state) -> dense (rows, cols) weight of ``dtype``."""
    impl = _backend.implementation("nf4_dequantize", packed.device.type)
    if impl is not None:
        return impl(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, dtype)
    return _nf4.reference_dequantize_nf4(packed, absmax, nested_absmax, nested_code, offset, blocksize,
                                         rows, cols, dtype)


@nf4_dequantize.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols, dtype):
    return packed.new_empty((rows, cols), dtype=dtype)


# ----------------------------------------------------------------------------------------------- LoRA ops

def _no_autocast(device: torch.device):
    """The op computes in its inputs' dtypes, as its fake promises. An ambient ``torch.autocast`` would reach
    the torch matmuls inside the kernel (custom ops have no autocast kernel; the key falls through) and return
    another dtype than the fake: fp32 inputs under bf16 autocast came back bf16. The layers pick the autocast
    dtype themselves and cast x, A, B and the bias before calling the op (``modules.LoRALayerBase.forward``);
    ``torch.library.register_autocast`` is no substitute, as it would cast the fp32 NF4 quant state too."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _mask(seed: Optional[Tensor], rows: int, cols: int, p: float, device) -> Optional[Tensor]:
    if seed is None or p == 0.0:
        return None
    return _ref.dropout_mask(int(seed.item()), rows, cols, p, device)


def _lora_fwd_kernel(x: Tensor, weight: Tensor, absmax: Optional[Tensor], nested_absmax: Optional[Tensor],
                     nested_code: Optional[Tensor], offset: Optional[Tensor], blocksize: int,
                     lora_A: Tensor, lora_B: Tensor, scaling: float, bias: Optional[Tensor],
                     dropout_p: float, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """x (M, K) -> (y (M, N), S (M, r)) with S = dropout(x) @ A^T rounded to x.dtype (saved for backward)."""
    with _no_autocast(x.device):
        impl = _backend.lora_impl("lora_fwd", x) or reference_fwd
        return impl(x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, scaling, bias,
                    dropout_p, seed)


def reference_fwd(x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, scaling, bias,
                  dropout_p, seed):
    """``lora_ops::lora_fwd`` on the PyTorch reference (reference.py): (y, S)."""
    m, k = x.shape
    w = _ref.dense_weight(weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_B.shape[0], k, x.dtype)
    y, s = _ref.lora_forward(x, w, lora_A, lora_B, scaling, bias, dropout_p, _mask(seed, m, k, dropout_p, x.device))
    return y, s.contiguous()


lora_fwd = torch.library.custom_op("lora_ops::lora_fwd", _lora_fwd_kernel, mutates_args=())


@lora_fwd.register_fake
def _(x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, scaling, bias,
      dropout_p, seed):
    m = x.shape[0]
    return x.new_empty((m, lora_B.shape[0])), x.new_empty((m, lora_A.shape[0]))


def _lora_bwd_kernel(dy: Tensor, x: Tensor, weight: Tensor, absmax: Optional[Tensor],
                     nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], offset: Optional[Tensor],
                     blocksize: int, lora_A: Tensor, lora_B: Tensor, s: Tensor, scaling: float, dropout_p: float,
                     seed: Optional[Tensor], need_dx: bool, need_dA: bool, need_dB: bool,
                     need_dbias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx (M, K), dA (r, K), dB (N, r), dbias (N,)); a gradient not asked for comes back with 0 elements."""
    with _no_autocast(dy.device):  # a backward run inside an autocast region must not recast it either
        impl = _backend.lora_impl("lora_bwd", dy) or reference_bwd
        return impl(dy, x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, s, scaling,
                    dropout_p, seed, need_dx, need_dA, need_dB, need_dbias)


def reference_bwd(dy, x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, s, scaling,
                  dropout_p, seed, need_dx, need_dA, need_dB, need_dbias):
    """``lora_ops::lora_bwd`` on the PyTorch reference: (dx, dA, dB, dbias), 0-element where not asked for."""
    m, k = x.shape
    w = None
    if need_dx:
        w = _ref.dense_weight(weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_B.shape[0], k,
                              x.dtype)
    grads = _ref.lora_backward(dy, x, w, lora_A, lora_B, s, scaling, dropout_p,
                               _mask(seed, m, k, dropout_p, x.device), need_dx, need_dA, need_dB, need_dbias)
    return tuple(g.contiguous() if g is not None else dy.new_empty((0,)) for g in grads)


# The reference as an eager (fwd, bwd) pair for lora_fwd_eager: the op's math without its dispatch.
REFERENCE_IMPL = (reference_fwd, reference_bwd)


lora_bwd = torch.library.custom_op("lora_ops::lora_bwd", _lora_bwd_kernel, mutates_args=())


@lora_bwd.register_fake
def _(dy, x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, s, scaling,
      dropout_p, seed, need_dx, need_dA, need_dB, need_dbias):
    # A fresh empty per slot: the real kernel returns distinct tensors, and a fake whose outputs alias each
    # other fails opcheck's alias check (and misinforms torch.compile's functionalization).
    empty = lambda: dy.new_empty((0,))  # noqa: E731
    return (x.new_empty(x.shape) if need_dx else empty(),
            lora_A.new_empty(lora_A.shape) if need_dA else empty(),
            lora_B.new_empty(lora_B.shape) if need_dB else empty(),
            dy.new_empty((dy.shape[1],)) if need_dbias else empty())


# Positions of the differentiable inputs of lora_fwd.
_X, _A, _B, _BIAS = 0, 7, 8, 10


def _setup_context(ctx, inputs, output):
    (x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, scaling, bias,
     dropout_p, seed) = inputs
    ctx.blocksize, ctx.scaling, ctx.dropout_p = blocksize, scaling, dropout_p
    # Only the NF4 bytes (or the frozen dense W) and S (M x r) are kept: no dequantized copy of W and no
    # dropout mask survive between forward and backward; the backward regenerates the mask from ``seed``.
    ctx.save_for_backward(x, weight, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, output[1], seed)


def _grads(ctx, grad_y, bwd):
    """The backward of lora_fwd through ``bwd`` (lora_bwd's signature): the op's own autograd and the eager
    Function below share it. Gradients only where ``needs_input_grad`` asks; never for the frozen weight."""
    x, weight, absmax, nested_absmax, nested_code, offset, lora_A, lora_B, s, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dA, dB, dbias = bwd(grad_y.contiguous(), x, weight, absmax, nested_absmax, nested_code, offset, ctx.blocksize,
                            lora_A, lora_B, s, ctx.scaling, ctx.dropout_p, seed, need[_X], need[_A], need[_B],
                            need[_BIAS])
    return (dx if need[_X] else None, None, None, None, None, None, None,
            dA if need[_A] else None, dB if need[_B] else None, None,
            dbias if need[_BIAS] else None, None, None)


def _backward(ctx, grad_y, grad_s):
    return _grads(ctx, grad_y, torch.ops.lora_ops.lora_bwd)


lora_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------- eager fast path

class _EagerLoRA(torch.autograd.Function):
    """The op and its autograd in one ``autograd.Function`` over the same fast kernels, for eager mode.

    In eager mode the custom-op machinery (schema binding, alias checks, the generated autograd node) cost
    about 1.5 ms of host time per fwd+bwd on the H200 host (scripts/host_profile.py, 2026-11-29: 2087 us per
    lora_linear fwd+bwd at 2048x4096->4096 against 517 us for the bare launchers), more than the layer's device
    time below M=8192. ``lora_linear`` therefore calls the kernels through this Function when nothing needs
    the op itself (see ``_backend.eager_impl``); torch.compile, dispatch modes (FakeTensor, functionalization, op
    spies) and opcheck see ``lora_ops::lora_fwd`` / ``lora_bwd``, whose kernels and math are the same.
    """

    @staticmethod
    def forward(ctx, x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, scaling, bias,
                dropout_p, seed, fwd, bwd):
        inputs = (x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, scaling, bias,
                  dropout_p, seed)
        y, s = fwd(*inputs)
        _setup_context(ctx, inputs, (y, s))
        ctx.bwd = bwd
        return y

    @staticmethod
    def backward(ctx, grad_y):
        with _no_autocast(grad_y.device):  # the launcher runs directly here, not inside lora_bwd's kernel
            return _grads(ctx, grad_y, ctx.bwd) + (None, None)


def eager_impl(x: Tensor):
    """(fwd, bwd) for an eager lora_linear on x: the fast kernels where they load for x, else the reference (on a
    CPU the custom op's dispatch is ~half a tiny layer's fwd+bwd); None when the call must go through the op
    itself (torch.compile, dispatch modes, functorch: ``_backend.op_required``; meta tensors: the op's fake)."""
    if x.device.type == "meta" or _backend.op_required():
        return None
    return _backend.eager_impl(x) or REFERENCE_IMPL


def lora_fwd_eager(impl, x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, scaling,
                   bias, dropout_p, seed) -> Tensor:
    """y of ``lora_ops::lora_fwd`` with its autograd, through ``_EagerLoRA`` (``impl``: ``_backend.eager_impl``)."""
    with _no_autocast(x.device):
        return _EagerLoRA.apply(x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B,
                                scaling, bias, dropout_p, seed, impl[0], impl[1])


# -------------------------------------------------------------------------------------- small-batch decode

def _lora_decode_kernel(x: Tensor, weight: Tensor, absmax: Optional[Tensor], nested_absmax: Optional[Tensor],
                        nested_code: Optional[Tensor], offset: Optional[Tensor], blocksize: int,
                        lora_A: Tensor, lora_B: Tensor, scaling: float, bias: Optional[Tensor]) -> Tensor:
    """Inference forward: x (M, K) -> y (M, N) = x @ W^T + scaling * (x @ A^T) @ B^T (+ bias); no dropout, no
    autograd. ``lora_linear`` calls it only when no gradient can be needed and M is small (``decode.py``); on
    CUDA it is one kernel (``csrc/lora_decode.cu``, which keeps S in fp32), elsewhere the reference forward."""
    with _no_autocast(x.device):  # like lora_fwd: compute in the inputs' dtype, as the fake promises
        impl = _backend.lora_impl("lora_decode", x)
        if impl is not None:
            return impl(x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B,
                        scaling, bias)
        w = _ref.dense_weight(weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_B.shape[0],
                              x.shape[1], x.dtype)
        return _ref.lora_forward(x, w, lora_A, lora_B, scaling, bias)[0]


lora_decode = torch.library.custom_op("lora_ops::lora_decode", _lora_decode_kernel, mutates_args=())


@lora_decode.register_fake
def _(x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, scaling, bias):
    return x.new_empty((x.shape[0], lora_B.shape[0]))


def lora_decode_eager(impl, x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, scaling,
                      bias) -> Tensor:
    """``lora_ops::lora_decode`` through its kernel ``impl`` (from ``_backend.eager_decode_impl``)."""
    with _no_autocast(x.device):
        return impl(x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B, scaling, bias)


# ------------------------------------------------------------------------------ direct dispatcher kernels

# The LoRA ops' kernels for CPU and CUDA tensors are also registered with the dispatcher directly (the same
# functions): custom_op's own per-call wrapper (device lookup, an output aliasing check) costs ~10 us per call on
# a CPU, and a compiled model calls each op once per layer and step. Other devices keep custom_op's path; the
# fakes and the autograd registered above are unchanged.
_DIRECT = torch.library.Library("lora_ops", "IMPL")
for _name, _kernel in (("lora_fwd", _lora_fwd_kernel), ("lora_bwd", _lora_bwd_kernel),
                       ("lora_decode", _lora_decode_kernel)):
    for _key in ("CPU", "CUDA"):
        _DIRECT.impl(_name, _kernel, _key)
