"""Hardening: every public entry point fed bad input, numerical edge cases, and run-to-run determinism.

Each bad input must end in a ValueError/TypeError whose message names the value (``pytest.raises(match=)``),
or in a documented correct result (an empty batch gives an empty output and zero gradients; a rank above
min(in, out) works as in PEFT; a 2-D quant-state blob is read like a 1-D one). Never a crash inside a kernel, a
silent broadcast, garbage read from a tensor on another device, or a model left half-modified by a failed load.

Numerics: NaN/Inf propagate exactly where the reference (and torch's own dropout) puts them, in the Triton
kernels too; fp16 partial sums far beyond 65504 do not overflow (fp32 accumulation); all-zero NF4 blocks and
padded tile lanes never make a NaN. Determinism: one seed, bit-identical outputs and gradients, on the reference
path and on the Triton path (interpreter here; the GPU tests at the end run on CUDA under
``torch.use_deterministic_algorithms(True)``, in one process and across processes).

docs/RELIABILITY.md lists what is tried and the counts of the last run.
"""
import collections
import copy
import json
import os
import random
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from lora_ops import (LoRALinear, NF4Weight, QLoRALinear, _backend, apply_lora, load_adapter, lora_linear,
                      quantize_nf4, save_adapter)
from lora_ops.inject import CONFIG_NAME, WEIGHTS_NAME, lora_layers
from lora_ops.nf4 import QUANT_STATE_KEY, reference_absmax
from helpers import assert_rel_close, assert_same_nonfinite, assert_unchanged, kernel_mask, run_lora, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # NaN/Inf arithmetic inside numpy (interpreter)
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")]
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
BACKENDS = ["reference", "triton"]  # triton: Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _lora_inputs(m, k, n, r, dtype=F32, seed=0, bias=True):
    g = _gen(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / max(k, 1) ** 0.5).to(dtype)
    a = (torch.randn(r, k, generator=g) / max(k, 1) ** 0.5).to(dtype)
    b = torch.randn(n, r, generator=g).to(dtype)
    bb = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, a, b, bb


def oracle64(x, w, a, b, scaling, bias, mask, p, dy):
    """y and (dx, dA, dB, dbias) of the op in float64 autograd: y = x W^T + s (x*mask/(1-p)) A^T B^T + bias."""
    x, a, b = (t.detach().double().requires_grad_(True) for t in (x, a, b))
    bias = None if bias is None else bias.detach().double().requires_grad_(True)
    xd = x if mask is None else x * mask.double() / (1.0 - p)
    y = x @ w.double().t() + scaling * (xd @ a.t()) @ b.t()
    if bias is not None:
        y = y + bias
    y.backward(dy.double())
    return y.detach(), x.grad, a.grad, b.grad, None if bias is None else bias.grad


# ==================================================================================================== NF4

NAN_INF_WEIGHTS = {
    "nan-first": lambda w: w.view(-1).__setitem__(0, float("nan")),
    "inf-in-partial-last-block": lambda w: w.view(-1).__setitem__(-1, float("inf")),
    "-inf-middle": lambda w: w.view(-1).__setitem__(w.numel() // 2, float("-inf")),
}


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("where", list(NAN_INF_WEIGHTS))
@pytest.mark.parametrize("dq", [True, False])
def test_quantize_refuses_nan_inf_anywhere(dtype, where, dq):
    w = torch.randn(5, 29, generator=_gen(1)).to(dtype)  # 145 elements: 3 blocks of 64, the last partial
    NAN_INF_WEIGHTS[where](w)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_nf4(w, blocksize=64, double_quant=dq)


@pytest.mark.parametrize("weight,exc,match", [
    (torch.ones(3, 4, dtype=torch.bool), TypeError, r"weight\.dtype=torch\.bool"),
    (torch.ones(3, 4, dtype=torch.complex64), TypeError, r"weight\.dtype=torch\.complex64"),
    (torch.ones(3, 4, dtype=torch.int8), TypeError, r"weight\.dtype=torch\.int8"),
    (torch.ones(3, 4, dtype=torch.float64), TypeError, r"weight\.dtype=torch\.float64.*weight\.float\(\)"),
    (torch.tensor(1.0), ValueError, r"2-D \(out, in\), got shape \(\)"),
    (torch.ones(5, 0), ValueError, r"shape \(5, 0\) is empty"),
    (torch.ones(0, 5), ValueError, r"shape \(0, 5\) is empty"),
    (torch.ones(3, 4, device="meta"), ValueError, r"meta device"),
    (torch.ones(3, 4).numpy(), TypeError, r"torch\.Tensor.*ndarray"),
], ids=["bool", "complex", "int8", "float64", "0-d", "no-columns", "no-rows", "meta", "numpy"])
def test_quantize_bad_weight(weight, exc, match):
    with pytest.raises(exc, match=match):
        quantize_nf4(weight)


@pytest.mark.parametrize("blocksize", [0, -64, 16, 63, 96, 8192, None, 64.0, "64", True])
def test_quantize_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match=re.escape(f"blocksize={blocksize!r} is not supported")):
        quantize_nf4(torch.randn(3, 70), blocksize=blocksize)


@pytest.mark.parametrize("dq", [1, 0, None, "yes", torch.tensor(True)])
def test_quantize_bad_double_quant(dq):
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        quantize_nf4(torch.randn(3, 70), double_quant=dq)


def test_double_quant_overflow_is_refused_not_nan():
    """Two blocks with absmax 3e38: their fp32 sum overflows, so the double-quantization offset (mean absmax)
    is inf and bitsandbytes dequantizes the whole weight to NaN. We refuse with a message naming the fix, and
    the fix (double_quant=False) represents the weight exactly at its absmax elements."""
    w = torch.full((2, 64), 3e38)
    w[1, 5] = -1.0
    with pytest.raises(ValueError, match=r"overflows float32.*double_quant=False"):
        quantize_nf4(w, blocksize=64, double_quant=True)
    d = quantize_nf4(w, blocksize=64, double_quant=False).dequantize()
    assert bool(torch.isfinite(d).all()) and d[0, 0] == 3e38 and d[1, 0] == 3e38
    # Control: one block of 3e38 has a finite mean; double quantization stays allowed there.
    one = quantize_nf4(torch.full((1, 64), 3e38), blocksize=64, double_quant=True)
    assert bool(torch.isfinite(one.dequantize()).all())


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_quantize_views_and_grad_tensors_give_the_contiguous_bytes(dtype):
    """Documented result: a transposed/strided view or a tensor that requires grad quantizes to the bytes of its
    contiguous, detached copy."""
    base = torch.randn(67, 45, generator=_gen(2)).to(dtype)
    view = base.t()  # (45, 67), non-contiguous
    want = quantize_nf4(view.contiguous(), 64)
    for w in (view, view.clone().requires_grad_(True), base[::2, 1:].t()):
        ref = quantize_nf4(w.detach().contiguous(), 64)
        got = quantize_nf4(w, 64)
        for t, u in zip(got.tensors(), ref.tensors()):
            assert torch.equal(t, u)
    assert torch.equal(quantize_nf4(view, 64).data, want.data)


