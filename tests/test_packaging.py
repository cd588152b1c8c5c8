"""What an installed lora_ops relies on: the data it reads at run time ships inside the package, the CUDA
extension's architecture list and the license metadata setup.py gives."""
import glob
import os
import runpy
import shutil
import subprocess
import sys

import pytest

import lora_ops
from lora_ops import decode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.dirname(os.path.abspath(lora_ops.__file__))

sys.path.insert(0, os.path.join(REPO, "lora_ops"))
try:
    import lora_build_flags as flags  # import-free of torch, as setup.py loads it
finally:
    sys.path.pop(0)


# ------------------------------------------------------------------------------------------- package data

def test_runtime_data_is_package_data():
    setup = runpy.run_path(os.path.join(REPO, "setup.py"), run_name="setup_constants")
    assert "lora_ops.data" in setup["PACKAGES"]
    shipped = {os.path.relpath(p, PKG) for pattern in setup["PACKAGE_DATA"]["lora_ops.data"]
               for p in glob.glob(os.path.join(PKG, "data", pattern))}
    assert os.path.relpath(decode.RESULTS_FILE, PKG) in shipped
    assert decode.load_threshold(decode.RESULTS_FILE) > 0  # the measured threshold, not the "no file" default


def test_library_reads_nothing_outside_the_package():
    # Paths the library opens at run time are built from its own directory; none leads into the checkout.
    for path in glob.glob(os.path.join(PKG, "*.py")):
        text = open(path, encoding="utf-8").read()
        assert '"benchmarks"' not in text and "'benchmarks'" not in text, path


# ----------------------------------------------------------------------------------------- architectures

LIST_GPU_CODE = "sm_75\nsm_80\nsm_86\nsm_89\nsm_90\nsm_90a\nsm_100\nsm_100f\nsm_120\n"


def test_parse_gpu_codes_keeps_plain_targets():
    assert flags.parse_gpu_codes(LIST_GPU_CODE) == [75, 80, 86, 89, 90, 100, 120]


def test_build_flags_every_supported_arch_from_the_floor_plus_ptx():
    archs = flags.build_archs(flags.parse_gpu_codes(LIST_GPU_CODE))
    assert archs == [a for a in (75, 80, 86, 89, 90, 100, 120) if a >= flags.MIN_ARCH]
    got = flags.build_nvcc_flags("nvcc", archs, environ={})
    gencode = [f for f in got if f.startswith("-gencode")]
    assert gencode == [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs] + \
        [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    assert got[:len(flags.BASE_NVCC_FLAGS)] == flags.BASE_NVCC_FLAGS


def test_torch_cuda_arch_list_overrides():
    got = flags.build_nvcc_flags("nvcc", [90, 100], environ={"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX"})
    assert got == flags.BASE_NVCC_FLAGS  # torch's cpp_extension turns the variable into -gencode flags


def test_arch_list_fallbacks():
    assert flags.build_archs([]) == list(flags.FALLBACK_ARCHS)  # nvcc could not be asked
    assert flags.build_nvcc_flags("/nonexistent/nvcc", environ={})[-1] == \
        f"-gencode=arch=compute_{flags.FALLBACK_ARCHS[-1]},code=compute_{flags.FALLBACK_ARCHS[-1]}"
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        flags.build_nvcc_flags("nvcc", flags.build_archs([70, 75]), environ={})


def test_installed_nvcc_arch_list():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    supported = flags.nvcc_archs(nvcc)
    assert 90 in supported
    got = flags.build_nvcc_flags(nvcc, environ={})
    built = sorted(int(f.rsplit("sm_", 1)[1]) for f in got if "code=sm_" in f)
    assert built == [a for a in supported if a >= flags.MIN_ARCH]
    assert got[-1] == f"-gencode=arch=compute_{built[-1]},code=compute_{built[-1]}"


def test_compile_check_flags_stay_sm90():
    # scripts/compile_csrc.sh and tests/test_decode.py's ptxas report read NVCC_FLAGS: one architecture.
    assert [f for f in flags.NVCC_FLAGS if "gencode" in f] == ["-gencode=arch=compute_90,code=sm_90",
                                                              "-gencode=arch=compute_90,code=compute_90"]


# ---------------------------------------------------------------------------------------------- metadata

def test_license_is_an_spdx_expression_for_every_setuptools():
    setup = runpy.run_path(os.path.join(REPO, "setup.py"), run_name="setup_constants")
    assert setup["LICENSE"] == "Apache-2.0"
    import setuptools

    expected_key = "license_expression" if int(setuptools.__version__.split(".")[0]) >= 77 else "license"
    assert setup["_license"]() == {expected_key: "Apache-2.0"}
    pyproject = open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8").read()
    assert 'dynamic = ["license"]' in pyproject and "\nlicense =" not in pyproject


def test_decode_kernel_compiles_for_ampere_as_a_trap(tmp_path):
    """Below sm_90 the decode kernels (thread-block clusters) compile to a trap behind LORA_OPS_DECODE_SM90, so
    the extension builds from MIN_ARCH (sm_80) up without errors or warnings; sm_90 keeps the real kernels."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.join(root, "csrc", "lora_decode.cu")
    sizes = {}
    for arch in (flags.MIN_ARCH, 90):
        out = tmp_path / f"decode_{arch}.ptx"
        proc = subprocess.run([nvcc, *flags.BASE_NVCC_FLAGS, f"-arch=sm_{arch}", "-ptx", src, "-o", str(out),
                               "-I", os.path.join(root, "csrc")], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "warning" not in proc.stderr, proc.stderr[-3000:]
        ptx = out.read_text()
        sizes[arch] = ptx.count("\n")
        assert ("barrier.cluster" in ptx) == (arch >= 90), arch
    assert sizes[flags.MIN_ARCH] < sizes[90]
