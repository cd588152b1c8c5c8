"""Build script. torch is imported only if installed; ``lora_ops._C`` is built only when torch has CUDA and
nvcc is found (``LORA_OPS_NO_EXT=1`` skips it). Otherwise the package installs as pure Python and the
extension is JIT-built on first use where a toolchain exists (``lora_ops/_ext.py``)."""
import glob
import os
import shutil

from setuptools import setup

# lora_ops.data holds the data the library reads at run time (lora_ops/decode.py reads it), so that an installed
# wheel has it; listed as a package (of data only) because setuptools treats a package's subdirectory so.
PACKAGES = ["lora_ops", "lora_ops.data", "lora_ops.triton_kernels"]
PACKAGE_DIR = {"lora_ops": "lora_ops", "lora_ops.triton_kernels": "triton_kernels"}
PACKAGE_DATA = {"lora_ops.data": ["*.json"]}
LICENSE = "Apache-2.0"


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
    from lora_build_flags import CXX_FLAGS, build_nvcc_flags  # noqa: E402  (one module of flags for setup and the JIT)
    nvcc_flags = build_nvcc_flags(nvcc)
    archs = [f.split("code=")[1] for f in nvcc_flags if f.startswith("-gencode")]
    print("lora_ops._C: building for " + (", ".join(archs) if archs else
                                          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}"))
    ext = CUDAExtension("lora_ops._C", sources, extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc_flags})
    return [ext], {"build_ext": BuildExtension}


def _license():
    # The SPDX expression as PEP 639 metadata (License-Expression) where setuptools knows it (>= 77); older
    # setuptools (61-76) rejects a string `project.license` in pyproject.toml, so it is set here, where both work
    # (pyproject.toml lists "license" as dynamic).
    import setuptools

    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": LICENSE} if major >= 77 else {"license": LICENSE}


if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lora_ops"))
    ext_modules, cmdclass = _extension()
    setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA, ext_modules=ext_modules,
          cmdclass=cmdclass, **_license())