def test_subnormal_and_tiny_blocks_stay_finite():
    """A block whose absmax is subnormal has 1/absmax = inf: scaled values are +-inf (codes 15/0) or NaN for
    zeros (code 0), as in bitsandbytes' CUDA arithmetic. Documented result: every dequantized value is finite
    and at most absmax in magnitude (|w| < 1.2e-38, so the distortion is below any bf16/fp16 resolution)."""
    w = torch.tensor([[1e-40, -2e-40, 0.0, 5e-41] + [1e-39] * 3, [3e-39, -1e-45, 0.0, 0.0, 0.0, 1e-45, 0.0]])
    for dq in (False, True):
        q = quantize_nf4(w, blocksize=32, double_quant=dq)
        d = q.dequantize()
        absmax = reference_absmax(q.absmax, q.nested_absmax, q.nested_code, q.offset)
        assert bool(torch.isfinite(d).all()), d
        assert bool((d.abs() <= absmax.abs().max()).all())


def test_nf4_weight_dequantize_and_to_bad_arguments():
    w4 = quantize_nf4(torch.randn(5, 7), 64)
    for dtype in (torch.int32, torch.float64, "float32", torch.bool):
        with pytest.raises(TypeError, match=r"dequantize\(dtype=.*\) is not supported"):
            w4.dequantize(dtype)
    # torch.device parses the string; its RuntimeError names it (no NF4Weight is built).
    with pytest.raises(RuntimeError, match="nonsense"):
        w4.to("nonsense")
    # Documented: a meta copy has the shapes and dtypes (for shape inference), no values.
    m = w4.to("meta").dequantize(F16)
    assert m.device.type == "meta" and m.shape == (5, 7) and m.dtype == F16


def test_nf4_weight_with_tensors_on_two_devices_is_refused():
    """A hand-built NF4Weight with absmax elsewhere than its bytes used to dequantize to uninitialised memory
    (values like 1.5e23) on the reference path; now dequantize() and lora_linear refuse it."""
    w4 = quantize_nf4(torch.randn(5, 7), 64)
    for field in ("absmax", "nested_absmax", "offset"):
        t = dict(zip(("data", "absmax", "nested_absmax", "nested_code", "offset"), w4.tensors()))
        t[field] = t[field].to("meta")
        bad = NF4Weight(t["data"], t["absmax"], w4.shape, w4.dtype, w4.blocksize, t["nested_absmax"],
                        t["nested_code"], t["offset"])
        with pytest.raises(ValueError, match=rf"different devices \(data on cpu, {field} on meta\)"):
            bad.dequantize()
        for backend in BACKENDS:
            with _backend.use_backend(backend), pytest.raises(ValueError, match=f"{field} on meta"):
                lora_linear(torch.randn(3, 7), bad, torch.randn(2, 7), torch.randn(5, 2), 1.0)


def _sd(dq=True):
    return quantize_nf4(torch.randn(7, 33, generator=_gen(3)), 32, double_quant=dq).state_dict("m.")


