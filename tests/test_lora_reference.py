"""lora_linear on the reference path against float64 math written here, gradcheck, NF4 twins and PEFT.

The oracle below is plain ``F.linear`` in float64 differentiated by autograd: it shares no code with
``lora_ops.reference`` (whose hand-written backward is what is under test).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import lora_ops
from lora_ops import lora_linear, quantize_nf4
from helpers import assert_rel_close

# (M, K, N, r): M = 1 and a prime M, K = 129 (not a multiple of any block or tile), N = 70, r = 1 and 8.
SHAPES = [(1, 129, 70, 1), (37, 129, 70, 8), (37, 33, 70, 1), (1, 17, 5, 8)]


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LORA_OPS_BACKEND", "reference")


def make_inputs(m, k, n, r, dtype, bias=True, seed=0, lead=None):
    """x (*lead or M, K), W (N, K), A (r, K), B (N, r), bias (N,) with O(1) entries; B is non-zero (unlike
    PEFT's init) so that the adapter branch is exercised. Scaled so the two branches are of similar size."""
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, k) if lead is not None else (m, k)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    a = (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype)
    b = (torch.randn(n, r, generator=g) / r ** 0.5).to(dtype)
    bb = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, a, b, bb


def oracle64(x, w, a, b, scaling, bias=None, mask=None, p=0.0, dy=None):
    """float64 y and gradients (dx, dA, dB, dbias) of sum(y * dy) by autograd of F.linear."""
    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, a, b))
    w64 = w.detach().double()
    bias64 = None if bias is None else bias.detach().double().requires_grad_(True)
    xd = x64 if mask is None else x64 * mask.double() / (1.0 - p)
    y = F.linear(x64, w64, bias64) + scaling * F.linear(F.linear(xd, a64), b64)
    dy = torch.ones_like(y) if dy is None else dy.double()
    leaves = [x64, a64, b64] + ([bias64] if bias64 is not None else [])
    grads = torch.autograd.grad(y, leaves, dy)
    return (y.detach(),) + tuple(grads) + ((None,) if bias is None else ())


def run_op(x, w, a, b, scaling, bias=None, dy=None, **kw):
    """lora_linear's y and gradients (dx, dA, dB, dbias) of sum(y * dy)."""
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    bias = None if bias is None else bias.detach().clone().requires_grad_(True)
    y = lora_linear(x, w, a, b, scaling, bias, **kw)
    y.backward(torch.ones_like(y) if dy is None else dy)
    return y.detach(), x.grad, a.grad, b.grad, None if bias is None else bias.grad


def assert_matches(got, want, dtype, what=""):
    """The one comparison of this file: y and every gradient within REL_TOL[dtype] of the oracle."""
    for name, g, r in zip(("y", "dx", "dA", "dB", "dbias"), got, want):
        if r is None:
            assert g is None, f"{what}{name}: expected no gradient"
            continue
        assert_rel_close(g, r, dtype, f"{what}{name}")


