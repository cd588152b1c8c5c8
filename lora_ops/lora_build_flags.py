"""Compiler flags for lora_ops._C, shared by setup.py and the JIT build (kept import-free of torch, so that
setup.py and the shell scripts can read it without torch).

Architectures: a build compiles machine code for every GPU architecture the installed nvcc can target from
``MIN_ARCH`` up, plus PTX of the newest one (so a GPU newer than the toolkit can JIT it). Setting
``TORCH_CUDA_ARCH_LIST`` (torch's variable, e.g. ``"9.0"`` or ``"9.0;12.0+PTX"``) replaces that list: no
``-gencode`` flag is added here and torch's cpp_extension turns the variable into flags.
"""
import os
import re
import subprocess
from typing import Iterable, List, Optional, Sequence

BASE_NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
# Ampere (sm_80/86) and Ada (sm_89) up. csrc/lora_decode.cu's thread-block clusters and bulk L2 prefetch are
# sm_90 instructions: below sm_90 its kernels compile to a trap behind LORA_OPS_DECODE_SM90 and are never
# launched (the host entry and lora_ops.decode check the device), so those GPUs keep the training path.
MIN_ARCH = 80
# When nvcc cannot be asked (``--list-gpu-code`` is missing or fails): Ampere and Hopper.
FALLBACK_ARCHS = (80, 90)
# sm_90 machine code plus compute_90 PTX: the single-architecture compile used by the compile checks
# (scripts/compile_csrc.sh, tests/test_decode.py's ptxas report, scripts/build_decode_bench.sh).
NVCC_FLAGS = BASE_NVCC_FLAGS[:2] + ["-gencode=arch=compute_90,code=sm_90",
                                    "-gencode=arch=compute_90,code=compute_90"] + BASE_NVCC_FLAGS[2:]
# LORA_OPS_LAUNCH_CUDA: csrc/lora_launch.cpp launches kernels (its CPU test build only compares argument lists).
CXX_FLAGS = ["-O3", "-std=c++17", "-DLORA_OPS_LAUNCH_CUDA"]


def parse_gpu_codes(text: str) -> List[int]:
    """The plain ``sm_XY`` targets in ``nvcc --list-gpu-code`` output, as sorted ints (``sm_90a``-style
    architecture-specific targets are skipped: their code runs on that one architecture only)."""
    return sorted({int(m) for m in re.findall(r"^\s*sm_(\d+)\s*$", text, flags=re.M)})


def nvcc_archs(nvcc: str) -> List[int]:
    """Every ``sm_XY`` the compiler ``nvcc`` can target; [] when it cannot be asked."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_gpu_codes(out.stdout) if out.returncode == 0 else []


def gencode_flags(archs: Iterable[int]) -> List[str]:
    """``-gencode`` flags: machine code for each arch, PTX for the newest."""
    archs = sorted(set(archs))
    if not archs:
        raise ValueError("no GPU architecture to build for")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def build_archs(available: Sequence[int], minimum: int = MIN_ARCH) -> List[int]:
    """The architectures a build targets: those of ``available`` from ``minimum`` up (``FALLBACK_ARCHS`` when
    nvcc listed none)."""
    archs = [a for a in available if a >= minimum]
    return archs if available else list(FALLBACK_ARCHS)


def build_nvcc_flags(nvcc: Optional[str], archs: Optional[Sequence[int]] = None, environ=None) -> List[str]:
    """nvcc flags of the extension build: ``BASE_NVCC_FLAGS`` plus ``-gencode`` flags for ``archs`` (default:
    every arch ``nvcc`` supports from ``MIN_ARCH`` up), or no ``-gencode`` at all when TORCH_CUDA_ARCH_LIST is
    set (torch's cpp_extension then adds the flags of that list)."""
    environ = os.environ if environ is None else environ
    if environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return list(BASE_NVCC_FLAGS)
    if archs is None:
        archs = build_archs(nvcc_archs(nvcc) if nvcc else [])
    if not archs:
        raise ValueError(f"nvcc ({nvcc}) supports no GPU architecture from sm_{MIN_ARCH} up; install a newer CUDA "
                         "toolkit or set TORCH_CUDA_ARCH_LIST")
    return list(BASE_NVCC_FLAGS) + gencode_flags(archs)
