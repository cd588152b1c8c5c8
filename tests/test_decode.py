"""The small-batch decode op ``lora_ops::lora_decode`` (csrc/lora_decode.cu) and lora_linear's dispatch to it.

CPU (CI): the op's fake and opcheck with its reference kernel, the op vs a float64 oracle, the dispatch rule
(grad / dropout / M / dtype / backend) watched by a dispatch-mode spy, torch.compile through the dispatch, the
threshold loader and the committed results file, and the sm_90 compile of the kernel (no spills; PTX has the
tensor-core mma, the streaming loads, the cluster barriers, and the double-quant absmax as mul.rn + add.rn).

GPU (marker ``gpu``): the kernel against a float64 reference on float64 upcasts of the same inputs (M in 1, 2,
3, 7, 16; K 4096 and 4133; N 14336 and 1029; r 1, 16, 64; NF4 single/double quant and dense; bias or not;
bf16 and fp16 x), outputs poisoned with NaN before each launch; other block sizes, fp32 and misaligned inputs
(the general kernel); mutation controls; determinism; opcheck on CUDA; the dispatch on CUDA; a printed timing
table (ours vs the training path vs bf16 F.linear) that also measures the dispatch threshold and writes it to
``$OUT/decode_threshold.json`` (commit it as lora_ops/data/decode_threshold.json, the file the package reads, and
as benchmarks/results/h200/decode_threshold.json beside the other H200 results).
"""
import datetime
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

