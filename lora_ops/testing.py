"""Helpers for tests that compare kernels with the reference: the dropout mask a kernel will use."""
from __future__ import annotations

import torch

from . import _backend
from .functional import draw_dropout_seed
from .reference import dropout_mask


def peek_dropout_seed(device) -> int:
    """The seed the next ``lora_linear`` call on ``device`` will draw (the generator is left untouched)."""
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if device.type == "cuda" else "cuda"):
        return int(draw_dropout_seed(device).item())


def materialize_dropout_mask(seed: int, rows: int, cols: int, p: float, device) -> torch.Tensor:
    """The boolean keep-mask (rows, cols) that the selected lora kernel generates for ``seed``.

    Runs the kernel's own mask code when the fast path is active for ``device`` (so a test compares the
    kernel's mask, not a copy of its formula), else the reference's.
    """
    device = torch.device(device)
    if _backend.implementation("lora_fwd", device.type) is not None:
        from .triton_kernels.lora import dropout_mask as kernel_mask
        return kernel_mask(seed, rows, cols, p, device)
    return dropout_mask(seed, rows, cols, p, device)
