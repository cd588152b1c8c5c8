"""When ``lora_linear`` runs the small-batch decode op (``lora_ops::lora_decode``) instead of the training path.

At decode sizes (a few tokens) the layer is a stream over W: the training path's S pass, GEMM and their
launches cost several times the weight bytes' time, while ``csrc/lora_decode.cu`` does
``y = x @ W^T + s * (x @ A^T) @ B^T (+ bias)`` in one launch that reads each weight byte once. It has no
backward, so ``lora_linear`` takes it only when nothing can need a gradient:

* x is on a device with the kernel (CUDA, extension loaded) and LORA_OPS_BACKEND is not ``reference`` or
  ``triton`` (forcing those means "run that backend", so they bypass the CUDA kernel);
* ``torch.is_grad_enabled()`` is False, or none of x, lora_A, lora_B, bias requires grad (decided here, in
  Python: inside a custom op ``requires_grad`` is not reliable);
* the LoRA dropout is off (p == 0 or not training), x is not float64 (reference-only), r <= 128;
* the GPU is sm_90 or newer (the kernel uses thread-block clusters);
* M (the rows of x after flattening the leading dims) is 1 .. ``decode_threshold()``.

The threshold is the largest M at which the decode kernel measured faster than the training path's forward on
the GPU. The GPU timing test in ``tests/test_decode.py`` writes it as ``decode_threshold.json`` (key
``"threshold"``, an int in 0..16, 0 disabling the decode path); the package reads the copy it ships,
``lora_ops/data/decode_threshold.json`` (package data, so an installed wheel has it too), and
``benchmarks/results/h200/decode_threshold.json`` keeps the same file beside the other H200 results (a test
checks that the two are identical). The file measured on the H200 is used on every GPU. Without that file the
decode path is off (threshold 0): a kernel joins the default path only after it was checked and measured on the
GPU.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

from . import _backend

# csrc/lora_decode.h: LORA_OPS_DECODE_MAX_M / LORA_OPS_DECODE_MAX_RANK (lora_ops._ext has the same numbers,
# but importing it would build the extension).
KERNEL_MAX_M = 16
KERNEL_MAX_RANK = 128
# Without a measured results file the decode path is OFF (threshold 0): the kernel is chosen by ``auto`` only
# once the GPU test has checked it against the reference and measured it faster (it writes the file).
DEFAULT_THRESHOLD = 0
# Inside the package, so that a wheel installed anywhere reads the same measurement as a checkout.
RESULTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "decode_threshold.json")
# Device types with a decode kernel (tests add "cpu" to exercise the dispatch with the op's CPU reference).
DEVICE_TYPES = ("cuda",)

_thresholds: Dict[str, int] = {}


def load_threshold(path: str) -> int:
    """The ``"threshold"`` of a decode_threshold.json; DEFAULT_THRESHOLD when the file does not exist."""
    if not os.path.exists(path):
        return DEFAULT_THRESHOLD
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); rewrite it with the GPU timing test of "
                         "tests/test_decode.py or delete it to use the default threshold") from None
    value = data.get("threshold") if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= KERNEL_MAX_M:
        raise ValueError(f"{path}: threshold={value!r} must be an int in [0, {KERNEL_MAX_M}] (the decode kernel "
                         "takes at most 16 rows); fix the file or delete it to use the default")
    return value


@torch.compiler.assume_constant_result
def decode_threshold() -> int:
    """Largest M sent to the decode op (read once per RESULTS_FILE path; a constant to torch.compile)."""
    if RESULTS_FILE not in _thresholds:
        _thresholds[RESULTS_FILE] = load_threshold(RESULTS_FILE)
    return _thresholds[RESULTS_FILE]


@torch.compiler.assume_constant_result
def kernel_available(device_type: str) -> bool:
    """Whether ``device_type`` has the decode kernel under the current LORA_OPS_BACKEND (loads the extension
    on first use; a constant to torch.compile, like the backend choice itself)."""
    if device_type not in DEVICE_TYPES or _backend.requested_backend() in ("reference", "triton"):
        return False
    return device_type != "cuda" or _backend.implementation("lora_decode", "cuda") is not None


_capable: Dict[int, bool] = {}


@torch.compiler.assume_constant_result
def device_has_kernel(index: int) -> bool:
    """Whether CUDA device ``index`` can run the decode kernel: it uses sm_90 instructions (thread-block
    clusters), so older GPUs keep the training path (the extension refuses the call there too)."""
    if index not in _capable:
        _capable[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _capable[index]


def use_decode(x2: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, bias: Optional[torch.Tensor],
               dropout_p: float) -> bool:
    """True when ``lora_linear`` should call ``lora_ops::lora_decode`` for the flattened x2 (M, K); see the
    module docstring. ``dropout_p`` is the effective probability (0 when not training)."""
    m = x2.shape[0]
    if dropout_p != 0.0 or x2.dtype == torch.float64 or not 1 <= m <= decode_threshold():
        return False
    if lora_A.shape[0] > KERNEL_MAX_RANK:
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, lora_A, lora_B, bias)):
        return False
    if not kernel_available(x2.device.type):
        return False
    return not x2.is_cuda or device_has_kernel(x2.device.index if x2.device.index is not None
                                               else torch.cuda.current_device())


def threshold_from_timings(timings) -> int:
    """The threshold a measurement supports: the largest M <= 16 such that at every measured M' <= M, for every
    weight kind, the decode op's median time is below the training path's forward; 0 when it loses at the
    smallest M. ``timings``: {kind: {M (int or str): {"decode_us": float, "training_us": float}}}."""
    per_m: Dict[int, bool] = {}
    for kind, rows in timings.items():
        for m, row in rows.items():
            m = int(m)
            wins = float(row["decode_us"]) < float(row["training_us"])
            per_m[m] = per_m.get(m, True) and wins
    best = 0
    for m in sorted(per_m):
        if m > KERNEL_MAX_M or not per_m[m]:
            break
        best = m
    return best