import lora_ops
from lora_ops import _backend, decode, nf4
from helpers import REL_TOL, OpSpy, assert_rel_close

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(m, k, n, r, dtype=torch.float32, device="cpu", seed=0, leading=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, m, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
    a = (torch.randn(r, k, generator=g) / k ** 0.5).to(device, dtype)
    b = torch.randn(n, r, generator=g).to(device, dtype)
    bias = torch.randn(n, generator=g).to(device, dtype)
    return x, w, a, b, bias


def _weight(kind, w, blocksize=64):
    """(weight tensors, blocksize, lora_linear's weight argument) for a dense or NF4 weight."""
    if kind == "dense":
        return (w, None, None, None, None), 0, w
    w4 = lora_ops.quantize_nf4(w.float(), blocksize=blocksize, double_quant=(kind == "nf4_dq"))
    return w4.tensors(), blocksize, w4


def _oracle(x, wtensors, blocksize, a, b, scaling, bias):
    """y in float64 from float64 upcasts: W exactly as the NF4 reference dequantizes it (fp32), then float64."""
    n, k = b.shape[0], x.shape[-1]
    if wtensors[1] is None:
        w = wtensors[0].double()
    else:
        w = nf4.reference_dequantize_nf4(*wtensors, blocksize, n, k, torch.float32).double()
    x64 = x.double()
    y = x64 @ w.t() + scaling * ((x64 @ a.double().t()) @ b.double().t())
    return y + bias.double() if bias is not None else y


KINDS = ["dense", "nf4", "nf4_dq"]


# ------------------------------------------------------------------------------------------ CPU: the op

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_decode_cpu(monkeypatch, kind, with_bias):
    """Fake (shapes, dtype, no aliasing), schema and autograd registration checks of lora_ops::lora_decode with
    its CPU (reference) kernel; K = 67 has a partial block and rows that straddle blocks."""
    monkeypatch.setenv("LORA_OPS_BACKEND", "auto")
    x, w, a, b, bias = _inputs(5, 67, 9, 3)
    wt, bs, _ = _weight(kind, w)
    torch.library.opcheck(torch.ops.lora_ops.lora_decode.default,
                          (x, *wt, bs, a, b, 0.75, bias if with_bias else None))


def test_decode_fake_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(7, 33, dtype=torch.bfloat16)
        packed = torch.empty(7 * 33 // 2 + 1, 1, dtype=torch.uint8)
        absmax = torch.empty(4, dtype=torch.float32)
        a, b = torch.empty(4, 33, dtype=torch.bfloat16), torch.empty(7, 4, dtype=torch.bfloat16)
        y = torch.ops.lora_ops.lora_decode(x, packed, absmax, None, None, None, 64, a, b, 2.0, None)
    assert tuple(y.shape) == (7, 7) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", KINDS)
def test_decode_op_cpu_matches_float64_oracle(kind):
    x, w, a, b, bias = _inputs(7, 131, 29, 5, seed=3)
    wt, bs, _ = _weight(kind, w)
    y = torch.ops.lora_ops.lora_decode(x, *wt, bs, a, b, 0.5, bias)
    ref = _oracle(x, wt, bs, a, b, 0.5, bias)
    assert_rel_close(y, ref, torch.float32, f"lora_decode {kind} (CPU)")
    # Mutation controls through the same helper: a missing scaling, a missing bias.
    with pytest.raises(AssertionError, match="relative error"):
        assert_rel_close(torch.ops.lora_ops.lora_decode(x, *wt, bs, a, b, 0.0, bias), ref, torch.float32)
    with pytest.raises(AssertionError, match="relative error"):
        assert_rel_close(torch.ops.lora_ops.lora_decode(x, *wt, bs, a, b, 0.5, None), ref, torch.float32)


# ------------------------------------------------------------------------------------ CPU: the dispatch

@pytest.fixture
def threshold16(monkeypatch, tmp_path):
    """A results file of threshold 16 and LORA_OPS_BACKEND=auto: the dispatch rule itself is what a test sees,
    not the committed measurement (which the GPU timing test is what writes)."""
    path = tmp_path / "threshold16.json"
    path.write_text(json.dumps({"threshold": 16}))
    monkeypatch.setattr(decode, "RESULTS_FILE", str(path))
    monkeypatch.setenv("LORA_OPS_BACKEND", "auto")
    return monkeypatch


@pytest.fixture
def cpu_kernel(threshold16):
    """Pretend the CPU has the decode kernel (the op's CPU kernel is the reference), with threshold 16."""
    threshold16.setattr(decode, "DEVICE_TYPES", ("cuda", "cpu"))
    return threshold16


def _dispatched(fn):
    with OpSpy() as spy:
        out = fn()
    ops = [o for o in spy.ops if o in ("lora_decode", "lora_fwd")]
    assert len(ops) == 1, spy.ops
    return ops[0], out


def _call(x, w, a, b, bias, grad=None, **kw):
    def run():
        return lora_ops.lora_linear(x, w, a, b, 0.5, bias, **kw)
    if grad is None:
        return _dispatched(run)
    with torch.set_grad_enabled(grad):
        return _dispatched(run)


DISPATCH_CASES = [
    # (name, requires_grad of x/A/B/bias, grad mode, lora_linear kwargs, rows M, expected op)
    ("grad enabled, x requires grad", "x", True, {}, 3, "lora_fwd"),
    ("grad enabled, only A requires grad", "a", True, {}, 3, "lora_fwd"),
    ("grad enabled, only B requires grad", "b", True, {}, 3, "lora_fwd"),
    ("grad enabled, only bias requires grad", "bias", True, {}, 3, "lora_fwd"),
    ("grad enabled, nothing requires grad", "", True, {}, 3, "lora_decode"),
    ("no_grad, everything requires grad", "x,a,b,bias", False, {}, 3, "lora_decode"),
    ("no_grad, M = 1", "a,b", False, {}, 1, "lora_decode"),
    ("no_grad, M = 16 (threshold)", "a,b", False, {}, 16, "lora_decode"),
    ("no_grad, M = 17", "a,b", False, {}, 17, "lora_fwd"),
    ("no_grad, dropout while training", "a,b", False, {"dropout_p": 0.1, "training": True}, 3, "lora_fwd"),
    ("no_grad, dropout but eval", "a,b", False, {"dropout_p": 0.1, "training": False}, 3, "lora_decode"),
]


@pytest.mark.parametrize("name,needs,grad,kw,m,expected", DISPATCH_CASES, ids=[c[0] for c in DISPATCH_CASES])
def test_dispatch_rule(cpu_kernel, name, needs, grad, kw, m, expected):
    x, w, a, b, bias = _inputs(m, 67, 9, 3)
    for nm, t in (("x", x), ("a", a), ("b", b), ("bias", bias)):
        t.requires_grad_(nm in needs.split(","))
    op, y = _call(x, w, a, b, bias, grad=grad, **kw)
    assert op == expected, f"{name}: {op}"
    if not (kw.get("dropout_p", 0.0) > 0.0 and kw.get("training", True)):  # no dropout drawn: same y as eval
        with torch.no_grad():
            ref = lora_ops.lora_linear(x.detach(), w, a.detach(), b.detach(), 0.5, bias.detach())
        assert_rel_close(y, ref, torch.float32, name)


def test_dispatch_leading_dims_count_rows(cpu_kernel):
    """M is the number of rows after flattening the leading dims: (2, 8, K) is 16 rows, (3, 6, K) is 18."""
    x, w, a, b, bias = _inputs(8, 67, 9, 3, leading=(2,))
    op, y = _call(x, w, a, b, bias, grad=False)
    assert op == "lora_decode" and tuple(y.shape) == (2, 8, 9)
    x, w, a, b, bias = _inputs(6, 67, 9, 3, leading=(3,))
    assert _call(x, w, a, b, bias, grad=False)[0] == "lora_fwd"


@pytest.mark.parametrize("backend,expected", [("auto", "lora_decode"), ("cuda", "lora_decode"),
                                              ("reference", "lora_fwd"), ("triton", "lora_fwd")])
# LORA_OPS_BACKEND=cuda on CPU tensors warns that it falls back to the reference (test_lora_reference.py tests it)
@pytest.mark.filterwarnings("ignore:lora_ops. LORA_OPS_BACKEND=cuda has no kernels for cpu tensors")
def test_dispatch_forced_backends_bypass_decode(cpu_kernel, backend, expected):
    cpu_kernel.setenv("LORA_OPS_BACKEND", backend)
    x, w, a, b, bias = _inputs(3, 67, 9, 3)
    if backend == "triton":  # the training path then runs Triton under the interpreter on these CPU tensors
        pytest.importorskip("triton")
        if not _backend.triton_interpreter():
            pytest.skip("needs TRITON_INTERPRET=1 for Triton on CPU tensors")
    assert _call(x, w, a, b, bias, grad=False)[0] == expected


def test_dispatch_float64_rank_and_device(cpu_kernel):
    x, w, a, b, bias = _inputs(3, 67, 9, 3, dtype=torch.float64)
    assert _call(x, w, a, b, bias, grad=False)[0] == "lora_fwd"  # float64 is reference-only
    x, w, a, b, bias = _inputs(3, 67, 9, decode.KERNEL_MAX_RANK + 1)
    assert _call(x, w, a, b, bias, grad=False)[0] == "lora_fwd"  # beyond the kernel's rank
    x, w, a, b, bias = _inputs(3, 67, 9, decode.KERNEL_MAX_RANK)
    assert _call(x, w, a, b, bias, grad=False)[0] == "lora_decode"
    cpu_kernel.setattr(decode, "DEVICE_TYPES", ("cuda",))  # the real CPU: no kernel, training path
    assert _call(x, w, a, b, bias, grad=False)[0] == "lora_fwd"


def test_eager_decode_runs_the_kernel_without_the_op(cpu_kernel):
    """In eager mode lora_linear calls the decode kernel directly (the op's dispatch costs as much host time as
    the kernel takes); under a dispatch mode (here the spy) the op runs, with the same result."""
    from lora_ops import reference
    x, w, a, b, bias = _inputs(3, 67, 9, 3)
    calls = []

    def kernel(x, weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_a, lora_b, scaling, bias):
        calls.append((x, weight))
        w = reference.dense_weight(weight, absmax, nested_absmax, nested_code, offset, blocksize, lora_b.shape[0],
                                   x.shape[1], x.dtype)
        return reference.lora_forward(x, w, lora_a, lora_b, scaling, bias)[0]

    real = _backend.lora_impl
    cpu_kernel.setattr(_backend, "lora_impl", lambda op, t: kernel if op == "lora_decode" else real(op, t))
    with torch.no_grad():
        y = lora_ops.lora_linear(x, w, a, b, 0.5, bias)
    assert len(calls) == 1 and calls[0][0].shape == (3, 67)
    op, y_op = _call(x, w, a, b, bias, grad=False)  # OpSpy is a dispatch mode: the op itself
    assert op == "lora_decode" and len(calls) == 2  # the op ran, and its implementation lookup found the kernel
    torch.testing.assert_close(y, y_op, rtol=0, atol=0)


def test_dispatch_nf4_weight_and_grads_flow(cpu_kernel):
    """An NF4 weight goes through the decode op under no_grad; with grad enabled the training path still gives
    gradients (the decode op has none)."""
    x, w, a, b, bias = _inputs(4, 131, 11, 2, seed=1)
    _, _, w4 = _weight("nf4_dq", w)
    op, y = _call(x, w4, a, b, bias, grad=False)
    assert op == "lora_decode"
    assert_rel_close(y, _oracle(x, w4.tensors(), 64, a, b, 0.5, bias), torch.float32, "decode NF4 (CPU)")
    a.requires_grad_(True)
    op, y = _call(x, w4, a, b, bias, grad=True)
    assert op == "lora_fwd"
    y.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_compile_fullgraph_through_decode(cpu_kernel):
    """torch.compile(fullgraph=True) traces the dispatch (threshold and kernel availability are constants to
    dynamo) and keeps lora_ops::lora_decode in the graph; the result matches eager."""
    x, w, a, b, bias = _inputs(5, 67, 9, 3, seed=2)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x):
        with torch.no_grad():
            return lora_ops.lora_linear(x, w, a, b, 0.5, bias)

    eager = f(x)
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend=backend)(x)
    torch._dynamo.reset()
    assert_rel_close(out, eager, torch.float32, "compiled decode")
    code = "\n".join(g.code for g in graphs)
    assert "lora_decode" in code and "lora_fwd" not in code, code