def _dy(shape, dtype, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------- fp32 / fp64 exactness

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,k,n,r", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_oracle(dtype, m, k, n, r, bias):
    x, w, a, b, bb = make_inputs(m, k, n, r, dtype, bias)
    dy = _dy((m, n), dtype)
    s = 16.0 / r
    assert_matches(run_op(x, w, a, b, s, bb, dy), oracle64(x, w, a, b, s, bb, dy=dy), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_leading_dims(dtype):
    k, n, r = 129, 70, 8
    x, w, a, b, bb = make_inputs(None, k, n, r, dtype, lead=(2, 3))
    dy = _dy((2, 3, n), dtype)
    got = run_op(x, w, a, b, 2.0, bb, dy)
    assert got[0].shape == (2, 3, n) and got[1].shape == (2, 3, k)
    assert_matches(got, oracle64(x, w, a, b, 2.0, bb, dy=dy), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [None, (2, 3)])
def test_non_contiguous_x(dtype, lead):
    m, k, n, r = 37, 129, 70, 8
    x, w, a, b, bb = make_inputs(m, k, n, r, dtype, lead=lead)
    # A transposed view: same values, strides that are not row-major.
    xt = x.reshape(-1, k).t().contiguous().t().reshape(x.shape) if lead is None else \
        x.permute(*reversed(range(x.dim()))).contiguous().permute(*reversed(range(x.dim())))
    assert not xt.is_contiguous() and torch.equal(xt, x)
    dy = _dy((*x.shape[:-1], n), dtype)
    got = run_op(xt, w, a, b, 2.0, bb, dy)
    assert_matches(got, oracle64(x, w, a, b, 2.0, bb, dy=dy), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,r", SHAPES[:2])
def test_half_inputs_vs_fp32_oracle(dtype, m, k, n, r):
    x, w, a, b, bb = make_inputs(m, k, n, r, dtype)
    dy = _dy((m, n), dtype)
    # The oracle sees the same (already rounded) half inputs, computed in float64.
    assert_matches(run_op(x, w, a, b, 2.0, bb, dy), oracle64(x, w, a, b, 2.0, bb, dy=dy), dtype)


def test_only_some_inputs_require_grad():
    m, k, n, r = 37, 129, 70, 8
    x, w, a, b, bb = make_inputs(m, k, n, r, torch.float32)
    want = oracle64(x, w, a, b, 2.0, bb)
    a_ = a.clone().requires_grad_(True)
    y = lora_linear(x, w, a_, b, 2.0, bb)  # x, B and bias frozen: only dA is computed
    y.sum().backward()
    assert_rel_close(a_.grad, want[2], torch.float32, "dA")


# --------------------------------------------------------------------------------------------- gradcheck

def test_gradcheck_dense_float64():
    x, w, a, b, bb = make_inputs(5, 13, 7, 3, torch.float64)
    args = [t.requires_grad_(True) for t in (x, a, b, bb)]
    assert torch.autograd.gradcheck(lambda x, a, b, bb: lora_linear(x, w, a, b, 1.7, bb), args)


def test_gradcheck_dense_float64_with_dropout():
    # Re-seeding inside the function fixes the mask across gradcheck's evaluations, so the analytic
    # backward (which regenerates the mask from the forward's seed) must agree with finite differences.
    x, w, a, b, bb = make_inputs(5, 13, 7, 3, torch.float64)
    args = [t.requires_grad_(True) for t in (x, a, b, bb)]

    def f(x, a, b, bb):
        torch.manual_seed(1234)
        return lora_linear(x, w, a, b, 1.7, bb, dropout_p=0.4)

    with torch.random.fork_rng(devices=[]):
        assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("double_quant", [True, False])
def test_gradcheck_nf4_float64(double_quant):
    k = 70  # 7 * 70 = 490 weights: blocks of 64 straddle rows, and the last block is partial
    x, w, a, b, bb = make_inputs(5, k, 7, 3, torch.float64)
    w4 = quantize_nf4(w.float(), blocksize=64, double_quant=double_quant)
    # The frozen W the op must use: the NF4 dequantization (one fp32 product), exactly representable in fp64.
    w_frozen = w4.dequantize(torch.float32).double()
    args = [t.requires_grad_(True) for t in (x, a, b, bb)]
    assert torch.autograd.gradcheck(lambda x, a, b, bb: lora_linear(x, w4, a, b, 1.7, bb), args)
    assert_matches(run_op(x, w4, a, b, 1.7, bb), oracle64(x, w_frozen, a, b, 1.7, bb), torch.float64)


# ------------------------------------------------------------------------------------------ NF4 twins

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_nf4_equals_dequantized_dense_twin(dtype, double_quant, blocksize):
    m, k, n, r = 37, 129, 70, 8
    x, w, a, b, bb = make_inputs(m, k, n, r, dtype)
    w4 = quantize_nf4(w.float(), blocksize=blocksize, double_quant=double_quant)
    twin_dtype = torch.float32 if dtype == torch.float64 else dtype
    twin = w4.dequantize(twin_dtype).to(dtype)
    dy = _dy((m, n), dtype)
    got, want = run_op(x, w4, a, b, 2.0, bb, dy), run_op(x, twin, a, b, 2.0, bb, dy)
    # Same weights, same reference code path: bit-identical, not merely close.
    for name, g, t in zip(("y", "dx", "dA", "dB", "dbias"), got, want):
        assert torch.equal(g, t), f"{name} differs between the NF4 weight and its dense twin"
    # and the dense twin is right (guards against both sides being wrong the same way)
    assert_matches(got, oracle64(x, twin, a, b, 2.0, bb, dy=dy), dtype)


# ------------------------------------------------------------------------------------------- M = 0

@pytest.mark.parametrize("lead", [(0,), (2, 0)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_empty_batch_matches_f_linear(lead, bias, p):
    k, n, r = 129, 70, 8
    x, w, a, b, bb = make_inputs(None, k, n, r, torch.float32, bias=bias, lead=lead)
    got = run_op(x, w, a, b, 2.0, bb, dropout_p=p)
    assert got[0].shape == (*lead, n) and got[1].shape == (*lead, k)
    # What PyTorch's own layers give for an empty batch: zero-valued parameter gradients.
    want = oracle64(x, w, a, b, 2.0, bb, mask=torch.ones(x.shape, dtype=torch.bool), p=p)
    for name, g, t in zip(("y", "dx", "dA", "dB", "dbias"), got, want):
        if t is None:
            assert g is None
            continue
        assert g.shape == t.shape and g.dtype == torch.float32, name
        assert torch.equal(g.double(), t), name
    assert torch.count_nonzero(got[2]) == 0 and got[2].shape == (r, k)


# ------------------------------------------------------------------------------------------- PEFT parity

def _peft_pair(k, n, r, alpha, rslora, dtype, seed=0):
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(k, n, bias=True)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"], use_rslora=rslora)
    model = peft.get_peft_model(Tiny(), cfg).to(dtype)
    layer = model.base_model.model.proj
    with torch.no_grad():  # PEFT zero-inits B; a random B makes the comparison see the adapter
        layer.lora_B["default"].weight.normal_(0, 0.3)
    return model, layer


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_parity(rslora, dtype):
    k, n, r, alpha = 129, 70, 8, 16
    model, layer = _peft_pair(k, n, r, alpha, rslora, dtype)
    base = layer.base_layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = layer.scaling["default"]
    assert scaling == (alpha / r ** 0.5 if rslora else alpha / r)
    x = torch.randn(2, 19, k).to(dtype)
    dy = _dy((2, 19, n), dtype)

    xp = x.clone().requires_grad_(True)
    yp = model(xp)
    yp.backward(dy)

    got = run_op(x, base.weight.detach(), A, B, scaling, base.bias, dy)
    for name, g, t in zip(("y", "dx", "dA", "dB", "dbias"),
                          got, (yp.detach(), xp.grad, A.grad, B.grad, None)):
        if t is not None:
            assert_rel_close(g, t, dtype, f"vs PEFT {name}")


# ------------------------------------------------------------------------------------- mutation controls

def _mutation_case():
    m, k, n, r = 37, 129, 70, 8
    x, w, a, b, bb = make_inputs(m, k, n, r, torch.float32)
    dy = _dy((m, n), torch.float32)
    return x, w, a, b, bb, dy, oracle64(x, w, a, b, 2.5, bb, dy=dy)


def test_control_correct_result_passes():
    x, w, a, b, bb, dy, want = _mutation_case()
    assert_matches(run_op(x, w, a, b, 2.5, bb, dy), want, torch.float32)


def test_control_missing_scaling_fails():
    x, w, a, b, bb, dy, want = _mutation_case()
    with pytest.raises(AssertionError, match="relative error"):
        assert_matches(run_op(x, w, a, b, 1.0, bb, dy), want, torch.float32)


def test_control_transposed_B_fails():
    # A kernel that reads B (N, r) with the strides of B^T: the same numbers in the wrong places.
    x, w, a, b, bb, dy, want = _mutation_case()
    b_wrong = b.t().contiguous().reshape(b.shape)
    with pytest.raises(AssertionError, match="relative error"):
        assert_matches(run_op(x, w, a, b_wrong, 2.5, bb, dy), want, torch.float32)


def test_control_half_tolerance_rejects_garbage():
    # The bf16 tolerance is not wide enough to pass a result whose adapter branch is dropped.
    x, w, a, b, bb = make_inputs(37, 129, 70, 8, torch.bfloat16)
    want = oracle64(x, w, a, b, 2.0, bb)
    no_adapter = run_op(x, w, a, torch.zeros_like(b), 2.0, bb)
    with pytest.raises(AssertionError, match="relative error"):
        assert_matches(no_adapter, want, torch.bfloat16)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_forced_gpu_backend_on_cpu_warns_once_and_runs_the_reference(monkeypatch, backend):
    """LORA_OPS_BACKEND=cuda|triton with CPU tensors (and no Triton interpreter) cannot give GPU kernels: one
    warning names what runs instead, and the result is the reference's."""
    from lora_ops import _backend
    monkeypatch.setenv("LORA_OPS_BACKEND", backend)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_backend, "_warned", set())
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    a, b = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    with pytest.warns(UserWarning, match=f"LORA_OPS_BACKEND={backend} has no kernels for cpu tensors"):
        y = lora_ops.lora_linear(x, w, a, b, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y2 = lora_ops.lora_linear(x, w, a, b, 0.5)
    want = x @ w.T + 0.5 * (x @ a.T) @ b.T
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(y2, want)
