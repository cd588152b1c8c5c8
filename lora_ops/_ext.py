"""The compiled CUDA helpers (``csrc/``): NF4 quantize, the 8-bit quantize of double quantization, and the
small-batch decode kernel (``lora_decode``).

Importing this module makes ``torch.ops.lora_ops.nf4_quantize_cuda``, ``quantize_blockwise_8bit_cuda`` and
``lora_decode_cuda`` available, from (1) the prebuilt ``lora_ops._C`` (built by setup.py when torch has CUDA
and nvcc exists), else
(2) a JIT build with ``torch.utils.cpp_extension.load`` cached under ``~/.cache/lora_ops/<torch version>/``
(a rerun is a cache hit; sources from ``<repo>/csrc`` or ``$LORA_OPS_CSRC``), else it raises ``ImportError``
saying what is missing; ``_backend`` then warns once and uses the next implementation (ultimately the PyTorch
reference, which gives the same bytes).

csrc/bindings.cpp owns the module's PYBIND11_MODULE; other csrc/*.cpp files add ops with their own
``TORCH_LIBRARY_FRAGMENT(lora_ops, m)`` blocks and must not define a second module init.

``nf4_quantize`` and ``quantize_blockwise_8bit`` have exactly the signatures of the custom ops in ``ops.py``
(this module is their CUDA implementation, see ``_backend.IMPLEMENTATIONS``). The NF4 decision bounds and the
8-bit map are data from ``lora_ops.nf4``, handed to the kernels as small device tensors.
"""
from __future__ import annotations

import functools
import glob
import importlib
import os
import shutil
from typing import List, Optional, Tuple

import torch

from . import nf4 as _nf4

_OPS = ("nf4_quantize_cuda", "quantize_blockwise_8bit_cuda", "lora_decode_cuda")
_origin = ""
_module = None  # the loaded Python module (pybind11 functions: the launch path of csrc/lora_launch.cpp)


def _registered() -> bool:
    return all(hasattr(torch.ops.lora_ops, name) for name in _OPS)


def csrc_dir() -> str:
    """Where the CUDA sources are: ``$LORA_OPS_CSRC`` if set, else ``<repo>/csrc`` next to the package (an
    editable install or a checkout; a wheel install has no sources and relies on the prebuilt ``_C``)."""
    if os.environ.get("LORA_OPS_CSRC"):
        return os.path.abspath(os.environ["LORA_OPS_CSRC"])
    pkg = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(os.path.dirname(pkg), "csrc")


def build_dir() -> str:
    """The JIT build's cache, one per torch build (a CUDA-version change is a torch-version change)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "lora_ops", torch.__version__.replace("+", "_"))


def _jit_build() -> str:
    from torch.utils import cpp_extension

    from .lora_build_flags import CXX_FLAGS, MIN_ARCH, build_nvcc_flags, nvcc_archs

    problems: List[str] = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build (no CUDA)")
    home = cpp_extension.CUDA_HOME
    nvcc = shutil.which("nvcc") or (os.path.join(home, "bin", "nvcc") if home else None)
    if not nvcc or not os.path.exists(nvcc):
        problems.append("nvcc was not found (install the CUDA toolkit or set CUDA_HOME)")
    if not cpp_extension.is_ninja_available():
        problems.append("ninja was not found (pip install ninja)")
    src = csrc_dir()
    sources = sorted(glob.glob(os.path.join(src, "*.cu")) + glob.glob(os.path.join(src, "*.cpp")))
    if not sources:
        problems.append(f"the CUDA sources are missing (no csrc/*.cu or *.cpp under {src}; install from a "
                        "checkout with `pip install --no-build-isolation -e .`, or point LORA_OPS_CSRC at a csrc/)")
    if problems:
        raise ImportError("lora_ops._C is not built and cannot be JIT-built: " + "; ".join(problems)
                          + ". The NF4 quantize falls back to the PyTorch reference (same bytes, slower).")
    # The JIT build is for this machine: the visible GPUs' architectures (a setup.py build targets every
    # architecture nvcc supports from MIN_ARCH up; TORCH_CUDA_ARCH_LIST overrides both).
    archs = sorted({10 * major + minor for major, minor in
                    (torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))})
    if archs and max(archs) < MIN_ARCH and not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        raise ImportError(f"lora_ops._C needs a GPU of compute capability {MIN_ARCH // 10}.{MIN_ARCH % 10} or newer "
                          f"(this machine's: {', '.join(f'{a // 10}.{a % 10}' for a in archs)}); the NF4 quantize "
                          "falls back to the PyTorch reference (same bytes) and the Triton kernels run as usual")
    # A GPU newer than the toolkit gets the build's default (every supported arch, PTX of the newest).
    supported = nvcc_archs(nvcc)
    nvcc_flags = build_nvcc_flags(nvcc, [a for a in archs if a >= MIN_ARCH and a in supported] or None)
    directory = build_dir()
    os.makedirs(directory, exist_ok=True)
    # cpp_extension.load hashes the sources and flags: an unchanged rerun only loads the cached library.
    global _module
    _module = cpp_extension.load(name="lora_ops_C", sources=sources, extra_cflags=list(CXX_FLAGS),
                       extra_cuda_cflags=nvcc_flags, extra_include_paths=[src], build_directory=directory,
                       is_python_module=True, verbose=False)
    return f"JIT build in {directory}"


def _load() -> str:
    global _module
    first_error = None
    try:
        mod = importlib.import_module("lora_ops._C")
        if _registered():
            _module = mod
            return f"prebuilt {mod.__file__}"
        first_error = f"lora_ops._C ({mod.__file__}) does not register {_OPS}"
    except ModuleNotFoundError as e:  # not built: a CPU install, LORA_OPS_NO_EXT=1, or no nvcc at install time
        if e.name != "lora_ops._C":
            first_error = f"lora_ops._C failed to load ({e})"
    except ImportError as e:  # built, but against another torch/CUDA (undefined symbols): try the JIT build
        first_error = f"lora_ops._C failed to load ({e})"
    try:
        return _jit_build()
    except ImportError as e:
        raise ImportError(f"{e}{' (also: ' + first_error + ')' if first_error else ''}") from None
    except Exception as e:  # a failed compile: say so in one line, keep the details in __cause__
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()][:3] or lines[-1:]
        raise ImportError(f"JIT build of lora_ops._C from {csrc_dir()} into {build_dir()} failed "
                          f"({type(e).__name__}): {' | '.join(errors)}") from e


_origin = _load()


def origin() -> str:
    """Where the loaded extension came from (prebuilt module path or the JIT cache)."""
    return _origin


def module():
    """The loaded extension as a Python module (its pybind11 functions: ``launch_*``)."""
    return _module


@functools.lru_cache(maxsize=None)  # one tensor per device, made on first use
def _bounds(device: torch.device) -> torch.Tensor:
    # The 15 strict-'>' bounds of the reference (midpoints; tie-up ones one ulp lower), as a device tensor.
    return _nf4._nf4_thresholds(device).contiguous()


def nf4_quantize(weight: torch.Tensor, blocksize: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float CUDA weight -> (packed uint8 ((n+1)//2, 1), absmax fp32 (ceil(n/blocksize),))."""
    _nf4._check_blocksize(blocksize)
    if weight.dtype not in _nf4.FLOAT_DTYPES:
        raise TypeError(f"weight.dtype={weight.dtype} cannot be quantized to NF4; use float32, float16 or bfloat16")
    return torch.ops.lora_ops.nf4_quantize_cuda(weight.contiguous(), _bounds(weight.device), blocksize)


def quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor,
                            blocksize: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 CUDA values -> (uint8 codes (n,), fp32 absmax (ceil(n/blocksize),)) against the 256-entry ``code``."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize={blocksize!r} must be a positive int (double quantization uses 256)")
    if code.numel() != 256:
        raise ValueError(f"code has {code.numel()} entries; the 8-bit map needs 256 (nf4.dynamic_map())")
    values = values.reshape(-1).to(torch.float32).contiguous()
    code = code.reshape(-1).to(device=values.device, dtype=torch.float32).contiguous()
    return torch.ops.lora_ops.quantize_blockwise_8bit_cuda(values, code, blocksize)


# ------------------------------------------------------------------------------------ small-batch decode

# The kernel's limits (csrc/lora_decode.h: LORA_OPS_DECODE_MAX_M, LORA_OPS_DECODE_MAX_RANK).
DECODE_MAX_M = 16
DECODE_MAX_RANK = 128
# csrc/lora_decode.h LoraOpsDecodePath: which kernel ran.
DECODE_PATHS = {0: "general", 1: "tensor_core"}

@functools.lru_cache(maxsize=None)  # one tensor per device, made on first use
def _codebook(device: torch.device) -> torch.Tensor:
    # The 16 NF4 code values of lora_ops.nf4, as a device tensor (the kernel builds its tables from it).
    return _nf4.nf4_codebook(device).contiguous()


def lora_decode_with_path(x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor],
                          nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                          offset: Optional[torch.Tensor], blocksize: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
                          scaling: float, bias: Optional[torch.Tensor],
                          out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, str]:
    """``lora_decode`` that also says which kernel ran ("tensor_core", "general" or "reference"); ``out`` (M, N)
    of x.dtype, when given, is written in place (the tests poison it first)."""
    m, k = x.shape
    n, r = lora_B.shape
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out, "reference"
    if m > DECODE_MAX_M or r > DECODE_MAX_RANK:
        # Outside the kernel's limits (lora_linear never sends these here): the same math through torch.
        if absmax is None:
            w = weight
        else:
            w = torch.ops.lora_ops.nf4_dequantize(weight, absmax, nested_absmax, nested_code, offset, blocksize, n, k,
                                                  x.dtype)
        y = torch.nn.functional.linear(x, w, bias) + (x @ lora_A.t()) @ lora_B.t() * scaling
        return out.copy_(y), "reference"
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    path = torch.ops.lora_ops.lora_decode_cuda(
        x.contiguous(), weight.contiguous(), c(absmax), c(nested_absmax), c(nested_code), c(offset), int(blocksize),
        lora_A.contiguous(), lora_B.contiguous(), float(scaling), c(bias), _codebook(x.device), out)
    return out, DECODE_PATHS[path]


def lora_decode(x: torch.Tensor, weight: torch.Tensor, absmax: Optional[torch.Tensor],
                nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                offset: Optional[torch.Tensor], blocksize: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y (M, N) = x @ W^T + scaling * (x @ A^T) @ B^T (+ bias) in one CUDA launch for M <= 16, r <= 128 (the
    signature of the ``lora_ops::lora_decode`` op, whose CUDA implementation this is)."""
    return lora_decode_with_path(x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_A, lora_B,
                                 scaling, bias)[0]
