"""Which implementation runs an op: ``LORA_OPS_BACKEND=auto|triton|cuda|reference`` and what is installed.

The one place that decides: ``implementation`` (which kernel, if any, for an op and device), ``lora_impl`` (the
same for the LoRA ops, float64 always on the reference), ``op_required`` (whether a call must go through the
custom op itself instead of an eager fast path: compiling, dispatch modes, functorch) and ``eager_impl`` /
``eager_decode_impl`` (the kernels an eager call may use directly). ``lora_ops._launch`` (the C++ launch path),
``ops`` and ``decode`` ask here.

Each op lists its fast implementations by backend as ``"module:function"`` strings (loaded lazily, so
``import lora_ops`` never needs Triton or the compiled extension). ``auto`` picks, on CUDA tensors, the
first implementation of the op's preference order that loads; on CPU tensors, the reference. A forced
backend applies to the ops that have it (an op without it keeps its ``auto`` choice). ``triton`` on CPU
tensors needs ``TRITON_INTERPRET=1`` (Triton's interpreter; used by the CPU tests).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

BACKENDS = ("auto", "triton", "cuda", "reference")

# op name -> ordered (backend, "module:function") for auto on CUDA; filled in by the kernel modules' owners.
IMPLEMENTATIONS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "nf4_quantize": (("cuda", "lora_ops._ext:nf4_quantize"),),
    "quantize_blockwise_8bit": (("cuda", "lora_ops._ext:quantize_blockwise_8bit"),),
    "nf4_dequantize": (("triton", "lora_ops.triton_kernels.nf4_dequant:dequantize_nf4"),),
    # The Triton kernels, launched from C++ where the extension is built (lora_ops._launch), else from Python.
    "lora_fwd": (("triton", "lora_ops._launch:lora_forward"),),
    "lora_bwd": (("triton", "lora_ops._launch:lora_backward"),),
    "lora_decode": (("cuda", "lora_ops._ext:lora_decode"),),
}

_loaded: Dict[str, Optional[Callable]] = {}
_warned = set()
_override: Optional[str] = None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Dispatch as if ``LORA_OPS_BACKEND=name`` inside the block (the benchmarks time the reference on the GPU).

    Process-wide, not thread-local: autograd runs CUDA backward ops on its own device threads, which must see it.
    """
    global _override
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"use_backend({name!r}): the backend must be one of {BACKENDS}")
    previous, _override = _override, name.strip().lower()
    try:
        yield
    finally:
        _override = previous


_parsed: Dict[Optional[str], str] = {}  # LORA_OPS_BACKEND's raw value -> the backend it names (read per call)


def requested_backend() -> str:
    if _override is not None:
        return _override
    raw = os.environ.get("LORA_OPS_BACKEND")
    name = _parsed.get(raw)
    if name is None:
        name = (raw or "auto").strip().lower() or "auto"
        if name not in BACKENDS:
            raise ValueError(f"LORA_OPS_BACKEND={name!r} is not one of {BACKENDS}; unset it or pick one of those")
        if len(_parsed) < 64:
            _parsed[raw] = name
    return name


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load(target: str) -> Optional[Callable]:
    if target not in _loaded:
        mod, fn = target.split(":")
        try:
            impl = getattr(importlib.import_module(mod), fn)
            for needed in getattr(impl, "requires", ()):  # modules the implementation imports when it runs
                importlib.import_module(needed)
            _loaded[target] = impl
        except Exception as e:  # ImportError, a failed JIT build, a missing driver ...
            _loaded[target] = None
            if target not in _warned:
                _warned.add(target)
                warnings.warn(f"lora_ops: {target} is unavailable ({type(e).__name__}: {e}); "
                              "using the next implementation (ultimately the PyTorch reference)", stacklevel=3)
    return _loaded[target]


def implementation(op: str, device_type: str) -> Optional[Callable]:
    """The fast implementation of ``op`` for tensors on ``device_type``, or None for the reference."""
    want = requested_backend()
    if want == "reference":
        return None
    choices = IMPLEMENTATIONS.get(op, ())
    if device_type != "cuda":
        if want == "triton" and triton_interpreter():
            for backend, target in choices:
                if backend == "triton":
                    fn = _load(target)
                    if fn is None:
                        raise RuntimeError(f"LORA_OPS_BACKEND=triton but {target} failed to load; see the warning")
                    return fn
        interpreted = want == "triton" and triton_interpreter()
        if want != "auto" and not interpreted and (want, device_type) not in _warned:
            # The user asked for GPU kernels; say once what runs instead of silently using the reference.
            _warned.add((want, device_type))
            hint = " (Triton runs on CPU tensors only under TRITON_INTERPRET=1)" if want == "triton" else ""
            warnings.warn(f"lora_ops: LORA_OPS_BACKEND={want} has no kernels for {device_type} tensors{hint}; "
                          f"running the PyTorch reference path instead. Move the tensors to CUDA, or set "
                          "LORA_OPS_BACKEND=reference (or auto) to silence this", stacklevel=3)
        return None
    if want in ("triton", "cuda"):
        forced = [t for b, t in choices if b == want]
        if forced:
            fn = _load(forced[0])
            if fn is None:
                raise RuntimeError(f"LORA_OPS_BACKEND={want} but {forced[0]} failed to load; see the warning, "
                                   "or set LORA_OPS_BACKEND=auto")
            return fn
    for _, target in choices:
        fn = _load(target)
        if fn is not None:
            return fn
    return None


def lora_impl(op: str, x: torch.Tensor) -> Optional[Callable]:
    """The fast kernel of a LoRA op (lora_fwd, lora_bwd, lora_decode) on x's device, or None. float64 (gradcheck,
    float64 oracles) always runs the reference: the Triton/CUDA kernels are written for bf16/fp16/fp32 only."""
    if x.dtype == torch.float64:
        return None
    return implementation(op, x.device.type)


def op_required() -> bool:
    """Whether a call must go through the custom op itself: under torch.compile / tracing, inside a dispatch
    mode (FakeTensor, functionalization, op spies) or a functorch transform."""
    return bool(torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._are_functorch_transforms_active())


def eager_impl(x: torch.Tensor) -> Optional[Tuple[Callable, Callable]]:
    """(fwd, bwd) fast kernels for an eager ``lora_linear`` on x, or None when the call must go through the
    custom op (``op_required``) or runs on the reference backend (CPU, float64, LORA_OPS_BACKEND=reference)."""
    if op_required():
        return None
    fwd = lora_impl("lora_fwd", x)
    if fwd is None:
        return None
    bwd = lora_impl("lora_bwd", x)
    return None if bwd is None else (fwd, bwd)


def eager_decode_impl(x: torch.Tensor) -> Optional[Callable]:
    """The decode kernel for an eager ``lora_linear`` on x, or None when the call must go through
    ``lora_ops::lora_decode`` (``op_required``, or no kernel for x). The Python custom op's dispatch costs
    tens of microseconds of host time per call, as much as the kernel itself at decode sizes; the decode path
    has no autograd, so the eager call is just the kernel (same arguments, same result)."""
    return None if op_required() else lora_impl("lora_decode", x)
