"""The one tolerance table and the assertion helpers every numerical test uses, and helpers several test files
share (running lora_linear with its dropout mask; checking that a failed call left a model unchanged).

Same-computation tests (kernel vs reference on the SAME weights) use ``assert_rel_close`` with the
tolerance of the inputs' dtype: relative Frobenius error ||out - ref|| / ||ref||. Mutation controls pass
a deliberately wrong result through the same helper and expect it to fail.
"""
import collections
import contextlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_ops import _backend, lora_linear, ops, reference
from lora_ops.inject import lora_layers
from lora_ops.testing import materialize_dropout_mask, peek_dropout_seed

# Relative Frobenius error allowed for a result computed from inputs of this dtype, against an oracle
# computed in fp32 or fp64 from the same inputs. fp32 is IEEE (no tf32); bf16/fp16 round the output once
# (plus the rounding of S), so they sit well under these bounds on random data.
REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "result") -> float:
    err = rel_error(out, ref)
    tol = REL_TOL[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} for {dtype}"
    return err


def assert_same_nonfinite(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Same NaN positions, same +-inf positions and signs, finite parts close (fp32 table entry)."""
    got, want = got.double(), want.double()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN positions differ"
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), f"{what}: +inf positions differ"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), f"{what}: -inf positions differ"
    fin = torch.isfinite(want)
    assert_rel_close(got[fin], want[fin], torch.float32, f"{what} finite part")


# ------------------------------------------------------------------------ lora_linear and its dropout mask

def run_lora(backend, x, w, a, b, scaling, bias, p, dy, seed=1234):
    """lora_linear forward + backward on ``backend`` under torch.manual_seed(seed): (y, dx, dA, dB, dbias)."""
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    bias = None if bias is None else bias.detach().clone().requires_grad_(True)
    with _backend.use_backend(backend):
        torch.manual_seed(seed)
        y = lora_linear(x, w, a, b, scaling, bias=bias, dropout_p=p)
        y.backward(dy)
    return y.detach(), x.grad, a.grad, b.grad, None if bias is None else bias.grad


def kernel_mask(backend, seed, rows, cols, p):
    """The keep-mask the selected backend draws for the next lora_linear call after manual_seed(seed), or None
    for p == 0 (no dropout: the oracles then take no mask)."""
    if p == 0.0:
        return None
    with _backend.use_backend(backend):
        torch.manual_seed(seed)
        return materialize_dropout_mask(peek_dropout_seed("cpu"), rows, cols, p, "cpu")


# --------------------------------------------------------------------- a failed call leaves a model unchanged

def randomize_adapters(model, seed=1, scale=0.2):
    """Every LoRA layer's A and B drawn from one generator (``seed``), N(0, scale^2): a model whose LoRA term is
    not zero, as training leaves it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)