def _with_json(sd, **changes):
    qs = json.loads(bytes(sd["m.weight." + QUANT_STATE_KEY].tolist()))
    qs.update(changes)
    sd["m.weight." + QUANT_STATE_KEY] = torch.tensor(list(json.dumps(qs).encode()), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize("make,exc,match", [
    (lambda: [("m.weight", torch.zeros(1))], TypeError, r"state_dict must be a mapping.*list"),
    (lambda: _with_json(_sd(), nested_offset="0.1"), ValueError, r"nested_offset='0\.1' must be a finite number"),
    (lambda: _with_json(_sd(), nested_offset=float("nan")), ValueError, r"nested_offset=nan"),
    (lambda: _with_json(_sd(), nested_offset=float("inf")), ValueError, r"nested_offset=inf"),
    (lambda: _with_json(_sd(), nested_offset=True), ValueError, r"nested_offset=True"),
    (lambda: _with_json(_sd(), shape=[True, 231]), ValueError, r"shape \[True, 231\] must be \[out, in\]"),
    (lambda: _with_json(_sd(), shape=[7, -33]), ValueError, r"shape \[7, -33\]"),
    (lambda: _with_json(_sd(), shape=[7, 33, 1]), ValueError, r"shape \[7, 33, 1\]"),
    (lambda: _with_json(_sd(), blocksize="32"), ValueError, r"blocksize='32' is not supported"),
    (lambda: _with_json(_sd(), nested_blocksize=128), ValueError, r"nested_blocksize=128 unsupported"),
    (lambda: {**_sd(), "m.weight": [1, 2, 3]}, TypeError, r"m\.weight must be a torch\.Tensor, got list"),
    (lambda: {**_sd(), "m.weight." + QUANT_STATE_KEY: "{}"}, TypeError, r"must be a torch\.Tensor, got str"),
    (lambda: {**_sd(), "m.weight.nested_absmax": torch.tensor([float("nan")])}, ValueError,
     r"m\.weight\.nested_absmax contains NaN or Inf"),
    (lambda: {**_sd(False), "m.weight.absmax": torch.full((8,), float("inf"))}, ValueError,
     r"m\.weight\.absmax contains NaN or Inf"),
    (lambda: {**_sd(False), "m.weight.absmax": torch.ones(8, device="meta")}, ValueError,
     r"m\.weight\.absmax is on meta but m\.weight is on cpu"),
    (lambda: {**_sd(), "m.weight.nested_absmax": torch.ones(1, device="meta")}, ValueError,
     r"nested_absmax is on meta"),
    (lambda: {**_sd(), "m.weight": torch.zeros(115, 2, dtype=torch.uint8)}, ValueError, r"has 230 bytes"),
], ids=["list", "offset-str", "offset-nan", "offset-inf", "offset-bool", "shape-bool", "shape-negative",
        "shape-3d", "blocksize-str", "nested-blocksize", "weight-list", "json-str", "nested-nan", "absmax-inf",
        "absmax-meta", "nested-meta", "too-many-bytes"])
def test_from_state_dict_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        NF4Weight.from_state_dict(make(), "m.")


def test_from_state_dict_prefix_must_be_a_str():
    with pytest.raises(TypeError, match=r"prefix=None must be a str"):
        NF4Weight.from_state_dict(_sd(), None)


@pytest.mark.parametrize("dq", [True, False])
def test_from_state_dict_every_truncation_of_the_quant_state_json(dq):
    """Every proper prefix of the JSON blob (a file cut short) is refused with a ValueError; the full blob
    loads. Other truncated tensors (bytes, absmax, nested absmax) too."""
    sd = _sd(dq)
    key = "m.weight." + QUANT_STATE_KEY
    blob = sd[key]
    for cut in range(blob.numel()):
        with pytest.raises(ValueError):
            NF4Weight.from_state_dict({**sd, key: blob[:cut]}, "m.")
    NF4Weight.from_state_dict(sd, "m.")
    for k in ("m.weight", "m.weight.absmax") + (("m.weight.nested_absmax",) if dq else ()):
        t = sd[k].reshape(-1)
        for cut in sorted({0, 1, t.numel() // 2, t.numel() - 1} - {t.numel()}):
            with pytest.raises(ValueError, match=k.replace(".", r"\.")):
                NF4Weight.from_state_dict({**sd, k: t[:cut]}, "m.")


def test_from_state_dict_documented_leniencies():
    """Extra keys under the prefix are ignored here (QLoRALinear.load_state_dict reports them as unexpected);
    a 2-D quant-state blob and float32 quant_storage bytes read like bitsandbytes' 1-D uint8 tensors."""
    sd = _sd()
    ref = NF4Weight.from_state_dict(sd, "m.")
    key = "m.weight." + QUANT_STATE_KEY
    assert sd["m.weight"].numel() == 116  # (7 * 33 + 1) // 2 bytes: 29 float32 words
    variants = [{**sd, "m.weight.bogus": torch.zeros(3)}, {**sd, key: sd[key].reshape(1, -1)},
                {**sd, "m.weight": sd["m.weight"].reshape(-1).view(torch.float32)}]
    for v in variants:
        got = NF4Weight.from_state_dict(v, "m.")
        assert torch.equal(got.dequantize(), ref.dequantize())


def test_qlora_load_state_dict_with_corrupt_nf4_leaves_the_layer_unchanged():
    layer = QLoRALinear.from_linear(nn.Linear(33, 7), r=4)
    snap = snapshot(layer)
    for corrupt in ({"weight.absmax": layer.state_dict()["weight.absmax"][:-1]},
                    {"weight.nested_absmax": torch.tensor([float("nan")])},
                    {"weight": layer.state_dict()["weight"][:-1]}):
        bad = {**layer.state_dict(), **corrupt, "lora_A": torch.randn(4, 33)}
        with pytest.raises(RuntimeError, match=r"weight: .*weight\.(absmax|nested_absmax)|weight: .*bytes"):
            layer.load_state_dict(bad)
        assert_unchanged(layer, snap)  # the NF4 error stops this layer's load before lora_A is copied


# ============================================================================================ lora_linear

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight", ["dense", "nf4", "nf4_dq"])
def test_empty_batch_gives_empty_output_and_zero_gradients(backend, weight):
    """M = 0 (also as a (2, 0, K) batch): y is (..., 0, N), dx empty, dA/dB/dbias exactly zero (sums over no
    rows), with bias and dropout on; no NaN from an empty reduction."""
    k, n, r = 67, 9, 3
    _, w, a, b, bias = _lora_inputs(1, k, n, r)
    wt = w if weight == "dense" else quantize_nf4(w, 64, double_quant=weight == "nf4_dq")
    for shape in ((0, k), (2, 0, k)):
        x = torch.randn(shape)
        y, dx, da, db, dbias = run_lora(backend, x, wt, a, b, 2.0, bias, 0.25, torch.randn(*shape[:-1], n))
        assert y.shape == (*shape[:-1], n) and dx.shape == shape
        for g, like in ((da, a), (db, b), (dbias, bias)):
            assert g.shape == like.shape and torch.equal(g, torch.zeros_like(like))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_in_features_gives_bias(backend):
    """in_features = 0 (a legal nn.Linear): y = bias, dx is (M, 0), dA is (r, 0), dB = 0. This used to fail in
    lora_linear's reshape(-1, 0) with a RuntimeError."""
    m, n, r = 4, 5, 3
    x, w, a = torch.randn(m, 0), torch.randn(n, 0), torch.randn(r, 0)
    b, bias = torch.randn(n, r), torch.randn(n)
    y, dx, da, db, dbias = run_lora(backend, x, w, a, b, 2.0, bias, 0.0, torch.ones(m, n))
    assert torch.equal(y, bias.expand(m, n)) and dx.shape == (m, 0) and da.shape == (r, 0)
    assert torch.equal(db, torch.zeros(n, r)) and torch.equal(dbias, torch.full((n,), float(m)))
    y1 = lora_linear(torch.randn(0), w, a, b, 2.0)  # 1-D x with in_features 0
    assert y1.shape == (n,) and torch.equal(y1, torch.zeros(n))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_out_features(backend):
    m, k, r = 6, 11, 2
    x, a = torch.randn(m, k), torch.randn(r, k)
    y, dx, da, db, dbias = run_lora(backend, x, torch.randn(0, k), a, torch.randn(0, r), 2.0, torch.randn(0), 0.3,
                                    torch.randn(m, 0))
    assert y.shape == (m, 0) and torch.equal(dx, torch.zeros(m, k)) and torch.equal(da, torch.zeros(r, k))
    assert db.shape == (0, r) and dbias.shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight", ["dense", "nf4_dq"])
@pytest.mark.parametrize("r", [20, 130])  # 130: more than one 128-wide rank chunk in the kernels
def test_rank_above_min_in_out_matches_fp64(backend, weight, r):
    """r > min(in, out) is allowed (PEFT allows it): forward and every gradient match the float64 oracle."""
    m, k, n, p = 13, 9, 7, 0.2
    x, w, a, b, bias = _lora_inputs(m, k, n, r, seed=4)
    wt = w if weight == "dense" else quantize_nf4(w, 32, double_quant=True)
    wd = w if weight == "dense" else wt.dequantize(F32)
    dy = torch.randn(m, n, generator=_gen(5))
    got = run_lora(backend, x, wt, a, b, 0.7, bias, p, dy, seed=11)
    mask = kernel_mask(backend, 11, m, k, p)
    want = oracle64(x, wd, a, b, 0.7, bias, mask, p, dy)
    for name, g, t in zip(("y", "dx", "dA", "dB", "dbias"), got, want):
        assert_rel_close(g, t, F32, f"{backend} r={r} {name}")


def test_rank_above_min_in_out_through_modules_save_load_and_peft(tmp_path):
    """LoRALinear.from_linear(Linear(9, 5), r=16), saved in PEFT's format, loads into PEFT 0.21 and into a fresh
    model and computes the same function."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3))
    ours = apply_lora(copy.deepcopy(base), ["0", "2"], r=16, lora_alpha=8)
    g = _gen(6)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    save_adapter(ours, tmp_path / "a")
    x = torch.randn(4, 9, generator=g)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    again = load_adapter(copy.deepcopy(base), tmp_path / "a")
    with torch.no_grad():
        want = ours(x)
        assert_rel_close(pm(x), want, F32, "PEFT with r=16 > min(9, 5)")
        assert torch.equal(again(x), want)


@pytest.mark.parametrize("name", ["x", "weight", "lora_A", "lora_B", "bias"])
def test_sparse_tensors_are_refused(name):
    """A sparse tensor used to pass validation and crash inside the Triton launcher (NotImplementedError:
    Cannot access storage of SparseTensorImpl)."""
    x, w, a, b, bias = _lora_inputs(4, 7, 5, 3)
    kw = dict(x=x, weight=w, lora_A=a, lora_B=b, bias=bias)
    kw[name] = kw[name].to_sparse()
    for backend in BACKENDS:
        with _backend.use_backend(backend), pytest.raises(TypeError, match=rf"{name} is a torch\.sparse_coo"):
            lora_linear(scaling=1.0, **kw)


@pytest.mark.parametrize("over,exc,match", [
    (dict(x=torch.ones(4, 7, dtype=torch.complex64)), TypeError, r"x\.dtype=torch\.complex64"),
    (dict(x=torch.ones(4, 7, dtype=torch.int32)), TypeError, r"x\.dtype=torch\.int32"),
    (dict(x=torch.ones(4, 7, dtype=torch.bool)), TypeError, r"x\.dtype=torch\.bool"),
    (dict(scaling=torch.tensor(2.0)), ValueError, r"scaling=tensor\(2\.\) must be a finite real number"),
    (dict(scaling=None), ValueError, r"scaling=None"),
    (dict(dropout_p=torch.tensor(0.1)), ValueError, r"dropout_p=tensor"),
    (dict(x=torch.ones(4, 8)), ValueError, r"x\.shape\[-1\]=8 does not match the weight's in_features=7"),
    (dict(x=torch.ones(4, 7, 1)), ValueError, r"x\.shape\[-1\]=1"),
    (dict(lora_A=torch.ones(3, 7).t()), ValueError, r"lora_A has shape \(7, 3\)"),
    (dict(bias=torch.ones(())), ValueError, r"bias must be 1-D, got shape \(\)"),
    (dict(weight=torch.ones(5, 7, device="meta")), ValueError, r"weight is on meta but x is on cpu"),
], ids=["complex", "int", "bool", "tensor-scaling", "none-scaling", "tensor-p", "in-mismatch", "trailing-1",
        "A-transposed", "bias-0d", "weight-meta"])
def test_lora_linear_more_bad_inputs(over, exc, match):
    x, w, a, b, bias = _lora_inputs(4, 7, 5, 3)
    kw = dict(x=x, weight=w, lora_A=a, lora_B=b, scaling=1.0, bias=bias, dropout_p=0.0)
    kw.update(over)
    with pytest.raises(exc, match=match):
        lora_linear(**kw)


def test_float64_x_with_nf4_weight_runs_the_reference():
    """Documented: float64 x (gradcheck, oracles) runs on the reference, also over an NF4 weight, even when the
    Triton backend is forced."""
    x, w, a, b, bias = _lora_inputs(5, 7, 4, 2, dtype=torch.float64)
    w4 = quantize_nf4(w.float(), 64)
    for backend in BACKENDS:
        with _backend.use_backend(backend):
            y = lora_linear(x, w4, a, b, 1.5, bias)
        want = x @ w4.dequantize(F32).double().t() + 1.5 * (x @ a.t()) @ b.t() + bias
        assert_rel_close(y, want, torch.float64, f"{backend} float64 over NF4")


# ================================================================================================ modules

def test_module_forward_bad_inputs_and_empty_batch():
    lin = nn.Linear(13, 6)
    for layer in (LoRALinear.from_linear(lin, r=4), QLoRALinear.from_linear(lin, r=4)):
        with pytest.raises(ValueError, match=r"x\.shape\[-1\]=12 does not match the weight's in_features=13"):
            layer(torch.randn(3, 12))
        with pytest.raises(ValueError, match=r"on cpu but x is on meta|is on cpu but x is on meta"):
            layer(torch.randn(3, 13, device="meta"))
        layer.train()
        layer.lora_dropout = 0.5
        x = torch.randn(0, 13, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == (0, 6) and torch.equal(layer.lora_A.grad, torch.zeros_like(layer.lora_A))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: LoRALinear(torch.ones(5, 7, dtype=torch.int64)), TypeError, r"weight\.dtype=torch\.int64"),
    (lambda: LoRALinear(torch.ones(5, 7, 1)), ValueError, r"weight must be 2-D"),
    (lambda: LoRALinear(torch.ones(5, 7), bias=torch.ones(7)), ValueError, r"bias has shape \(7,\)"),
    (lambda: LoRALinear(torch.ones(5, 7), r=0), ValueError, r"r=0 must be >= 1"),
    (lambda: LoRALinear(torch.ones(5, 7), r=2.0), TypeError, r"r=2\.0 must be an int"),
    (lambda: LoRALinear(torch.ones(5, 7), lora_alpha=float("nan")), ValueError, r"lora_alpha=nan"),
    (lambda: LoRALinear(torch.ones(5, 7), lora_dropout=1.0), ValueError, r"lora_dropout=1\.0"),
    (lambda: LoRALinear(torch.ones(5, 7), use_rslora=1), TypeError, r"use_rslora=1 must be a bool"),
    (lambda: QLoRALinear(torch.ones(5, 7)), TypeError, r"weight must be an NF4Weight"),
    (lambda: QLoRALinear.from_linear(nn.Linear(7, 5, device="meta")), ValueError, r"meta device"),
    (lambda: QLoRALinear.from_linear(nn.Linear(7, 5), blocksize=48), ValueError, r"blocksize=48"),
    (lambda: QLoRALinear.from_linear(nn.Linear(7, 5), double_quant="no"), TypeError, r"double_quant"),
    (lambda: LoRALinear.from_linear(nn.Conv1d(3, 3, 1)), TypeError, r"needs a torch\.nn\.Linear, got Conv1d"),
], ids=["int-weight", "3d-weight", "bias-shape", "r0", "r-float", "alpha-nan", "dropout-1", "rslora-int",
        "qlora-dense", "qlora-meta", "qlora-blocksize", "qlora-dq", "conv"])
def test_module_constructors_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_lora_linear_on_meta_is_shape_inference():
    """Documented: a model built on the meta device can be adapted (dense base) and run for shapes."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(9, 5))
    apply_lora(model, ["0"], r=4)
    y = model(torch.randn(3, 9, device="meta"))
    assert y.device.type == "meta" and y.shape == (3, 5)


# ============================================================================================= apply_lora

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(9, 5)
        self.v = nn.Linear(5, 9, bias=False)
        self.norm = nn.LayerNorm(9)

    def forward(self, x):
        return self.norm(self.v(self.q(x)))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(target_modules=5), TypeError, r"target_modules=5 must be a list"),
    (dict(target_modules=[None]), TypeError, r"non-empty str module names, got \[None\]"),
    (dict(target_modules=[""]), TypeError, r"non-empty str"),
    (dict(target_modules=[]), ValueError, r"target_modules is empty"),
    (dict(target_modules="("), ValueError, r"not a valid regular expression"),
    (dict(target_modules=["norm"]), ValueError, r"not linear layers: norm \(LayerNorm\)"),
    (dict(target_modules=["nothing"]), ValueError, r"matched no module"),
    (dict(r=-1), ValueError, r"r=-1"),
    (dict(r=True), TypeError, r"r=True"),
    (dict(lora_alpha="16"), ValueError, r"lora_alpha='16'"),
    (dict(lora_dropout=float("nan")), ValueError, r"lora_dropout=nan"),
    (dict(quantize="int8"), ValueError, r"quantize='int8' is not one of"),
    (dict(quantize="nf4", blocksize=100), ValueError, r"blocksize=100"),
    (dict(quantize="nf4", double_quant=None), TypeError, r"double_quant=None"),
], ids=lambda v: str(v)[:40] if not isinstance(v, dict) else ",".join(f"{k}={v[k]!r}"[:24] for k in v))
def test_apply_lora_bad_input_leaves_model_unchanged(kwargs, exc, match):
    model = Toy()
    snap = snapshot(model)
    kw = dict(target_modules=["q", "v"])
    kw.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "matched nothing" warnings for the no-match cases
        with pytest.raises(exc, match=match):
            apply_lora(model, **kw)
    assert_unchanged(model, snap)


