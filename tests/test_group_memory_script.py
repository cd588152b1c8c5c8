"""scripts/group_memory.py on the CPU: its saved-tensor accounting, and the whole script on a tiny Llama."""
from __future__ import annotations

import importlib.util
import os
import re

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("group_memory", os.path.join(REPO, "scripts", "group_memory.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_saved_bytes_counts_each_storage_once_and_skips_excluded():
    gm = _script()
    w = torch.nn.Parameter(torch.randn(8, 3))
    x = torch.randn(4, 8, requires_grad=True)
    # x @ w saves x and w; w is excluded: x's 4 * 8 fp32 bytes remain.
    _, n = gm.saved_bytes(lambda: (x @ w).sum(), exclude=[w])
    assert n == 4 * 8 * 4
    # Two views of one (4, 16) storage saved by two ops count once, as the whole storage.
    big = torch.randn(4, 16, requires_grad=True)
    _, n = gm.saved_bytes(lambda: (big[:, :8] @ w).sum() + (big[:, 8:] @ w).sum(), exclude=[w])
    assert n == 4 * 16 * 4
    _, n = gm.saved_bytes(lambda: (x @ w).sum(), exclude=[])
    assert n == (4 * 8 + 8 * 3) * 4


def test_script_runs_on_a_tiny_model(capsys):
    pytest.importorskip("transformers")
    gm = _script()
    assert gm.main(["--size", "tiny", "--device", "cpu", "--layers", "1", "--tokens", "16"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\| (nf4|bf16) \|", line)]
    assert len(rows) == 7  # NF4: four ways (codes too), bf16: three
    held = {}
    for base in ("nf4", "bf16"):
        cells = [r.split("|") for r in rows if r.startswith(f"| {base} |")]
        losses = {c[7].strip() for c in cells}
        assert len(losses) == 1, f"{base}: grouped and ungrouped losses differ: {losses}"
        assert all(float(c[5]) > 0 for c in cells)
        assert all(c[3].strip() == "–" and c[6].strip() == "–" for c in cells)  # CUDA-only columns on the CPU
        held.update({(base, c[2].strip()): float(c[4]) for c in cells})
    # What the groups hold beyond their members: nothing dense; NF4's decoded fp32 absmax (1 layer of tiny:
    # (512 + 1024) * 256 / 64 blocks * 4 bytes = 24 KiB), with the codes only one offset per nested block.
    assert held[("bf16", "grouped")] == 0 and held[("nf4", "ungrouped")] == 0
    assert held[("nf4", "grouped")] == pytest.approx(24 / 1024, abs=0.005)
    assert held[("nf4", "grouped, codes")] < held[("nf4", "grouped")] / 50
