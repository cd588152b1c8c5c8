"""Build script. torch is imported only if installed; ``lora_ops._C`` is built only when torch has CUDA and
nvcc is found (``LORA_OPS_NO_EXT=1`` skips it). Otherwise the package installs as pure Python and the
extension is JIT-built on first use where a toolchain exists (``lora_ops/_ext.py``)."""
import glob
import os
import shutil

from setuptools import setup

PACKAGES = ["lora_ops", "lora_ops.triton_kernels"]
PACKAGE_DIR = {"lora_ops": "lora_ops", "lora_ops.triton_kernels": "triton_kernels"}


def _extension():
    if os.environ.get("LORA_OPS_NO_EXT", "0") not in ("", "0"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda is None or not nvcc or not os.path.exists(nvcc):
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join(here, "csrc", "*.cu")) + glob.glob(os.path.join(here, "csrc", "*.cpp")))
    if not sources:
        return [], {}
    sources = [os.path.relpath(s, here) for s in sources]
    from lora_build_flags import NVCC_FLAGS, CXX_FLAGS  # noqa: E402  (one list of flags for setup and the JIT)
    ext = CUDAExtension("lora_ops._C", sources, extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS})
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lora_ops"))
    ext_modules, cmdclass = _extension()
    setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