def test_apply_lora_nf4_on_meta_or_nan_weights_leaves_model_unchanged():
    with torch.device("meta"):
        meta_model = Toy()
    bad = Toy()
    with torch.no_grad():
        bad.v.weight[2, 3] = float("inf")
    for model, match in ((meta_model, r"v\.weight is on the meta device|q\.weight is on the meta device"),
                         (bad, r"v\.weight contains NaN or Inf")):
        types = [(n, type(m)) for n, m in model.named_modules()]
        with pytest.raises(ValueError, match=match):
            apply_lora(model, ["q", "v"], quantize="nf4")
        assert [(n, type(m)) for n, m in model.named_modules()] == types  # q was not swapped before v failed
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got dict"):
        apply_lora({"q": nn.Linear(3, 3)})


# ========================================================================================== adapter files

def _saved_adapter(tmp_path, seed=0):
    model = apply_lora(Toy(), ["q", "v"], r=3, lora_alpha=6)
    g = _gen(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    d = tmp_path / "adapter"
    save_adapter(model, d)
    return model, d


def _load_must_fail_cleanly(d, raw_w, raw_c, match=None):
    """Write the two files, load into a fresh and an adapted model: ValueError and nothing changed, or a load
    whose result is the tensors in the file. Returns the outcome per target."""
    (d / WEIGHTS_NAME).write_bytes(raw_w)
    (d / CONFIG_NAME).write_bytes(raw_c)
    outcome = []
    for into in ("fresh", "adapted"):
        model = Toy() if into == "fresh" else apply_lora(Toy(), ["q", "v"], r=3, lora_alpha=6)
        snap = snapshot(model)
        try:
            load_adapter(model, d)
            outcome.append("loaded")
        except ValueError as e:
            if match is not None:
                assert re.search(match, str(e)), str(e)
            assert_unchanged(model, snap)
            outcome.append("refused")
    return outcome


def test_adapter_every_truncation_is_refused_and_changes_nothing(tmp_path):
    """Cut adapter_model.safetensors (every 7th length and the boundaries) and adapter_config.json (every
    length): a ValueError naming the file, with both a fresh and an adapted model unchanged. A config cut
    only in its trailing newline still loads."""
    _, d = _saved_adapter(tmp_path)
    raw_w, raw_c = (d / WEIGHTS_NAME).read_bytes(), (d / CONFIG_NAME).read_bytes()
    header = 8 + int.from_bytes(raw_w[:8], "little")
    cuts = sorted(set(range(0, len(raw_w), 7)) | {1, 7, 8, 9, header - 1, header, header + 1, len(raw_w) - 1})
    for cut in cuts:
        assert _load_must_fail_cleanly(d, raw_w[:cut], raw_c, r"adapter_model\.safetensors is not a readable "
                                       r"safetensors file") == ["refused", "refused"], cut
    body = raw_c.rstrip()
    for cut in range(len(body)):
        assert _load_must_fail_cleanly(d, raw_w, raw_c[:cut], r"adapter_config\.json") == ["refused"] * 2, cut
    assert _load_must_fail_cleanly(d, raw_w, body) == ["loaded", "loaded"]


def test_adapter_random_bit_flips_never_crash_or_half_load(tmp_path):
    """200 single-bit flips at seeded random positions of either file: each load either raises ValueError and
    changes nothing, or succeeds (a flip inside tensor data or an ignored config field; safetensors has no
    checksum, so a flipped mantissa bit loads as a slightly different finite value - documented)."""
    _, d = _saved_adapter(tmp_path)
    raw_w, raw_c = (d / WEIGHTS_NAME).read_bytes(), (d / CONFIG_NAME).read_bytes()
    rng = random.Random(0)
    seen = collections.Counter()
    for _ in range(200):
        w, c = bytearray(raw_w), bytearray(raw_c)
        target = w if rng.random() < 0.5 else c
        j = rng.randrange(len(target))
        target[j] ^= 1 << rng.randrange(8)
        for o in _load_must_fail_cleanly(d, bytes(w), bytes(c)):
            seen[o] += 1
    assert seen["refused"] > 50 and seen["loaded"] > 10, seen  # both outcomes really happen


@pytest.mark.parametrize("config,match", [
    ("[]", r"must hold a JSON object, got list"),
    ("", r"not readable JSON"),
    ("\xff\xfe", r"not readable JSON"),
    (None, r"r='3' must be an int"),
    ({"r": 3.0}, r"r=3\.0 must be an int"),
    ({"r": True}, r"r=True must be an int"),
    ({"r": 0}, r"r=0 must be >= 1"),
    ({"lora_alpha": float("nan")}, r"lora_alpha=nan"),
    ({"lora_dropout": 1.0}, r"lora_dropout=1\.0"),
    ({"target_modules": 5}, r"target_modules: target_modules=5"),
    ({"target_modules": []}, r"target_modules is empty"),
    ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\]=0"),
    ({"alpha_pattern": {"q": "x"}}, r"alpha_pattern\['q'\]='x'"),
    ({"rank_pattern": [1]}, r"rank_pattern must be a JSON object"),
], ids=["list", "empty", "not-utf8", "r-str", "r-float", "r-bool", "r0", "alpha-nan", "dropout-1",
        "targets-int", "targets-empty", "rank-pattern-0", "alpha-pattern-str", "rank-pattern-list"])
