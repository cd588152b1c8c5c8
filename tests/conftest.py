import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this variable when
# a kernel module is imported, so it is set here, before any test imports lora_ops.triton_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class _DropBnbOptionalKernelNotice(logging.Filter):
    # bitsandbytes' CPU backend logs this when the optional `kernels` package (a CPU kernel fetched from the
    # Hugging Face hub) is absent; it then runs its own CPU code, which is what the tests compare against.
    def filter(self, record):
        return "Failed to load CPU gemm_4bit_forward" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBnbOptionalKernelNotice())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")
