"""Which implementation runs an op: ``LORA_OPS_BACKEND=auto|triton|cuda|reference`` and what is installed.

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


def requested_backend() -> str:
    if _override is not None:
        return _override
    name = os.environ.get("LORA_OPS_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"LORA_OPS_BACKEND={name!r} is not one of {BACKENDS}; unset it or pick one of those")
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