def test_adapter_bad_config_is_refused_and_changes_nothing(tmp_path, config, match):
    _, d = _saved_adapter(tmp_path)
    raw_w = (d / WEIGHTS_NAME).read_bytes()
    if isinstance(config, str):
        raw_c = config.encode("latin-1")
    else:
        cfg = json.loads((d / CONFIG_NAME).read_text())
        cfg.update(config if config is not None else {"r": "3"})
        raw_c = json.dumps(cfg).encode()  # json writes NaN for float("nan"), as Python's json.dump would
    assert _load_must_fail_cleanly(d, raw_w, raw_c, match) == ["refused", "refused"]


def test_adapter_paths_and_arguments(tmp_path):
    model, d = _saved_adapter(tmp_path)
    fresh = Toy()
    snap = snapshot(fresh)
    with pytest.raises(ValueError, match=r"adapter_config\.json does not exist"):
        load_adapter(fresh, tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"does not exist"):
        load_adapter(fresh, tmp_path / "file")
    (d / WEIGHTS_NAME).unlink()
    (d / WEIGHTS_NAME).mkdir()  # a directory where the file should be
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors does not exist"):
        load_adapter(fresh, d)
    with pytest.raises(ValueError, match=r"quantize='int4' is not one of"):
        load_adapter(fresh, d, quantize="int4")
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        load_adapter("model", d)
    assert_unchanged(fresh, snap)
    with pytest.raises(ValueError, match=r"has no LoRA layers to save"):
        save_adapter(Toy(), tmp_path / "none")
    assert not (tmp_path / "none").exists()
    # Documented: a path that is an existing file is the OS's error, naming the path; nothing is written.
    with pytest.raises(FileExistsError, match="file"):
        save_adapter(model, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


# ========================================================================================= benchmark CLI

@pytest.mark.parametrize("args,match", [
    (["--preset", "bogus"], r"invalid choice: 'bogus'"),
    (["--providers", "nope"], r"unknown provider \['nope'\]"),
    (["--providers", ","], r"unknown provider ','"),
    (["--modes", "sideways"], r"unknown mode \['sideways'\]"),
    (["--warmup-ms", "-1"], r"--warmup-ms: '-1' must be a finite number >= 0"),
    (["--rep-ms", "0"], r"--rep-ms: '0' must be a finite number > 0"),
    (["--rep-ms", "nan"], r"--rep-ms: 'nan' must be a finite number > 0"),
    (["--rep-ms", "abc"], r"--rep-ms: 'abc' is not a number"),
    (["--threads", "0"], r"--threads: '0' must be a finite number >= 1"),
    (["--threads", "2.5"], r"--threads: '2\.5' is not an integer"),
    (["--budget-s", "-5"], r"--budget-s: '-5' must be a finite number > 0"),
    (["--budget-s", "inf"], r"--budget-s: 'inf' must be a finite number > 0"),
    (["--seed", "x"], r"--seed: invalid int value: 'x'"),
    (["--bogus-flag"], r"unrecognized arguments: --bogus-flag"),
])
def test_benchmark_cli_bad_arguments(capsys, args, match):
    """Each bad argument fails at parse time (exit status 2, message on stderr) before anything is timed;
    --rep-ms nan, --threads 0, --budget-s -5 and --warmup-ms -1 used to be accepted."""
    from benchmarks.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--cpu", *args])
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_benchmark_cli_unwritable_out_fails_before_timing(tmp_path, capsys, monkeypatch):
    from benchmarks import cli, harness
    monkeypatch.setattr(harness, "run_cases", lambda *a, **k: pytest.fail("timed despite an unwritable --out"))
    (tmp_path / "file").write_text("x")
    assert cli.main(["--cpu", "--quiet", "--out", str(tmp_path / "file")]) == 2
    assert "cannot write results under --out" in capsys.readouterr().err


def test_benchmark_module_entry_point_exit_status():
    """``python -m benchmarks`` itself (its __main__ passes main's status to sys.exit)."""
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--cpu", "--rep-ms", "nan"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--rep-ms: 'nan' must be a finite number" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--cpu", "--list", "--preset", "nf4"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "nf4" in r.stdout, r.stderr


# ============================================================================================== numerics

def _nonfinite_case(m, k, n, r, dtype, seed):
    x, w, a, b, bias = _lora_inputs(m, k, n, r, dtype=dtype, seed=seed)
    x[1, 3] = float("inf")
    x[2, 5] = float("nan")
    x[3, :] = float("-inf")
    x[4, k - 1] = float("inf")  # the last column: the partial K tile
    dy = torch.randn(m, n, generator=_gen(seed + 1)).to(dtype)
    dy[m - 1, n - 1] = float("inf")
    return x, w, a, b, bias, dy


@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("weight", ["dense", "nf4"])
def test_nan_inf_propagate_like_the_reference(p, weight):
    """NaN/Inf in x (and an Inf in dY) land where the float64 oracle puts them, on the reference and in the
    Triton kernels. With dropout a dropped Inf gives NaN (Inf * 0), as torch.nn.Dropout and the reference do;
    the kernels used to select 0 there, so their dA (and S, dB) differed from the reference."""
    m, k, n, r = 9, 67, 11, 3
    x, w, a, b, bias, dy = _nonfinite_case(m, k, n, r, F32, seed=7)
    wt = w if weight == "dense" else quantize_nf4(w, 64, double_quant=True)
    wd = w if weight == "dense" else wt.dequantize(F32)
    got = {bk: run_lora(bk, x, wt, a, b, 1.5, bias, p, dy, seed=3) for bk in BACKENDS}
    mask = kernel_mask("reference", 3, m, k, p)
    assert mask is None or torch.equal(mask, kernel_mask("triton", 3, m, k, p))
    want = oracle64(x, wd, a, b, 1.5, bias, mask, p, dy)
    for bk in BACKENDS:
        for name, g, t in zip(("y", "dx", "dA", "dB", "dbias"), got[bk], want):
            assert_same_nonfinite(g, t, f"{bk} {name}")
    assert bool(torch.isnan(got["reference"][2]).any()), "the case must actually make NaN in dA"


def test_nan_inf_mutation_control():
    """The non-finite comparison fails on a result with one NaN moved or an Inf's sign flipped."""
    want = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    with pytest.raises(AssertionError, match="NaN positions"):
        assert_same_nonfinite(torch.tensor([float("nan"), 1.0, float("inf"), 2.0]), want, "moved NaN")
    with pytest.raises(AssertionError, match=r"\+inf positions"):
        assert_same_nonfinite(torch.tensor([1.0, float("nan"), float("-inf"), 2.0]), want, "flipped inf")


def _cancelling_fp16_case(m=6, k=40, n=5, r=3, c=6.0e4):
    """fp16 inputs of magnitude 6e4 whose partial sums pass 65504 (x's first half +c, second half -c, against
    weights 1 + small) while every output stays well inside fp16."""
    g = _gen(8)
    sign = torch.cat([torch.ones(k // 2), -torch.ones(k - k // 2)])
    x = (c * sign).repeat(m, 1)
    x[1::2] *= -1
    jitter = lambda rows: 1.0 + torch.randint(-4, 5, (rows, k), generator=g) / 1024.0  # noqa: E731
    w, a = jitter(n) * 1e-3, jitter(r)
    b = torch.randn(n, r, generator=g) * 1e-3
    return [t.to(F16) for t in (x, w, a, b)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_partial_sums_beyond_65504_do_not_overflow(backend):
    x, w, a, b = _cancelling_fp16_case()
    assert float((x[0, : x.shape[1] // 2].float() * a[0, : x.shape[1] // 2].float()).sum()) > 65504
    dy = torch.ones(x.shape[0], w.shape[0], dtype=F16)
    got = run_lora(backend, x, w, a, b, 0.5, None, 0.0, dy)
    want = oracle64(x, w, a, b, 0.5, None, None, 0.0, dy)
    for name, g, t in zip(("y", "dx", "dA", "dB"), got, want):
        assert bool(torch.isfinite(g).all()), f"{backend} {name} overflowed"
        assert_rel_close(g, t, F16, f"{backend} {name}")
    # Control: the same sums accumulated in fp16 do overflow (so the test exercises the fp32 accumulators).
    acc = torch.zeros((), dtype=F16)
    for v in (x[0].float() * a[0].float()).to(F16):
        acc = acc + v
    assert not bool(torch.isfinite(acc))


def test_bf16_large_magnitudes_reference():
    """bf16 products near 1e37 (representable in fp32 and bf16) accumulate without overflow on the reference."""
    g = _gen(9)
    x = (torch.randn(5, 24, generator=g) * 3e18).to(BF16)
    w = (torch.randn(7, 24, generator=g) * 3e18).to(BF16)
    a = (torch.randn(2, 24, generator=g) * 3e18).to(BF16)
    b = (torch.randn(7, 2, generator=g) * 1e-19).to(BF16)
    with _backend.use_backend("reference"):
        y = lora_linear(x, w, a, b, 1.0)
    assert bool(torch.isfinite(y).all())
    assert_rel_close(y, oracle64(x, w, a, b, 1.0, None, None, 0.0, torch.zeros(5, 7))[0], BF16, "bf16 large")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_nf4_blocks_never_make_nan(backend):
    """All-zero blocks (a whole first row band, a -0.0 block, the partial last block) under both absmax
    formats: lora_linear's forward and dX use finite weights equal to dequantize() (no 1/0 or 0*inf NaN)."""
    m, k, n, r = 7, 50, 9, 2  # 450 elements, blocksize 64: 8 blocks, the last holds 2 elements
    x, w, a, b, bias = _lora_inputs(m, k, n, r, seed=10)
    flat = w.view(-1)
    flat[:128] = 0.0
    flat[192:256] = -0.0
    flat[448:] = 0.0
    dy = torch.randn(m, n, generator=_gen(11))
    for dq in (False, True):
        w4 = quantize_nf4(w, 64, double_quant=dq)
        deq = w4.dequantize(F32)
        assert bool(torch.isfinite(deq).all())
        got = run_lora(backend, x, w4, a, b, 2.0, bias, 0.0, dy)
        want = oracle64(x, deq, a, b, 2.0, bias, None, 0.0, dy)
        for name, g, t in zip(("y", "dx", "dA", "dB", "dbias"), got, want):
            assert bool(torch.isfinite(g).all()), f"{backend} dq={dq} {name}"
            assert_rel_close(g, t, F32, f"{backend} dq={dq} {name}")


def test_all_zero_block_under_double_quant_is_minus_reconstructed_absmax():
    """An all-zero block gets code 0 (value -1) everywhere; without double quantization its absmax is 0, so
    it dequantizes to -0.0. With double quantization the absmax is rebuilt as code[q] * nested_absmax + offset,
    which is not exactly 0, so the block dequantizes to -(that), a value no larger than half the 8-bit step
    of the nested map. bitsandbytes' CUDA build does exactly this: in the golden case zeros_blocks_fp32_dq
    the zero block reads +1.4562e-05 in its recorded dequantization (bnb's reconstructed absmax is
    -1.4562e-05), and our reference reproduces those bits."""
    data = torch.load(os.path.join(ROOT, "tests", "golden", "nf4_cuda_golden.pt"), weights_only=True)
    case = next(c for c in data["cases"] if c["name"] == "zeros_blocks_fp32_dq")
    bnb = case["bnb"]
    w, bs = case["input"], case["blocksize"]
    flat = w.reshape(-1)
    zero_blocks = [i for i in range(-(-flat.numel() // bs)) if not bool(flat[i * bs:(i + 1) * bs].any())]
    assert zero_blocks, "the golden case has no all-zero block"
    ours = quantize_nf4(w, bs, double_quant=True)
    rebuilt = reference_absmax(bnb["absmax"], bnb["nested_absmax"], ours.nested_code, bnb["offset"])
    bnb_deq = bnb["dequant"]["float32"].reshape(-1)
    bnb_state = NF4Weight(bnb["packed"], bnb["absmax"], ours.shape, ours.dtype, bs, bnb["nested_absmax"],
                          ours.nested_code, bnb["offset"])
    our_deq = bnb_state.dequantize(F32).reshape(-1)
    for i in zero_blocks:
        blk = slice(i * bs, min((i + 1) * bs, flat.numel()))
        assert bool((bnb["packed"].reshape(-1)[i * bs // 2:(blk.stop + 1) // 2] == 0).all())  # code 0 pairs
        assert torch.equal(bnb_deq[blk], torch.full_like(bnb_deq[blk], -float(rebuilt[i])))
        assert torch.equal(our_deq[blk], bnb_deq[blk])
        step = float(bnb["nested_absmax"].max()) * 2.0 ** -7  # the dynamic map's largest gap near 0 is < 2^-7
        assert 0 < abs(float(rebuilt[i])) <= step
    plain = quantize_nf4(w, bs, double_quant=False).dequantize(F32).reshape(-1)
    for i in zero_blocks:
        blk = plain[i * bs:(i + 1) * bs]
        assert torch.equal(blk, torch.zeros_like(blk)) and bool(torch.signbit(blk).all())  # -1 * 0 = -0.0


# =========================================================================================== determinism

def _run_twice(backend, weight, deterministic, p=0.3, dtype=F32):
    m, k, n, r = 70, 67, 45, 5  # two M tiles and two K tiles in the interpreter's configs
    x, w, a, b, bias = _lora_inputs(m, k, n, r, dtype=dtype, seed=12)
    wt = w if weight == "dense" else quantize_nf4(w, 64, double_quant=True)
    dy = torch.randn(m, n, generator=_gen(13)).to(dtype)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        return [run_lora(backend, x, wt, a, b, 1.25, bias, p, dy, seed=77) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight", ["dense", "nf4_dq"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_same_seed_bit_identical(backend, weight, deterministic):
    """One torch.manual_seed, two runs with dropout: y and all four gradients bit-identical. (In the interpreter
    the fp32 atomics run in program order, so this cannot see their nondeterminism: the GPU tests below do.)"""
    import lora_ops.triton_kernels.lora as L
    before = collections.Counter(L.LAUNCHES)
    first, second = _run_twice(backend, weight, deterministic)
    for name, u, v in zip(("y", "dx", "dA", "dB", "dbias"), first, second):
        assert torch.equal(u, v), f"{name} differs between two runs with one seed"
    launched = collections.Counter(L.LAUNCHES) - before
    if backend == "triton":
        # Deterministic mode must route dB/dbias through the atomic-free kernel, never the atomic one.
        assert launched["lora_bwd_db"] == (2 if deterministic else 0), launched
        assert launched["lora_bwd_ds"] == 2
    else:
        assert not launched, launched


def test_another_seed_changes_the_result():
    """Mutation control for the determinism tests: a different seed draws another mask, and torch.equal sees it."""
    x, w, a, b, bias = _lora_inputs(20, 33, 7, 3, seed=14)
    dy = torch.randn(20, 7, generator=_gen(15))
    one = run_lora("reference", x, w, a, b, 1.0, bias, 0.3, dy, seed=1)
    two = run_lora("reference", x, w, a, b, 1.0, bias, 0.3, dy, seed=2)
    assert not torch.equal(one[0], two[0]) and not torch.equal(one[2], two[2])


_GPU_SCRIPT = r"""
import hashlib, sys, torch
import lora_ops
torch.use_deterministic_algorithms(True)
m, k, n, r = 3000, 1536, 1024, 16
g = torch.Generator().manual_seed(0)
x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16).requires_grad_(True)
w = (torch.randn(n, k, generator=g) / k ** 0.5).to("cuda", torch.bfloat16)
a = (torch.randn(r, k, generator=g) / k ** 0.5).to("cuda", torch.bfloat16).requires_grad_(True)
b = torch.randn(n, r, generator=g).to("cuda", torch.bfloat16).requires_grad_(True)
bias = torch.randn(n, generator=g).to("cuda", torch.bfloat16).requires_grad_(True)
wt = lora_ops.quantize_nf4(w, 64) if sys.argv[1] == "nf4" else w
torch.manual_seed(5)
y = lora_ops.lora_linear(x, wt, a, b, 2.0, bias=bias, dropout_p=0.1)
y.backward(torch.randn(m, n, generator=g).to("cuda", torch.bfloat16))
h = hashlib.sha256()
for t in (y, x.grad, a.grad, b.grad, bias.grad):
    h.update(t.detach().float().cpu().numpy().tobytes())
print(h.hexdigest())
"""


@pytest.mark.gpu
@pytest.mark.parametrize("weight", ["dense", "nf4"])
def test_gpu_deterministic_mode_bit_identical_in_process(cuda, weight, monkeypatch):
    """On CUDA under torch.use_deterministic_algorithms(True): two runs through lora_linear's autograd (bf16,
    dropout, bias, several M tiles) give bit-identical y and gradients, and the atomic dB kernel is not used.
    Without deterministic mode y, dx and dA are still bit-identical (no atomics there) and dB/dbias agree to
    the bf16 tolerance (their fp32 atomics may sum in another order)."""
    import lora_ops.triton_kernels.lora as L
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # in case a cuBLAS call sneaks in: it must not fail
    m, k, n, r = 3000, 1536, 1024, 16
    x, w, a, b, bias = (t.to(cuda) for t in _lora_inputs(m, k, n, r, dtype=BF16, seed=16))
    wt = w if weight == "dense" else quantize_nf4(w, 64, double_quant=True)
    dy = torch.randn(m, n, generator=_gen(17)).to(cuda, BF16)

    def run():
        return run_lora("auto", x, wt, a, b, 2.0, bias, 0.1, dy, seed=21)

    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        run()  # autotuning first: the compared runs use the cached configs
        before = collections.Counter(L.LAUNCHES)
        first, second = run(), run()
        launched = collections.Counter(L.LAUNCHES) - before
        torch.use_deterministic_algorithms(False)
        run()
        loose = [run(), run()]
    finally:
        torch.use_deterministic_algorithms(prev)
    for name, u, v in zip(("y", "dx", "dA", "dB", "dbias"), first, second):
        assert torch.equal(u, v), f"deterministic mode: {name} differs between two runs"
    assert launched["lora_bwd_db"] == 2, launched
    for name, u, v in list(zip(("y", "dx", "dA"), loose[0], loose[1])):
        assert torch.equal(u, v), f"default mode: {name} differs between two runs (it has no atomics)"
    for name, u, v in list(zip(("dB", "dbias"), loose[0][3:], loose[1][3:])):
        assert_rel_close(u, v, BF16, f"default mode {name}")
    for name, u, v in zip(("y", "dx", "dA", "dB", "dbias"), first, loose[0]):
        assert_rel_close(u, v, BF16, f"deterministic vs default {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("weight", ["dense", "nf4"])
def test_gpu_deterministic_across_processes(cuda, weight):
    """Two fresh processes with LORA_OPS_TRITON_AUTOTUNE=0 (autotuning may pick another tile config in another
    process, which changes fp32 summation order) and deterministic mode hash to the same bits."""
    env = {**os.environ, "LORA_OPS_TRITON_AUTOTUNE": "0", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    env.pop("TRITON_INTERPRET", None)
    digests = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", _GPU_SCRIPT, weight], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        digests.append(r.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1] and len(digests[0]) == 64, digests