# ----------------------------------------------------------------------------------- CPU: the threshold

def _write(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_threshold_file_sets_the_dispatch(cpu_kernel, tmp_path):
    path = _write(tmp_path / "t.json", {"threshold": 5, "device": "test"})
    assert decode.load_threshold(path) == 5
    cpu_kernel.setattr(decode, "RESULTS_FILE", path)
    assert decode.decode_threshold() == 5
    x, w, a, b, bias = _inputs(5, 67, 9, 3)
    assert _call(x, w, a, b, bias, grad=False)[0] == "lora_decode"
    x, w, a, b, bias = _inputs(6, 67, 9, 3)
    assert _call(x, w, a, b, bias, grad=False)[0] == "lora_fwd"
    path0 = _write(tmp_path / "zero.json", {"threshold": 0})
    cpu_kernel.setattr(decode, "RESULTS_FILE", path0)
    x, w, a, b, bias = _inputs(1, 67, 9, 3)
    assert _call(x, w, a, b, bias, grad=False)[0] == "lora_fwd"  # 0 turns the decode path off


def test_threshold_default_without_file(tmp_path):
    assert decode.load_threshold(str(tmp_path / "missing.json")) == decode.DEFAULT_THRESHOLD == 0


@pytest.mark.parametrize("content", [{"threshold": 17}, {"threshold": -1}, {"threshold": 3.5}, {"threshold": True},
                                     {"threshold": "8"}, {"rule": "no threshold key"}, [8], "{not json"])
def test_threshold_file_rejects_bad_content(tmp_path, content):
    path = _write(tmp_path / "bad.json", content)
    with pytest.raises(ValueError, match=re.escape(path)):
        decode.load_threshold(path)


def test_threshold_from_timings_rule():
    t = {"nf4": {"1": {"decode_us": 8, "training_us": 30}, "4": {"decode_us": 9, "training_us": 31},
                 "16": {"decode_us": 14, "training_us": 32}},
         "dense": {"1": {"decode_us": 30, "training_us": 40}, "4": {"decode_us": 31, "training_us": 30},
                   "16": {"decode_us": 33, "training_us": 45}}}
    assert decode.threshold_from_timings(t) == 1  # dense loses at M = 4: stop there, even though 16 wins again
    t["dense"]["4"]["decode_us"] = 29
    assert decode.threshold_from_timings(t) == 16
    t["nf4"]["1"]["decode_us"] = 31
    assert decode.threshold_from_timings(t) == 0


def test_committed_threshold_matches_dispatch():
    """lora_ops/data/decode_threshold.json (the GPU measurement, shipped inside the package): the dispatch uses its
    threshold, the threshold is what its own timings support, and it is the same file as the one kept with the
    H200 results."""
    path = os.path.join(os.path.dirname(os.path.abspath(decode.__file__)), "data", "decode_threshold.json")
    assert os.path.abspath(decode.RESULTS_FILE) == path
    if not os.path.exists(path):
        pytest.skip("no committed decode_threshold.json yet: run the GPU timing test of this file and commit "
                    "$OUT/decode_threshold.json as lora_ops/data/decode_threshold.json")
    results_copy = os.path.join(REPO, "benchmarks", "results", "h200", "decode_threshold.json")
    if os.path.exists(results_copy):
        with open(path, "rb") as f, open(results_copy, "rb") as g:
            assert f.read() == g.read(), ("lora_ops/data/decode_threshold.json differs from "
                                          "benchmarks/results/h200/decode_threshold.json: copy the newer measurement "
                                          "over the other")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    assert decode.decode_threshold() == data["threshold"]
    assert decode.threshold_from_timings(data["timings_us"]) == data["threshold"], data["timings_us"]
    assert data["kernel_max_m"] == decode.KERNEL_MAX_M


# ----------------------------------------------------------------------------- CPU: the sm_90 compile

@pytest.fixture(scope="module")
def compiled_decode(tmp_path_factory):
    """ptxas -v report and PTX of csrc/lora_decode.cu for sm_90, with the project's nvcc flags."""
    nvcc = shutil.which(os.environ.get("NVCC", "nvcc"))
    if nvcc is None:
        pytest.skip("nvcc not found")
    sys.path.insert(0, os.path.join(REPO, "lora_ops"))
    try:
        from lora_build_flags import NVCC_FLAGS
    finally:
        sys.path.pop(0)
    out = tmp_path_factory.mktemp("nvcc")
    src = os.path.join(REPO, "csrc", "lora_decode.cu")
    base = [nvcc, *NVCC_FLAGS, "-I", os.path.join(REPO, "csrc")]
    obj = subprocess.run(base + ["-c", "-Xptxas", "-v", "-o", str(out / "d.o"), src], capture_output=True,
                         text=True, timeout=600)
    assert obj.returncode == 0, obj.stderr[-3000:]
    ptx = subprocess.run([nvcc, "-O3", "-std=c++17", "-arch=sm_90", "-ptx", "-I", os.path.join(REPO, "csrc"),
                          "-o", str(out / "d.ptx"), src], capture_output=True, text=True, timeout=600)
    assert ptx.returncode == 0, ptx.stderr[-3000:]
    return obj.stderr, (out / "d.ptx").read_text()


def _ptx_functions(ptx):
    parts = re.split(r"\n(?:\.visible )?\.entry ", ptx)
    return {p.split("(")[0]: p for p in parts[1:]}


def test_sm90_compile_has_no_spills(compiled_decode):
    report, _ = compiled_decode
    kernels = re.findall(r"Compiling entry function '(\w+)'", report)
    assert sum("tc_kernel" in k for k in kernels) == 12 and sum("general_kernel" in k for k in kernels) == 6, kernels
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(spills) == len(kernels) and all(s == ("0", "0") for s in spills), report


def test_sm90_ptx_tensor_cores_streaming_loads_clusters_and_exact_absmax(compiled_decode):
    _, ptx = compiled_decode
    funcs = _ptx_functions(ptx)
    # Template args in the mangled names: <T, FMT (0 dense, 1 NF4, 2 NF4 double quant), MT>.
    tc = {k: v for k, v in funcs.items() if "tc_kernel" in k}
    assert len(tc) == 12, list(funcs)
    for name, body in tc.items():
        fmt = int(re.search(r"tc_kernelI(?:6__half|13__nv_bfloat16)Li(\d)E", name).group(1))
        ab = "bf16" if "bfloat16" in name else "f16"
        assert f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32" in body, name
        assert "barrier.cluster.arrive.release.aligned" in body and "barrier.cluster.wait.acquire.aligned" in body
        assert "cp.async.bulk.prefetch.L2.global" in body, name
        vec = "v4" if fmt == 0 else "v2"  # dense: 16 B per lane and load; NF4: 8 B (one quantization block/step)
        assert f"ld.global.nc.L1::no_allocate.L2::256B.{vec}.u32" in body, name
        # The double-quant absmax is a rounded product then a rounded sum (never an fma); the only mul.rn /
        # add.rn of these kernels: none without double quantization (the control that the count means it).
        n_mul, n_add = body.count("mul.rn.f32"), body.count("add.rn.f32")
        if fmt == 2:
            assert n_mul > 0 and n_mul == n_add, (name, n_mul, n_add)
        else:
            assert n_mul == 0 and n_add == 0, (name, n_mul, n_add)


# ------------------------------------------------------------------------------------------------ GPU

def _ext_or_skip():
    try:
        from lora_ops import _ext
    except ImportError as e:
        if "cannot be JIT-built" in str(e):
            pytest.skip(f"no CUDA toolchain for lora_ops._C: {e}")
        raise
    return _ext


_WEIGHT_CACHE = {}


def _gpu_weight(k, n, cuda):
    """An (n, k) fp32 weight with a layer's spread and a few outliers (different absmax per block), cached."""
    key = (k, n)
    if key not in _WEIGHT_CACHE:
        g = torch.Generator(device=cuda).manual_seed(k * 7 + n)
        w = torch.randn(n, k, generator=g, device=cuda) * 0.02
        w.view(-1)[:: 9973] *= 8.0
        _WEIGHT_CACHE.clear()
        _WEIGHT_CACHE[key] = w
    return _WEIGHT_CACHE[key]


def _gpu_formats(w, xdtype, fmt, blocksize=64):
    """(weight tensors, blocksize, float64 dequantized weight) for fmt in dense / nf4 / nf4_dq."""
    n, k = w.shape
    if fmt == "dense":
        wd = w.to(xdtype)
        return (wd, None, None, None, None), 0, wd.double()
    w4 = lora_ops.quantize_nf4(w, blocksize=blocksize, double_quant=(fmt == "nf4_dq"))
    deq = nf4.reference_dequantize_nf4(*w4.tensors(), blocksize, n, k, torch.float32).double()
    return w4.tensors(), blocksize, deq


def _run(ext, x, wt, bs, a, b, scaling, bias):
    """One launch into a NaN-poisoned output; returns (y, path)."""
    out = torch.full((x.shape[0], b.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    y, path = ext.lora_decode_with_path(x, *wt, bs, a, b, scaling, bias, out=out)
    assert y.data_ptr() == out.data_ptr()
    return y, path


def _ref64(x, w64, a, b, scaling, bias):
    x64 = x.double()
    y = x64 @ w64.t() + scaling * ((x64 @ a.double().t()) @ b.double().t())
    return y + bias.double() if bias is not None else y


GPU_SHAPES = [(4096, 14336), (4096, 1029), (4133, 14336), (4133, 1029)]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", KINDS)
@pytest.mark.parametrize("k,n", GPU_SHAPES)
def test_decode_matches_reference_gpu(cuda, monkeypatch, k, n, fmt):
    """Every M, r, bias, x dtype for this shape and format; the tensor-core kernel runs when K % 64 == 0 (NF4
    blocksize 64 divides it), the general kernel for K = 4133 (odd: blocks straddle rows, NF4 bytes too)."""
    ext = _ext_or_skip()
    monkeypatch.setenv("LORA_OPS_BACKEND", "auto")
    w = _gpu_weight(k, n, cuda)
    want = "tensor_core" if k % 64 == 0 else "general"
    worst = {}
    g = torch.Generator(device=cuda).manual_seed(n + k)
    for xdtype in (torch.bfloat16, torch.float16):
        wt, bs, w64 = _gpu_formats(w, xdtype, fmt)
        for r in (1, 16, 64):
            a = (torch.randn(r, k, generator=g, device=cuda) / k ** 0.5).to(xdtype)
            b = (torch.randn(n, r, generator=g, device=cuda) * 0.1).to(xdtype)
            bias = (torch.randn(n, generator=g, device=cuda) * 0.1).to(xdtype)
            for m in (1, 2, 3, 7, 16):
                x = torch.randn(m, k, generator=g, device=cuda).to(xdtype)
                for bb in (None, bias):
                    y, path = _run(ext, x, wt, bs, a, b, 1.5, bb)
                    what = f"{fmt} K={k} N={n} M={m} r={r} bias={bb is not None} {xdtype}"
                    assert path == want, what
                    assert not torch.isnan(y).any(), f"{what}: {int(torch.isnan(y).sum())} outputs never written"
                    err = assert_rel_close(y, _ref64(x, w64, a, b, 1.5, bb), xdtype, what)
                    worst[xdtype] = max(worst.get(xdtype, 0.0), err)
    print(f"\n[decode {fmt} K={k} N={n} {want}] max rel err vs float64: "
          + ", ".join(f"{d}: {e:.2e} (tol {REL_TOL[d]:.0e})" for d, e in worst.items()))


@pytest.mark.gpu
def test_decode_other_blocksizes_dtypes_and_alignment_gpu(cuda):
    ext = _ext_or_skip()
    g = torch.Generator(device=cuda).manual_seed(5)
    cases = [  # (K, N, fmt, blocksize, x dtype, expected kernel)
        (4096, 1029, "nf4", 32, torch.bfloat16, "general"),      # 32 < the 64 k of an iteration
        (4096, 1029, "nf4_dq", 128, torch.bfloat16, "tensor_core"),
        (4096, 1029, "nf4", 256, torch.float16, "tensor_core"),
        (4096, 1029, "nf4_dq", 4096, torch.bfloat16, "tensor_core"),  # one block per row
        (4160, 1029, "nf4_dq", 128, torch.bfloat16, "general"),   # K % 64 == 0 but blocks of 128 straddle rows
        (4160, 517, "dense", 0, torch.float16, "tensor_core"),
        (1, 37, "nf4_dq", 64, torch.bfloat16, "general"),         # K = 1: one element per row
        (64, 3, "dense", 0, torch.bfloat16, "tensor_core"),       # one iteration, three rows of a 16-row tile
        (4133, 1029, "dense", 0, torch.float32, "general"),       # fp32: IEEE fp32 FMA on CUDA cores
        (4096, 1029, "nf4_dq", 64, torch.float32, "general"),
    ]
    for k, n, fmt, bs, xdtype, want in cases:
        w = torch.randn(n, k, generator=g, device=cuda) * 0.02
        wt, bs, w64 = _gpu_formats(w, xdtype, fmt, blocksize=bs or 64)
        for m, r in ((1, 1), (9, 7), (16, 128)):
            x = torch.randn(m, k, generator=g, device=cuda).to(xdtype)
            a = (torch.randn(r, k, generator=g, device=cuda) / max(k, 1) ** 0.5).to(xdtype)
            b = (torch.randn(n, r, generator=g, device=cuda) * 0.1).to(xdtype)
            bias = torch.randn(n, generator=g, device=cuda).to(xdtype)
            y, path = _run(ext, x, wt, bs, a, b, 0.5, bias)
            what = f"{fmt} bs={bs} K={k} N={n} M={m} r={r} {xdtype}"
            assert path == want, f"{what}: {path}"
            assert_rel_close(y, _ref64(x, w64, a, b, 0.5, bias), xdtype, what)
    # A 2-byte storage offset makes x, then A, misaligned for 16-byte loads: the general kernel, same result.
    k, n, m, r = 4096, 1029, 5, 16
    w = torch.randn(n, k, generator=g, device=cuda) * 0.02
    wt, bs, w64 = _gpu_formats(w, torch.bfloat16, "nf4_dq")
    x = torch.randn(m * k + 1, generator=g, device=cuda).to(torch.bfloat16)[1:].view(m, k)
    a = torch.randn(r * k + 1, generator=g, device=cuda).to(torch.bfloat16)[1:].view(r, k) / k ** 0.5
    b = (torch.randn(n, r, generator=g, device=cuda) * 0.1).to(torch.bfloat16)
    y, path = _run(ext, x, wt, bs, a, b, 0.5, None)
    assert path == "general"
    assert_rel_close(y, _ref64(x, w64, a, b, 0.5, None), torch.bfloat16, "misaligned x and A")
    y2, path2 = _run(ext, x.clone(), wt, bs, a.clone(), b, 0.5, None)
    assert path2 == "tensor_core"
    assert_rel_close(y2, _ref64(x, w64, a, b, 0.5, None), torch.bfloat16, "aligned copies")


@pytest.mark.gpu
@pytest.mark.parametrize("k", [4096, 4133])
def test_decode_mutations_fail_gpu(cuda, k):
    """Wrong inputs through the same assertion must fail, on both kernels: swapped nibbles, absmax shifted by one
    block, a missing scaling, a scaled nested absmax, the double-quant offset dropped."""
    ext = _ext_or_skip()
    n, m, r = 1029, 7, 16
    g = torch.Generator(device=cuda).manual_seed(11)
    w = torch.randn(n, k, generator=g, device=cuda) * 0.02
    w.view(-1)[::997] *= 8.0
    (packed, qabs, nabs, ncode, offset), bs, w64 = _gpu_formats(w, torch.bfloat16, "nf4_dq")
    x = torch.randn(m, k, generator=g, device=cuda).to(torch.bfloat16)
    a = (torch.randn(r, k, generator=g, device=cuda) / k ** 0.5).to(torch.bfloat16)
    b = torch.randn(n, r, generator=g, device=cuda)
    # The LoRA term at 30% of the base term: both halves of the layer are visible to the mutations.
    base, lora = x.double() @ w64.t(), 2.0 * (x.double() @ a.double().t()) @ b.double().t()
    b = (b * (0.3 * base.norm() / lora.norm())).to(torch.bfloat16)
    ref = _ref64(x, w64, a, b, 2.0, None)
    y, _ = _run(ext, x, (packed, qabs, nabs, ncode, offset), bs, a, b, 2.0, None)
    assert_rel_close(y, ref, torch.bfloat16, "unmutated")
    swapped = ((packed << 4) | (packed >> 4)).to(torch.uint8)
    mutants = {
        "swapped nibbles": ((swapped, qabs, nabs, ncode, offset), 2.0),
        "absmax off by one block": ((packed, torch.roll(qabs, 1), nabs, ncode, offset), 2.0),
        "missing scaling": ((packed, qabs, nabs, ncode, offset), 0.0),
        "nested absmax x4": ((packed, qabs, nabs * 4.0, ncode, offset), 2.0),
        "offset dropped": ((packed, qabs, nabs, ncode, torch.zeros_like(offset)), 2.0),
    }
    for name, (wt, s) in mutants.items():
        y, _ = _run(ext, x, wt, bs, a, b, s, None)
        with pytest.raises(AssertionError, match="relative error"):
            assert_rel_close(y, ref, torch.bfloat16, name)


@pytest.mark.gpu
def test_decode_ksplit_variants_gpu(cuda, monkeypatch):
    """Every split of a tile's K over 1, 2 or 4 warps (LORA_OPS_DECODE_KSPLIT; automatic otherwise) is right,
    with an iteration count that does not divide evenly (K = 4160: 65 iterations)."""
    ext = _ext_or_skip()
    g = torch.Generator(device=cuda).manual_seed(21)
    for k, n, fmt in ((4160, 1029, "nf4_dq"), (4096, 2048, "nf4"), (4160, 517, "dense")):
        w = torch.randn(n, k, generator=g, device=cuda) * 0.02
        wt, bs, w64 = _gpu_formats(w, torch.bfloat16, fmt)
        x = torch.randn(11, k, generator=g, device=cuda).to(torch.bfloat16)
        a = (torch.randn(16, k, generator=g, device=cuda) / k ** 0.5).to(torch.bfloat16)
        b = (torch.randn(n, 16, generator=g, device=cuda) * 0.1).to(torch.bfloat16)
        ref = _ref64(x, w64, a, b, 0.5, None)
        for split in ("1", "2", "4", "auto"):
            if split == "auto":
                monkeypatch.delenv("LORA_OPS_DECODE_KSPLIT", raising=False)
            else:
                monkeypatch.setenv("LORA_OPS_DECODE_KSPLIT", split)
            y, path = _run(ext, x, wt, bs, a, b, 0.5, None)
            assert path == "tensor_core"
            assert_rel_close(y, ref, torch.bfloat16, f"{fmt} K={k} N={n} ksplit={split}")


@pytest.mark.gpu
def test_decode_deterministic_gpu(cuda):
    """Bit-identical repeats: the split-K fragments and the cluster's S slices are summed in a fixed order."""
    ext = _ext_or_skip()
    for k, n in ((4096, 4096), (4133, 1029)):
        x, w, a, b, bias = _inputs(13, k, n, 16, dtype=torch.bfloat16, device=cuda, seed=4)
        wt, bs, _ = _weight("nf4_dq", w)
        first, _ = _run(ext, x, wt, bs, a, b, 0.5, bias)
        for _ in range(3):
            again, _ = _run(ext, x, wt, bs, a, b, 0.5, bias)
            assert torch.equal(again.view(torch.int16), first.view(torch.int16)), (k, n)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck_decode_cuda(cuda, monkeypatch, kind):
    _ext_or_skip()
    monkeypatch.setenv("LORA_OPS_BACKEND", "auto")
    for xdtype in (torch.bfloat16, torch.float32):
        x, w, a, b, bias = _inputs(5, 192, 37, 3, dtype=xdtype, device=cuda, seed=7)
        wt, bs, _ = _weight(kind, w)
        torch.library.opcheck(torch.ops.lora_ops.lora_decode.default, (x, *wt, bs, a, b, 0.75, bias))


@pytest.mark.gpu
def test_decode_outside_kernel_limits_gpu(cuda):
    """M > 16 or r > 128 (never sent by lora_linear) still give the right answer, through torch."""
    ext = _ext_or_skip()
    for m, r in ((17, 8), (3, 129)):
        x, w, a, b, bias = _inputs(m, 256, 41, r, dtype=torch.bfloat16, device=cuda, seed=m + r)
        wt, bs, _ = _weight("nf4_dq", w)
        y, path = ext.lora_decode_with_path(x, *wt, bs, a, b, 0.5, bias)
        assert path == "reference"
        assert_rel_close(y, _oracle(x, wt, bs, a, b, 0.5, bias), torch.bfloat16, f"M={m} r={r}")


@pytest.mark.gpu
def test_lora_linear_dispatch_cuda(cuda, threshold16):
    monkeypatch = threshold16
    _ext_or_skip()
    x, w, a, b, bias = _inputs(4, 4096, 1536, 16, dtype=torch.bfloat16, device=cuda, seed=9, leading=(2,))
    _, _, w4 = _weight("nf4_dq", w)
    ref = _oracle(x.reshape(-1, 4096), w4.tensors(), 64, a, b, 0.5, bias).reshape(2, 4, 1536)
    with torch.no_grad():
        op, y = _dispatched(lambda: lora_ops.lora_linear(x, w4, a, b, 0.5, bias))
    assert op == "lora_decode"
    assert_rel_close(y, ref, torch.bfloat16, "lora_linear -> lora_decode")
    a.requires_grad_(True)
    op, y = _dispatched(lambda: lora_ops.lora_linear(x, w4, a, b, 0.5, bias))
    assert op == "lora_fwd"
    assert_rel_close(y, ref, torch.bfloat16, "lora_linear -> lora_fwd")
    monkeypatch.setenv("LORA_OPS_BACKEND", "triton")
    with torch.no_grad():
        assert _dispatched(lambda: lora_ops.lora_linear(x, w4, a, b, 0.5, bias))[0] == "lora_fwd"


@pytest.mark.gpu
def test_decode_timing_gpu(cuda, threshold16):
    """Prints us and GB/s of weight bytes for 4096->14336, r=16, bf16 x: our decode (lora_linear under no_grad,
    and the kernel alone) vs the training path's forward (lora_ops::lora_fwd) vs a plain bf16 F.linear without
    LoRA; do_bench medians (L2 flushed by do_bench, and 4 weight copies rotated so L2 cannot serve them) and
    an eager steady loop (host time included, no CUDA graphs). Targets (issue 8): NF4 <= 12 us at M=1 and
    <= 15 us at M=16. Writes the threshold these timings support to $OUT/decode_threshold.json (or prints it)."""
    import triton

    monkeypatch = threshold16
    ext = _ext_or_skip()
    k, n, r, dt, copies = 4096, 14336, 16, torch.bfloat16, 4
    g = torch.Generator(device=cuda).manual_seed(0)
    dense = [(torch.randn(n, k, generator=g, device=cuda) * 0.02).to(dt) for _ in range(copies)]
    quant = [lora_ops.quantize_nf4(w, blocksize=64, double_quant=True) for w in dense]
    a = (torch.randn(r, k, generator=g, device=cuda) / k ** 0.5).to(dt)
    b = (torch.randn(n, r, generator=g, device=cuda) * 0.1).to(dt)
    weight_bytes = {"nf4": quant[0].nbytes(), "dense": n * k * 2}

    src = torch.empty(64 * 2 ** 20, dtype=torch.float32, device=cuda).normal_()
    dst = torch.empty_like(src)
    t_copy = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    copy_gbs = 2 * src.numel() * 4 / t_copy / 1e6
    del src, dst

    def bench_us(fns):
        it = itertools.cycle(fns)
        return 1e3 * triton.testing.do_bench(lambda: next(it)(), warmup=25, rep=100, return_mode="median")

    def graph_us(fns):  # CUDA graph of back-to-back calls rotating the copies: no flush, no host time
        it = itertools.cycle(fns)
        return 1e3 * triton.testing.do_bench_cudagraph(lambda: next(it)(), rep=100, return_mode="median")

    def eager_us(fns, calls=400):
        it = itertools.cycle(fns)
        for _ in range(20):
            next(it)()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            next(it)()
        torch.cuda.synchronize()
        return 1e6 * (time.perf_counter() - t0) / calls

    def gbs(kind, us):
        return weight_bytes[kind] / us / 1e3

    print(f"\n[decode timing 4096->14336 r=16 bf16] copy bandwidth {copy_gbs:.0f} GB/s (read+write); weight bytes: "
          f"NF4 {weight_bytes['nf4'] / 1e6:.1f} MB (at copy bandwidth {weight_bytes['nf4'] / copy_gbs / 1e3:.1f} us), "
          f"bf16 {weight_bytes['dense'] / 1e6:.1f} MB; do_bench median us [eager steady loop us]")
    timings = {"nf4": {}, "dense": {}}
    for kind in ("nf4", "dense"):
        weights = quant if kind == "nf4" else dense
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, generator=g, device=cuda).to(dt)
            wts = [(w.tensors(), 64) if kind == "nf4" else ((w, None, None, None, None), 0) for w in weights]
            with torch.no_grad():
                assert _dispatched(lambda: lora_ops.lora_linear(x, weights[0], a, b, 0.5))[0] == "lora_decode"
                ours = [lambda w=w: lora_ops.lora_linear(x, w, a, b, 0.5) for w in weights]
                kernel = [lambda t=t: ext.lora_decode(x, *t[0], t[1], a, b, 0.5, None) for t in wts]
                train = [lambda t=t: torch.ops.lora_ops.lora_fwd(x, *t[0], t[1], a, b, 0.5, None, 0.0, None)
                         for t in wts]
                row = {"decode_us": bench_us(ours), "decode_eager_us": eager_us(ours),
                       "decode_graph_us": graph_us(ours), "kernel_us": bench_us(kernel),
                       "kernel_graph_us": graph_us(kernel), "training_us": bench_us(train),
                       "training_eager_us": eager_us(train)}
                if kind == "dense":
                    lin = [lambda w=w: torch.nn.functional.linear(x, w) for w in dense]
                    row["linear_us"], row["linear_eager_us"] = bench_us(lin), eager_us(lin)
                    row["linear_graph_us"] = graph_us(lin)
            timings[kind][m] = row
            line = (f"  {kind:5s} M={m:2d}: ours {row['decode_us']:6.1f} [{row['decode_eager_us']:6.1f}] "
                    f"graph {row['decode_graph_us']:5.1f} us, kernel {row['kernel_us']:6.1f} us, graph "
                    f"{row['kernel_graph_us']:5.1f} us = {gbs(kind, row['kernel_graph_us']):5.0f} GB/s = "
                    f"{100 * gbs(kind, row['kernel_graph_us']) / copy_gbs:3.0f}% of copy | training path "
                    f"{row['training_us']:6.1f} [{row['training_eager_us']:6.1f}] us "
                    f"({gbs(kind, row['training_us']):5.0f} GB/s)")
            if kind == "dense":
                line += (f" | bf16 F.linear {row['linear_us']:6.1f} [{row['linear_eager_us']:6.1f}] graph "
                         f"{row['linear_graph_us']:5.1f} us ({gbs(kind, row['linear_graph_us']):5.0f} GB/s)")
            print(line)
    for m in (1, 16):  # the kernel alone by split of K over warps (automatic: 2 at this shape)
        x = torch.randn(m, k, generator=g, device=cuda).to(dt)
        ref = ext.lora_decode(x, *quant[0].tensors(), 64, a, b, 0.5, None)
        parts = []
        for split in ("1", "2", "4"):
            monkeypatch.setenv("LORA_OPS_DECODE_KSPLIT", split)
            assert_rel_close(ext.lora_decode(x, *quant[0].tensors(), 64, a, b, 0.5, None), ref, dt, f"split {split}")
            t = bench_us([lambda q=q: ext.lora_decode(x, *q.tensors(), 64, a, b, 0.5, None) for q in quant])
            parts.append(f"ksplit={split} {t:.1f} us ({gbs('nf4', t):.0f} GB/s)")
        monkeypatch.delenv("LORA_OPS_DECODE_KSPLIT")
        print(f"  nf4 M={m:2d} kernel by K split: " + ", ".join(parts))
    for m, target in ((1, 12.0), (16, 15.0)):
        for how, key in (("do_bench, L2 flushed", "decode_us"), ("CUDA graph, 4 copies rotated", "decode_graph_us")):
            t = timings["nf4"][m][key]
            print(f"  target NF4 M={m} ({how}): {t:.1f} us ({gbs('nf4', t):.0f} GB/s) <= {target:.0f} us "
                  f"{'MET' if t <= target else 'NOT MET'}")
    threshold = decode.threshold_from_timings(timings)
    record = {"threshold": threshold, "kernel_max_m": decode.KERNEL_MAX_M,
              "rule": "largest M <= 16 such that at every measured M' <= M, for NF4 (double quant) and dense bf16 "
                      "weights, lora_linear's decode op has a lower do_bench median than the training path's "
                      "forward (lora_ops::lora_fwd)",
              "device": torch.cuda.get_device_name(cuda), "torch": torch.__version__,
              "shape": {"in": k, "out": n, "r": r, "dtype": "bfloat16", "rotated_weight_copies": copies},
              "copy_gbs": round(copy_gbs, 1),
              "timings_us": {kind: {str(m): {key: round(v, 3) for key, v in row.items()} for m, row in rows.items()}
                             for kind, rows in timings.items()},
              "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    text = json.dumps(record, indent=1)
    out_dir = os.environ.get("OUT")
    if out_dir and os.path.isdir(out_dir):
        with open(os.path.join(out_dir, "decode_threshold.json"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        print(f"  dispatch threshold {threshold}: wrote {out_dir}/decode_threshold.json "
              "(commit it as lora_ops/data/decode_threshold.json and benchmarks/results/h200/decode_threshold.json)")
    else:
        print(f"  dispatch threshold {threshold} ($OUT unset; the record follows)\n{text}")
    assert decode.threshold_from_timings(record["timings_us"]) == threshold