def snapshot(model):
    """Everything a failed call must leave unchanged: module types, parameter flags and every tensor."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_unchanged(model, snap):
    types, flags, sd = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == types, "modules were swapped"
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags, "requires_grad flags changed"
    now = model.state_dict()
    assert set(now) == set(sd), f"state_dict keys changed: {set(now) ^ set(sd)}"
    for k, v in now.items():
        assert v.dtype == sd[k].dtype and v.device == sd[k].device and torch.equal(v, sd[k]), f"{k} changed"


def _refuse(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"reference {name} ran: the Triton path was expected")
    return refuse


# The GEMMs that run as the TMA kernel (lora_gemm_tma, or its Gluon twin lora_gemm_ws on sm_90) where it is
# enabled and applies.
TMA_GEMMS = ("lora_fwd", "lora_bwd_dx")
TMA_KERNELS = ("lora_gemm_tma", "lora_gemm_ws")


def tma_launches(counts) -> int:
    """Launches of the TMA GEMM in either form in a launch counter (records.LAUNCHES or a copy of it)."""
    return sum(counts.get(k, 0) for k in TMA_KERNELS)


@contextlib.contextmanager
def kernels_only(monkeypatch, expected=(), absent=()):
    """Inside, the reference implementations (and the ops' reference fallbacks) raise, so nothing can pass on
    the reference path. On exit, every Triton kernel in ``expected`` has launched (the forward or dX GEMM also
    by its TMA twin) and none in ``absent`` has (a dX GEMM not asked for, not as the TMA kernel either)."""
    from lora_ops.triton_kernels import lora as L  # needs Triton: imported only by the tests that use it
    before = collections.Counter(L.LAUNCHES)
    with monkeypatch.context() as m:
        for mod, name in ((reference, "lora_forward"), (reference, "lora_backward"), (reference, "dense_weight"),
                          (ops, "_mask")):
            m.setattr(mod, name, _refuse(name))
        yield
    tma = tma_launches(L.LAUNCHES) - tma_launches(before)
    for k in expected:
        assert L.LAUNCHES[k] > before[k] or (k in TMA_GEMMS and tma > 0), f"Triton kernel {k} did not launch"
    for k in absent:
        assert L.LAUNCHES[k] == before[k], f"Triton kernel {k} launched but its work was not needed"
        if k == "lora_bwd_dx":
            assert tma == 0, "the TMA GEMM launched in a backward that needs no dX"


def capture_graph(fn, grads=(), warmup=3):
    """benchmarks.harness.capture_graph: (graph, fn()'s value in the capture). The repository's benchmarks/ is
    put on the path here, at call time, as tests/test_benchmarks.py does at import (lora_ops is imported by then,
    so an installed lora_ops is not shadowed)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from benchmarks.harness import capture_graph as capture
    return capture(fn, grads, warmup)


def run_sm90_probe(source: str, timeout: int = 600):
    """Run ``source`` (a script that compiles Triton kernels for sm_90 and prints one JSON line last) in a
    subprocess without TRITON_INTERPRET (this process may run Triton's interpreter), and return that JSON.
    Skips when this Triton has no NVIDIA backend; no GPU is needed."""
    pytest.importorskip("triton")
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


class OpSpy(TorchDispatchMode):
    """Records the lora_ops:: ops that reach the dispatcher (and runs them). Being a dispatch mode it also makes
    lora_linear take the custom ops instead of its eager fast paths (lora_ops._backend.op_required)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("lora_ops."):
            self.ops.append(name.split(".")[1])
        return func(*args, **(kwargs or {}))


def stacked_nf4_with_offsets(rows, cols, seed=0, dtype=torch.float32):
    """Members of shapes (rows[i], cols), each quantized on its own with double quantization (its own offset), and
    their stack as a projection group keeps it with ``LORA_OPS_GROUP_ABSMAX=codes``: bytes, uint8 codes and nested
    absmax concatenated, the offsets one per nested block. Returns (stacked NF4Weight, [member NF4Weights]); every
    member but the last must span whole nested blocks (rows[i] * cols a multiple of 64 * 256)."""
    from lora_ops import NF4Weight, quantize_nf4
    from lora_ops.nf4 import NESTED_BLOCKSIZE

    g = torch.Generator().manual_seed(seed)
    members = []
    for i, r in enumerate(rows):
        w = torch.randn(r, cols, generator=g) * (0.02 * (i + 1)) + 0.01 * i  # other scales, other offsets
        members.append(quantize_nf4(w.to(dtype), blocksize=64, double_quant=True))
    assert all(w.absmax.numel() % NESTED_BLOCKSIZE == 0 for w in members[:-1]), "members must end on a nested block"
    data = torch.cat([w.data.reshape(-1) for w in members]).reshape(-1, 1)
    codes = torch.cat([w.absmax.reshape(-1) for w in members])
    nabs = torch.cat([w.nested_absmax.reshape(-1) for w in members])
    offsets = torch.cat([w.offset.reshape(1).expand(w.nested_absmax.numel()) for w in members])
    stacked = NF4Weight(data, codes, torch.Size((sum(rows), cols)), members[0].dtype, 64, nabs,
                        members[0].nested_code, offsets)
    return stacked, members
