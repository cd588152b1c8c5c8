"""The registration contract of lora_ops::lora_fwd / lora_bwd (opcheck, torch.compile) and lora_linear's
input validation: every bad argument raises the documented exception with a message naming the value."""
import math

import pytest
import torch
from torch.library import opcheck

from lora_ops import lora_linear, quantize_nf4
from helpers import assert_rel_close

M, K, N, R = 7, 67, 9, 3  # K = 67: one full block of 64 plus a partial one, and rows straddle blocks


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LORA_OPS_BACKEND", "reference")


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=dtype)
    w = torch.randn(N, K, generator=g, dtype=dtype) / K ** 0.5
    a = torch.randn(R, K, generator=g, dtype=dtype) / K ** 0.5
    b = torch.randn(N, R, generator=g, dtype=dtype)
    bias = torch.randn(N, generator=g, dtype=dtype)
    return x, w, a, b, bias


def _weight_args(kind, w):
    """(weight tensors..., blocksize) as the ops take them, for a dense or an NF4 weight."""
    if kind == "dense":
        return (w, None, None, None, None), 0
    w4 = quantize_nf4(w.float(), blocksize=64, double_quant=(kind == "nf4_dq"))
    return w4.tensors(), w4.blocksize


WEIGHTS = ["dense", "nf4", "nf4_dq"]


# ---------------------------------------------------------------------------------------------- opcheck

@pytest.mark.parametrize("kind", WEIGHTS)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_opcheck_lora_fwd(kind, with_bias, p):
    x, w, a, b, bias = _inputs()
    wargs, bs = _weight_args(kind, w)
    seed = torch.tensor(987654321, dtype=torch.int64) if p > 0 else None
    args = (x.requires_grad_(True), *wargs, bs, a.requires_grad_(True), b.requires_grad_(True), 1.5,
            bias.requires_grad_(True) if with_bias else None, p, seed)
    opcheck(torch.ops.lora_ops.lora_fwd.default, args)


