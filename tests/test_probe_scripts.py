"""The GPU probes' arithmetic, checked on the CPU: what scripts/probe_compose.py times must be the group's
fwd+bwd, or its numbers (docs/PERF_NOTES.md) would time other work."""
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture
def probe_compose(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.syspath_prepend(str(SCRIPTS.parent))
    import probe_compose as module
    yield module
    sys.modules.pop("probe_compose", None)


@pytest.mark.parametrize("part", ["qkv", "gate_up"])
@pytest.mark.parametrize("kcat", [False, True], ids=["beta1", "kcat"])
def test_compose_is_the_groups_fwd_and_bwd(probe_compose, part, kcat):
    """y, dX, dA and the block-diagonal B's gradient of the composed step equal autograd's through
    y = x·W_catᵀ + (x·A_catᵀ)·(s·B_bd)ᵀ, for a q/k/v and a gate/up group (fp32, M = 64)."""
    from benchmarks import block, presets

    case = presets.block_case("block", "llama3-8b", 64, "float32", part=part)
    data = block.make_block_data(case, torch.device("cpu"))
    t = probe_compose._group_tensors(case, data)
    y, dx, da, db = probe_compose._compose(t, kcat)()
    x = t["x"].clone().requires_grad_(True)
    a = t["a"].clone().requires_grad_(True)
    b = t["b"].clone().requires_grad_(True)
    want_y = x @ t["w"].t() + (x @ a.t()) @ b.t()
    want_y.backward(torch.cat(t["dys"], dim=1))
    for name, got, want in (("y", y, want_y), ("dX", dx, x.grad), ("dA", da, a.grad), ("dB", db, b.grad)):
        torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-4, msg=name)


def test_compose_pieces_run(probe_compose):
    """Each timed piece runs on the group's operands (shapes agree), q/k/v at M = 64."""
    from benchmarks import block, presets

    case = presets.block_case("block", "llama3-8b", 64, "float32", part="qkv")
    t = probe_compose._group_tensors(case, block.make_block_data(case, torch.device("cpu")))
    pieces = probe_compose._pieces(t)
    assert len(pieces) == 13
    for fn in pieces.values():
        fn()


@pytest.fixture
def ab_settings(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.syspath_prepend(str(SCRIPTS.parent))
    import ab_settings as module
    yield module
    module._use("default")
    sys.modules.pop("ab_settings", None)


def test_ab_settings_variants_set_and_restore_the_launcher_settings(ab_settings, monkeypatch):
    """A variant sets the launcher settings it names (the NF4 chunk bound and row limit, presum, flattening) and
    leaves the rest at their defaults; the next variant starts from the defaults again; a typo is refused."""
    from lora_ops.triton_kernels import lora as L

    monkeypatch.delenv("LORA_OPS_TMA_FLATTEN", raising=False)
    before = (L.NF4_CHUNK_BYTES, L.NF4_CHUNK_MIN_M, L._PRESUM)
    ab_settings._use("chunk_mib=8 chunk_min_m=2048 presum=0 flatten=1")
    assert (L.NF4_CHUNK_BYTES, L.NF4_CHUNK_MIN_M, L._PRESUM) == (8 << 20, 2048, False)
    assert len(L._nf4_chunks(6144, 4096, 64, 2, "rows")) == 6  # q/k/v's 48 MiB temporary in 8 MiB chunks
    import os
    assert os.environ["LORA_OPS_TMA_FLATTEN"] == "1"
    ab_settings._use("chunk_mib=16")
    assert (L.NF4_CHUNK_BYTES, L.NF4_CHUNK_MIN_M, L._PRESUM) == (16 << 20, before[1], before[2])
    assert "LORA_OPS_TMA_FLATTEN" not in os.environ
    ab_settings._use("default")
    assert (L.NF4_CHUNK_BYTES, L.NF4_CHUNK_MIN_M, L._PRESUM) == before
    with pytest.raises(ValueError, match="chunk_mib"):
        ab_settings._use("chunk_mb=8")
    sides = (L._SIDE_DA, L._SIDE_DQ)
    ab_settings._use("side=1 side_dq=1")
    assert (L._SIDE_DA, L._SIDE_DQ) == (True, True)
    ab_settings._use("side_dq=1")
    assert (L._SIDE_DA, L._SIDE_DQ) == (sides[0], True)
    ab_settings._use("default")
    assert (L._SIDE_DA, L._SIDE_DQ) == sides
    ws = L._WS
    ab_settings._use("ws=0")
    assert L._WS is False
    ab_settings._use("default")
    assert L._WS == ws


def test_probe_seed_variants_compute_their_products_in_the_interpreter():
    """scripts/probe_seed.py under the Triton interpreter (fp16, tiny shapes): every GEMM variant it times gives its
    product (the base alone, or with the LoRA term) within 1e-2 of the fp32 one, and every dequantize config is
    bit-identical to the default's; the script asserts both and exits non-zero otherwise."""
    import os
    import subprocess

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "probe_seed.py"), "--device", "cpu", "--dtype", "float16",
                           "--shapes", "200x192x384x48", "--dequant-configs", "2048/4,4096/8"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=SCRIPTS.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum("max rel err" in line for line in lines) == 11, proc.stdout
    assert any("every config bit-identical" in line for line in lines), proc.stdout