@pytest.mark.parametrize("kind", WEIGHTS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("needs", [(True, True, True, True), (False, True, True, False), (True, False, False, False)])
def test_opcheck_lora_bwd(kind, p, needs):
    x, w, a, b, _ = _inputs()
    wargs, bs = _weight_args(kind, w)
    seed = torch.tensor(987654321, dtype=torch.int64) if p > 0 else None
    dy = torch.randn(M, N)
    s = torch.randn(M, R)
    opcheck(torch.ops.lora_ops.lora_bwd.default, (dy, x, *wargs, bs, a, b, s, 1.5, p, seed, *needs))


def test_bwd_unrequested_gradients_are_empty():
    x, w, a, b, _ = _inputs()
    out = torch.ops.lora_ops.lora_bwd(torch.randn(M, N), x, w, None, None, None, None, 0, a, b,
                                      torch.randn(M, R), 1.5, 0.0, None, False, True, False, False)
    assert [tuple(t.shape) for t in out] == [(0,), (R, K), (0,), (0,)]
    assert out[1].dtype == a.dtype


# --------------------------------------------------------------------------------------------- compile

def _grads_of(fn, x, a, b, bias, dy):
    x, a, b, bias = (t.detach().clone().requires_grad_(True) for t in (x, a, b, bias))
    y = fn(x, a, b, bias)
    y.backward(dy)
    return y.detach(), x.grad, a.grad, b.grad, bias.grad


@pytest.mark.parametrize("kind", ["dense", "nf4_dq"])
def test_compile_fullgraph_function_matches_eager(kind):
    torch._dynamo.reset()
    x, w, a, b, bias = _inputs()
    weight = w if kind == "dense" else quantize_nf4(w, blocksize=64, double_quant=True)
    x = x.reshape(1, M, K)  # leading dims through the compiled reshape
    dy = torch.randn(1, M, N)

    def f(x, a, b, bias):
        return lora_linear(x, weight, a, b, 1.5, bias, dropout_p=0.0)

    eager = _grads_of(f, x, a, b, bias, dy)
    compiled = _grads_of(torch.compile(f, fullgraph=True, backend="inductor"), x, a, b, bias, dy)
    for name, c, e in zip(("y", "dx", "dA", "dB", "dbias"), compiled, eager):
        assert_rel_close(c, e, torch.float32, f"compiled {name}")


def test_compile_fullgraph_module_matches_eager():
    torch._dynamo.reset()
    x, w, a, b, bias = _inputs()

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w4 = quantize_nf4(w, blocksize=64, double_quant=False)
            self.lora_A = torch.nn.Parameter(a.clone())
            self.lora_B = torch.nn.Parameter(b.clone())
            self.bias = torch.nn.Parameter(bias.clone())

        def forward(self, x):
            return torch.relu(lora_linear(x, self.w4, self.lora_A, self.lora_B, 2.0, self.bias, 0.1,
                                          training=self.training))

    eager_m, comp_m = Layer().eval(), Layer().eval()  # eval: dropout off, so eager and compiled agree
    compiled = torch.compile(comp_m, fullgraph=True)
    outs = []
    for mod in (eager_m, compiled):
        xx = x.clone().requires_grad_(True)
        y = mod(xx)
        y.sum().backward()
        outs.append((y.detach(), xx.grad, mod.lora_A.grad, mod.lora_B.grad, mod.bias.grad))
    for name, e, c in zip(("y", "dx", "dA", "dB", "dbias"), *outs):
        assert_rel_close(c, e, torch.float32, f"compiled module {name}")


# ---------------------------------------------------------------------------------------------- validation

def _ok():
    x, w, a, b, bias = _inputs()
    return dict(x=x, weight=w, lora_A=a, lora_B=b, scaling=2.0, bias=bias, dropout_p=0.0)


def _call(**over):
    kw = _ok()
    kw.update(over)
    return lora_linear(**kw)


def test_valid_call_succeeds():
    y = _call()
    assert y.shape == (M, N)


@pytest.mark.parametrize("over,exc,pattern", [
    (dict(x=torch.ones(M, K, dtype=torch.int64)), TypeError, r"x\.dtype=torch\.int64"),
    (dict(x=[[1.0] * K]), TypeError, r"x must be a torch\.Tensor, got list"),
    (dict(x=torch.tensor(1.0)), ValueError, r"0-d"),
    (dict(x=torch.ones(M, K + 1)), ValueError, rf"x\.shape\[-1\]={K + 1}.*in_features={K}"),
    (dict(weight=torch.ones(N, K, dtype=torch.float16)), TypeError, r"weight\.dtype=torch\.float16"),
    (dict(lora_A=torch.ones(R, K, dtype=torch.bfloat16)), TypeError, r"lora_A\.dtype=torch\.bfloat16"),
    (dict(lora_B=torch.ones(N, R, dtype=torch.float64)), TypeError, r"lora_B\.dtype=torch\.float64"),
    (dict(bias=torch.ones(N, dtype=torch.float16)), TypeError, r"bias\.dtype=torch\.float16"),
    (dict(weight=torch.ones(N * K)), ValueError, rf"weight must be 2-D, got shape \({N * K},\)"),
    (dict(weight=torch.ones(N, K, 1)), ValueError, r"weight must be 2-D"),
    (dict(lora_A=torch.ones(R, K, 1)), ValueError, rf"lora_A must be 2-D, got shape \({R}, {K}, 1\)"),
    (dict(lora_A=torch.ones(R, K + 2)), ValueError, rf"lora_A has shape \({R}, {K + 2}\)"),
    (dict(lora_A=torch.ones(0, K), lora_B=torch.ones(N, 0)), ValueError, r"rank 0"),
    (dict(lora_B=torch.ones(R)), ValueError, rf"lora_B must be 2-D, got shape \({R},\)"),
    (dict(lora_B=torch.ones(R, N)), ValueError, rf"lora_B has shape \({R}, {N}\).*out_features={N}, r={R}"),
    (dict(lora_B=torch.ones(N, R + 1)), ValueError, rf"lora_B has shape \({N}, {R + 1}\)"),
    (dict(bias=torch.ones(N + 1)), ValueError, rf"bias has shape \({N + 1},\)"),
    (dict(bias=torch.ones(1, N)), ValueError, rf"bias must be 1-D, got shape \(1, {N}\)"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p=1\.0"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p=-0\.1"),
    (dict(dropout_p=True), ValueError, r"dropout_p=True"),
    (dict(dropout_p=float("nan")), ValueError, r"dropout_p=nan"),
    (dict(scaling=float("inf")), ValueError, r"scaling=inf"),
    (dict(scaling=float("nan")), ValueError, r"scaling=nan"),
    (dict(scaling=-math.inf), ValueError, r"scaling=-inf"),
    (dict(scaling=True), ValueError, r"scaling=True"),
    (dict(scaling="2"), ValueError, r"scaling='2'"),
    (dict(weight=[[0.0] * K] * N), TypeError, r"weight must be .*got list"),
    (dict(weight=torch.ones(N, K).numpy()), TypeError, r"got ndarray"),
    (dict(lora_A=None), TypeError, r"lora_A must be a torch\.Tensor, got NoneType"),
])
def test_validation_errors(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(**over)


@pytest.mark.parametrize("name", ["weight", "lora_A", "lora_B", "bias"])
def test_mixed_devices(name):
    kw = _ok()
    kw[name] = kw[name].to("meta")  # a second device without a GPU
    with pytest.raises(ValueError, match=rf"{name} is on meta but x is on cpu"):
        lora_linear(**kw)


def test_mixed_devices_x_elsewhere():
    kw = _ok()
    kw["x"] = kw["x"].to("meta")
    with pytest.raises(ValueError, match=r"weight is on cpu but x is on meta"):
        lora_linear(**kw)


def test_nf4_weight_validation():
    kw = _ok()
    w4 = quantize_nf4(kw["weight"], blocksize=64)
    kw["weight"] = w4.to("meta")
    with pytest.raises(ValueError, match=r"NF4 weight is on meta but x is on cpu"):
        lora_linear(**kw)
    kw["weight"] = quantize_nf4(torch.randn(N, K + 3), blocksize=64)
    with pytest.raises(ValueError, match=rf"in_features={K + 3}"):
        lora_linear(**kw)
    kw["weight"] = w4
    kw["lora_B"] = torch.ones(N + 1, R)
    with pytest.raises(ValueError, match=rf"lora_B has shape \({N + 1}, {R}\)"):
        lora_linear(**kw)


def test_unknown_backend_env(monkeypatch):
    monkeypatch.setenv("LORA_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"LORA_OPS_BACKEND='bogus'"):
        _call()


def test_validation_is_at_the_boundary_not_in_a_kernel(monkeypatch):
    # A bad scaling must be refused before any op runs (no partial work, no kernel-level error).
    # Eager calls take the op's kernels without its dispatch (ops.lora_fwd_eager); compiled ones the op itself.
    from lora_ops import ops as _ops
    calls = []
    real_op, real_eager = torch.ops.lora_ops.lora_fwd, _ops.lora_fwd_eager

    class Spy:
        def __init__(self, real):
            self.real = real

        def __call__(self, *a, **k):
            calls.append(1)
            return self.real(*a, **k)

    monkeypatch.setattr(torch.ops.lora_ops, "lora_fwd", Spy(real_op))
    monkeypatch.setattr(_ops, "lora_fwd_eager", Spy(real_eager))
    with pytest.raises(ValueError):
        _call(scaling=float("nan"))
    assert calls == []
    _call()
    assert calls == [1]


def test_compile_fullgraph_frozen_x_and_no_bias():
    # Only dA and dB are asked of lora_bwd: two of its outputs are 0-element placeholders.
    torch._dynamo.reset()
    x, w, a, b, _ = _inputs()
    dy = torch.randn(M, N)

    def f(x, a, b):
        return lora_linear(x, w, a, b, 1.5)

    outs = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        aa, bb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        y = fn(x, aa, bb)
        y.backward(dy)
        outs.append((y.detach(), aa.grad, bb.grad))
    for name, e, c in zip(("y", "dA", "dB"), *outs):
        assert_rel_close(c, e, torch.float32, f"compiled {name}")


def test_compile_with_dropout_reproduces_eager_under_fallback_random():
    # Inductor replaces torch's RNG by its own unless fallback_random is set; with it, the compiled graph
    # draws the same seed as eager, and its backward must regenerate the same mask.
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    x, w, a, b, bias = _inputs()
    dy = torch.randn(M, N)

    def f(x, a, b, bias):
        return lora_linear(x, w, a, b, 1.5, bias, dropout_p=0.3)

    with inductor_config.patch(fallback_random=True):
        torch.manual_seed(5)
        eager = _grads_of(f, x, a, b, bias, dy)
        torch.manual_seed(5)
        compiled = _grads_of(torch.compile(f, fullgraph=True), x, a, b, bias, dy)
    for name, c, e in zip(("y", "dx", "dA", "dB", "dbias"), compiled, eager):
        assert_rel_close(c, e, torch.float32, f"compiled with dropout {name}")
