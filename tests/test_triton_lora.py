"""The Triton LoRA/QLoRA kernels (triton_kernels/lora.py) against the PyTorch reference.

Runs on CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU), or
on CUDA tensors when a GPU is present. Every comparison goes through ``lora_ops.lora_linear`` or
``torch.ops.lora_ops.*`` with LORA_OPS_BACKEND=triton while the reference implementations are patched to raise,
and checks that the kernels' launch counter moved, so no test can pass on the reference path.

The oracle is ``lora_ops.reference`` in float64 on the same weights the kernel sees (the NF4 weight dequantized
to the input dtype, exactly the values the kernel decodes) and the kernel's own dropout mask
(``lora_ops.testing.materialize_dropout_mask``). Tolerances come only from tests/helpers.py; mutation controls
push deliberately wrong oracles through the same assertion and expect it to fail.
"""
import contextlib
import os
from types import SimpleNamespace

import pytest
import torch

import lora_ops
from lora_ops import nf4, reference
from lora_ops.testing import materialize_dropout_mask, peek_dropout_seed
from helpers import OpSpy, assert_rel_close, kernels_only, run_sm90_probe

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
if not torch.cuda.is_available() and not lora_ops._backend.triton_interpreter():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)
L = pytest.importorskip("lora_ops.triton_kernels.lora")
from lora_ops.triton_kernels import lora_kernels as LK  # noqa: E402
from lora_ops.triton_kernels import lora_tuning as LT  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FWD_KERNELS = ("lora_s", "lora_fwd")
BWD_KERNELS = ("lora_bwd_ds", "lora_bwd_dx", "lora_bwd_da")


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("LORA_OPS_BACKEND", "triton")


def make_case(m, k, n, r, dtype, weight="dense", blocksize=64, bias=True, seed=0, lead=()):
    """Random inputs on DEVICE. ``wd`` is the dense weight the kernel must use: W itself, or the NF4 weight
    dequantized to ``dtype`` by the reference (the values the kernel decodes in its K-loop)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    a = torch.randn(r, k, generator=g) / k ** 0.5
    b = torch.randn(n, r, generator=g) / r ** 0.5  # a random (not zero-initialised) B: the LoRA term matters
    bias_t = torch.randn(n, generator=g) if bias else None
    dy = torch.randn(*lead, m, n, generator=g)
    if weight == "dense":
        wk = w.to(dtype).to(DEVICE)
        wd = wk
    else:
        wk = lora_ops.quantize_nf4(w.to(dtype), blocksize=blocksize, double_quant=weight == "nf4-dq").to(DEVICE)
        wd = nf4.reference_dequantize_nf4(*wk.tensors(), blocksize, n, k, dtype)
    dev = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return SimpleNamespace(x=dev(x), w=wk, wd=wd, a=dev(a), b=dev(b), bias=dev(bias_t), dy=dev(dy), m=m, k=k,
                           n=n, r=r, dtype=dtype, lead=lead, rows=m * int(torch.tensor(lead).prod()) if lead else m)


def oracle(case, scaling, p, mask, x=None, wd=None, dy=None):
    """float64 (y, S, dx, dA, dB, dbias) of the reference, on 2-D views."""
    d = lambda t: None if t is None else t.detach().reshape(-1, t.shape[-1]).double()  # noqa: E731
    x2, dy2 = d(case.x if x is None else x), d(case.dy if dy is None else dy)
    w64 = (case.wd if wd is None else wd).double()
    y, s = reference.lora_forward(x2, w64, d(case.a), d(case.b), scaling, d(case.bias), p, mask)
    grads = reference.lora_backward(dy2, x2, w64, d(case.a), d(case.b), s, scaling, p, mask, True, True, True,
                                    case.bias is not None)
    return (y, s) + tuple(grads)


def run_layer(case, scaling, p, monkeypatch):
    """lora_linear forward + backward on the Triton path: (y, dx, dA, dB, dbias) as 2-D tensors, and the mask."""
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (case.x, case.a, case.b))
    bias = case.bias.detach().clone().requires_grad_(True) if case.bias is not None else None
    mask = None
    if p > 0:
        mask = materialize_dropout_mask(peek_dropout_seed(DEVICE), case.rows, case.k, p, DEVICE)
    with kernels_only(monkeypatch, FWD_KERNELS + BWD_KERNELS):
        y = lora_ops.lora_linear(x, case.w, a, b, scaling, bias, dropout_p=p)
        y.backward(case.dy)
    flat = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731
    return (flat(y.detach()), flat(x.grad), a.grad, b.grad, bias.grad if bias is not None else None), mask


def assert_layer_close(got, want, dtype, what=""):
    """The one comparison of this file: y and every gradient within REL_TOL[dtype]."""
    for name, g, t in zip(("y", "dx", "dA", "dB", "dbias"), got, want):
        if t is None:
            assert g is None, f"{what}{name}: expected no gradient"
            continue
        assert g.dtype == dtype, f"{what}{name}: dtype {g.dtype} != {dtype}"
        assert_rel_close(g, t, dtype, f"{what}{name}")


def _want(o):
    y, _s, dx, dA, dB, dbias = o
    return (y, dx, dA, dB, dbias)


F32, F16 = torch.float32, torch.float16
# (M, K, N, r, dtype, weight, blocksize, dropout p, bias, leading dims)
CASES = {
    "dense-f32-bias": (37, 200, 70, 8, F32, "dense", 64, 0.0, True, ()),
    "dense-f16-dropout": (37, 200, 70, 8, F16, "dense", 64, 0.25, False, ()),
    "nf4-f32-dropout-bias": (37, 200, 70, 8, F32, "nf4", 64, 0.25, True, ()),
    "nf4dq-f16": (37, 200, 70, 8, F16, "nf4-dq", 64, 0.0, False, ()),
    "M1-nf4dq-f32-dropout": (1, 200, 70, 8, F32, "nf4-dq", 64, 0.1, True, ()),
    "r1-dense-f16-dropout-bias": (37, 200, 70, 1, F16, "dense", 64, 0.1, True, ()),
    "K129-straddle-nf4-f32": (37, 129, 70, 8, F32, "nf4", 64, 0.0, True, ()),
    "K129-straddle-nf4dq-f16-dropout": (37, 129, 70, 8, F16, "nf4-dq", 64, 0.25, True, ()),
    "odd-numel-bs32-nf4dq-f32": (20, 129, 33, 4, F32, "nf4-dq", 32, 0.1, False, ()),
    "bs4096-nf4-f16": (9, 129, 70, 8, F16, "nf4", 4096, 0.0, True, ()),
    "r80-two-rank-chunks-f32-dropout": (19, 70, 40, 80, F32, "dense", 64, 0.2, True, ()),
    "3d-input-nf4dq-f32": (5, 129, 33, 8, F32, "nf4-dq", 64, 0.1, True, (2,)),
    # K and N of two or more split units (64 under the interpreter): S and dS in slices summed by the GEMMs.
    "split-S-dS-dense-f32-dropout-bias": (37, 200, 136, 8, F32, "dense", 64, 0.2, True, ()),
    "split-S-dS-nf4dq-f16-r80": (21, 136, 200, 80, F16, "nf4-dq", 64, 0.0, True, ()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_reference(monkeypatch, name):
    m, k, n, r, dtype, weight, bs, p, bias, lead = CASES[name]
    case = make_case(m, k, n, r, dtype, weight, bs, bias, seed=len(name), lead=lead)
    got, mask = run_layer(case, 2.0, p, monkeypatch)
    assert_layer_close(got, _want(oracle(case, 2.0, p, mask)), dtype, f"{name}: ")


@pytest.mark.parametrize("dtype,p", [(F32, 0.2), (F16, 0.0)])
def test_split_reductions_equal_one_slice(monkeypatch, dtype, p):
    """S over K slices and dS over N slices (summed in slice order by the GEMMs, which store the rounded S / dS)
    give what one slice gives, within the rounding of the fp32 sums' order; and the slices really run."""
    from lora_ops.triton_kernels import lora as L
    from lora_ops.triton_kernels import records
    case = make_case(37, 200, 136, 8, dtype, "dense", 64, True, seed=7)
    monkeypatch.setattr(L, "_SPLIT_UNIT", 64)  # on CUDA: two slices of this small K and N as well
    seed_t = torch.tensor(11, dtype=torch.int64, device=DEVICE) if p > 0 else None

    def run():
        with records.recording() as recs:
            y, s = L.lora_forward(case.x, case.w, None, None, None, None, 0, case.a, case.b, 2.0, case.bias, p,
                                  seed_t)
            grads = L.lora_backward(case.dy, case.x, case.w, None, None, None, None, 0, case.a, case.b, s, 2.0, p,
                                    seed_t, True, True, True, True)
        return (y, s) + tuple(grads), {r.name: r.grid for r in recs}

    split, grids = run()
    assert grids["lora_s"][2] == 2 and grids["lora_bwd_ds"][2] == 2, grids
    monkeypatch.setattr(L, "_inner_splits", lambda m, cols, r_chunks, device: (1, cols))
    whole, grids1 = run()
    assert grids1["lora_s"][2] == 1 and grids1["lora_bwd_ds"][2] == 1, grids1
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == F32 else dict(rtol=2e-3, atol=2e-3)
    for name, a, b in zip(("y", "S", "dx", "dA", "dB", "dbias"), split, whole):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}", **tol)


def _op_args(case, p, seed):
    wargs = case.w.tensors() if isinstance(case.w, nf4.NF4Weight) else (case.w, None, None, None, None)
    bs = case.w.blocksize if isinstance(case.w, nf4.NF4Weight) else 0
    seed_t = torch.tensor(seed, dtype=torch.int64, device=DEVICE) if p > 0 else None
    return wargs, bs, seed_t


NEED_FLAGS = [
    ((True, True, True, True), ("lora_bwd_ds", "lora_bwd_dx", "lora_bwd_da"), ("lora_bwd_db",)),
    ((True, False, False, False), ("lora_bwd_ds", "lora_bwd_dx"), ("lora_bwd_da", "lora_bwd_db")),
    ((False, True, False, False), ("lora_bwd_ds", "lora_bwd_da"), ("lora_bwd_dx", "lora_bwd_db")),
    ((False, False, True, False), ("lora_bwd_db",), ("lora_bwd_ds", "lora_bwd_dx", "lora_bwd_da")),
    ((False, False, False, True), ("lora_bwd_db",), ("lora_bwd_ds", "lora_bwd_dx", "lora_bwd_da")),
    ((True, False, True, True), ("lora_bwd_ds", "lora_bwd_dx"), ("lora_bwd_da", "lora_bwd_db")),
]


@pytest.mark.parametrize("flags,runs,skips", NEED_FLAGS, ids=lambda v: str(v))
def test_backward_honours_need_flags(monkeypatch, flags, runs, skips):
    """Gradients not asked for come back with 0 elements and their kernels do not launch; the others match."""
    case = make_case(37, 129, 70, 8, F32, "nf4-dq", 64, bias=True, seed=3)
    p, seed = 0.25, 2 ** 33 + 17
    wargs, bs, seed_t = _op_args(case, p, seed)
    mask = materialize_dropout_mask(seed, 37, 129, p, DEVICE)
    want = oracle(case, 1.5, p, mask)
    with kernels_only(monkeypatch, FWD_KERNELS):
        y, s = torch.ops.lora_ops.lora_fwd(case.x, *wargs, bs, case.a, case.b, 1.5, case.bias, p, seed_t)
    assert s.shape == (37, 8) and s.dtype == F32 and s.is_contiguous()
    assert_rel_close(y, want[0], F32, "y")
    assert_rel_close(s, want[1], F32, "S")
    with kernels_only(monkeypatch, runs, skips):
        grads = torch.ops.lora_ops.lora_bwd(case.dy, case.x, *wargs, bs, case.a, case.b, s, 1.5, p, seed_t, *flags)
    for name, g, t, need in zip(("dx", "dA", "dB", "dbias"), grads, want[2:], flags):
        if need:
            assert_rel_close(g, t, F32, name)
        else:
            assert g.numel() == 0, f"{name} was not asked for but has shape {tuple(g.shape)}"


def test_deterministic_mode_uses_atomic_free_reduction(monkeypatch):
    """Under torch.use_deterministic_algorithms the dB/dbias reduction runs without atomics and two runs are
    bit-identical (deterministic mode also fills torch.empty with NaN, so an unwritten output would show)."""
    case = make_case(70, 129, 70, 8, F32, "nf4", 64, bias=True, seed=4)
    p = 0.1
    wargs, bs, seed_t = _op_args(case, p, 99)
    mask = materialize_dropout_mask(99, 70, 129, p, DEVICE)
    want = oracle(case, 2.0, p, mask)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            with kernels_only(monkeypatch, FWD_KERNELS + BWD_KERNELS + ("lora_bwd_db",)):
                y, s = torch.ops.lora_ops.lora_fwd(case.x, *wargs, bs, case.a, case.b, 2.0, case.bias, p, seed_t)
                runs.append((y, s) + torch.ops.lora_ops.lora_bwd(case.dy, case.x, *wargs, bs, case.a, case.b, s,
                                                                  2.0, p, seed_t, True, True, True, True))
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b), "deterministic mode gave two different results"
    for name, g, t in zip(("y", "S", "dx", "dA", "dB", "dbias"), runs[0], want):
        assert_rel_close(g, t, F32, name)


def test_noncontiguous_inputs(monkeypatch):
    """Transposed and strided views of x, W, A, B, bias and dY go through the kernels' strides."""
    case = make_case(37, 129, 70, 8, F32, "dense", bias=True, seed=5)
    x = case.x.t().contiguous().t()                                  # column-major x
    w = case.w.t().contiguous().t()                                  # column-major W
    a = torch.stack([case.a, case.a], dim=2)[:, :, 0]                # stride 2 along K
    b = case.b.t().contiguous().t()
    bias = torch.stack([case.bias, case.bias], dim=1)[:, 1]          # stride 2
    dy = case.dy.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (x, w, a, b, bias, dy))
    p = 0.25
    seed_t = torch.tensor(7, dtype=torch.int64, device=DEVICE)
    mask = materialize_dropout_mask(7, 37, 129, p, DEVICE)
    want = oracle(case, 2.0, p, mask)
    with kernels_only(monkeypatch, FWD_KERNELS + BWD_KERNELS):
        y, s = torch.ops.lora_ops.lora_fwd(x, w, None, None, None, None, 0, a, b, 2.0, bias, p, seed_t)
        grads = torch.ops.lora_ops.lora_bwd(dy, x, w, None, None, None, None, 0, a, b, s, 2.0, p, seed_t,
                                            True, True, True, True)
    for name, g, t in zip(("y", "S", "dx", "dA", "dB", "dbias"), (y, s) + tuple(grads), want):
        assert_rel_close(g, t, F32, name)


def test_empty_batch_launches_nothing(monkeypatch):
    case = make_case(0, 129, 70, 8, F32, "nf4-dq", 64, bias=True)
    x, a, b, bias = (t.detach().clone().requires_grad_(True) for t in (case.x, case.a, case.b, case.bias))
    before = sum(L.LAUNCHES.values())
    with kernels_only(monkeypatch):
        y = lora_ops.lora_linear(x, case.w, a, b, 2.0, bias, dropout_p=0.1)
        y.sum().backward()
    assert y.shape == (0, 70)
    assert sum(L.LAUNCHES.values()) == before, "an empty batch launched a kernel"
    for g in (a.grad, b.grad, bias.grad):
        assert g is not None and not g.any()
    assert x.grad.shape == (0, 129)


# ------------------------------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("seed,rows,cols,p", [(0, 5, 7, 0.5), (2 ** 40 + 12345, 33, 129, 0.05),
                                              (2 ** 62 - 1, 1, 1000, 0.9), (123, 17, 3, 0.0)])
def test_dropout_mask_matches_reference_bit_for_bit(seed, rows, cols, p):
    before = L.LAUNCHES["dropout_mask"]
    got = L.dropout_mask(seed, rows, cols, p, DEVICE)
    assert got.dtype == torch.bool and got.shape == (rows, cols)
    assert torch.equal(got.cpu(), reference.dropout_mask(seed, rows, cols, p))
    assert L.LAUNCHES["dropout_mask"] == before + (p > 0)
    # materialize_dropout_mask (what the other tests use) runs the kernel's mask on the Triton backend.
    assert torch.equal(materialize_dropout_mask(seed, rows, cols, p, DEVICE), got)


@triton.jit
def _keep_probe_kernel(seed_ptr, base_ptr, out_ptr, threshold, BLOCK: tl.constexpr):
    # base comes from an int64 tensor, as in the kernels (an int64 tile origin): Triton's interpreter stores a
    # plain int argument in [2**31, 2**32) as uint32 under an int64 type, which would break ``>> 32`` here only.
    local = tl.arange(0, BLOCK)
    keep = LK._dropout_keep(tl.load(seed_ptr), tl.load(base_ptr), local, threshold)
    tl.store(out_ptr + local, keep.to(tl.uint8))


@pytest.mark.parametrize("base", [2 ** 32 - 37, 3 * 2 ** 32 + 5, 2 ** 45 + 2 ** 31 - 10])
def test_dropout_hash_high_indices(base):
    """Flat indices past 2**32 (the hash's high word and the low-word carry) without materialising 2**32
    elements: the kernels' helper on ``base + arange(64)`` against reference.dropout_hash31."""
    seed, p = 2 ** 50 + 99, 0.5
    out = torch.empty(64, dtype=torch.uint8, device=DEVICE)
    seed_t = torch.tensor(seed, dtype=torch.int64, device=DEVICE)
    base_t = torch.tensor(base, dtype=torch.int64, device=DEVICE)
    _keep_probe_kernel[(1,)](seed_t, base_t, out, reference.dropout_keep_threshold(p), BLOCK=64)
    index = base + torch.arange(64, dtype=torch.int64)
    want = reference.dropout_hash31(seed, index) >= reference.dropout_keep_threshold(p)
    assert torch.equal(out.cpu().bool(), want)
    assert 0 < int(want.sum()) < 64  # the probe exercises both outcomes


# ------------------------------------------------------------------------------------------- mutation controls

def test_mutations_fail_the_same_assertion(monkeypatch):
    """Deliberately wrong oracles (missing scaling, another dropout seed, an off-by-one NF4 block, swapped
    nibbles, the dropout mask applied to all of dX) must fail the assertion the real tests use."""
    case = make_case(37, 129, 70, 8, F16, "nf4", 64, bias=True, seed=8)
    p = 0.25
    got, mask = run_layer(case, 2.0, p, monkeypatch)
    want = _want(oracle(case, 2.0, p, mask))
    assert_layer_close(got, want, F16)  # the control: the right oracle passes

    def must_fail(bad, what):
        with pytest.raises(AssertionError):
            assert_layer_close(got, bad, F16, what)

    must_fail(_want(oracle(case, 1.0, p, mask)), "missing scaling: ")
    seed = peek_dropout_seed(DEVICE)
    other = reference.dropout_mask(seed + 1, case.rows, case.k, p, DEVICE)
    must_fail(_want(oracle(case, 2.0, p, other)), "other dropout seed: ")
    packed, absmax = case.w.data, case.w.absmax
    off_by_one = nf4.reference_dequantize_nf4(packed, torch.roll(absmax, 1), None, None, None, 64, 70, 129, F16)
    must_fail(_want(oracle(case, 2.0, p, mask, wd=off_by_one)), "off-by-one NF4 block: ")
    swapped = ((packed >> 4) | (packed << 4)).to(torch.uint8)
    must_fail(_want(oracle(case, 2.0, p, mask, wd=nf4.reference_dequantize_nf4(swapped, absmax, None, None, None,
                                                                               64, 70, 129, F16))),
              "swapped nibbles: ")
    y, _s, dx, dA, dB, dbias = oracle(case, 2.0, p, mask)
    dx_all_masked = dx * mask.double() / (1 - p)
    with pytest.raises(AssertionError):
        assert_rel_close(got[1], dx_all_masked, F16, "dx with the mask on the base term too")


# ------------------------------------------------------------------------------------- configs, contract

def test_every_config_computes_the_same(monkeypatch):
    """Each kernel's CUDA configs (the autotuner may pick any of its family) through the same comparison: NF4
    with blocksize 32 (several blocks per tile row), dropout and bias; the dB kernel under deterministic mode."""
    case = make_case(37, 129, 70, 8, F32, "nf4-dq", 32, bias=True, seed=9)
    p = 0.25
    wargs, bs, seed_t = _op_args(case, p, 5)
    want = oracle(case, 2.0, p, materialize_dropout_mask(5, 37, 129, p, DEVICE))
    with kernels_only(monkeypatch, FWD_KERNELS):
        _, s = torch.ops.lora_ops.lora_fwd(case.x, *wargs, bs, case.a, case.b, 2.0, case.bias, p, seed_t)
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        for name, kernel in LT.KERNELS.items():
            torch.use_deterministic_algorithms(name == "lora_bwd_db")
            # The interpreter runs every config of every family; a GPU only those the autotuner may pick for
            # this call (another family's tile can exceed fp32's shared-memory budget).
            configs = kernel.configs if DEVICE.type == "cpu" else kernel.prune(
                list(kernel.configs), {"M": 37, "x_ptr": case.x}, IS_NF4=True)
            for cfg in configs:
                monkeypatch.setattr(kernel, "forced", cfg)
                with kernels_only(monkeypatch, (name,)):
                    if name in FWD_KERNELS:
                        out = torch.ops.lora_ops.lora_fwd(case.x, *wargs, bs, case.a, case.b, 2.0, case.bias, p,
                                                          seed_t)
                        names = ("y", "S")
                    else:
                        out = torch.ops.lora_ops.lora_bwd(case.dy, case.x, *wargs, bs, case.a, case.b, s, 2.0, p,
                                                          seed_t, True, True, True, True)
                        names = ("dx", "dA", "dB", "dbias")
                for what, g in zip(names, out):
                    assert_rel_close(g, want[("y", "S", "dx", "dA", "dB", "dbias").index(what)], F32,
                                     f"{name} {cfg}: {what}")
            monkeypatch.setattr(kernel, "forced", None)
    finally:
        torch.use_deterministic_algorithms(prev)


def test_opcheck_on_triton_backend(monkeypatch):
    case = make_case(9, 129, 33, 4, F32, "nf4-dq", 64, bias=True, seed=10)
    p = 0.25
    wargs, bs, seed_t = _op_args(case, p, 11)
    fwd_args = (case.x, *wargs, bs, case.a, case.b, 2.0, case.bias, p, seed_t)
    with kernels_only(monkeypatch, FWD_KERNELS + BWD_KERNELS):
        torch.library.opcheck(torch.ops.lora_ops.lora_fwd.default, fwd_args)
        _, s = torch.ops.lora_ops.lora_fwd(*fwd_args)
        for flags in ((True, True, True, True), (False, True, False, True)):
            torch.library.opcheck(torch.ops.lora_ops.lora_bwd.default,
                                  (case.dy, case.x, *wargs, bs, case.a, case.b, s, 2.0, p, seed_t, *flags))


def test_launcher_rejects_bad_input(monkeypatch):
    case = make_case(5, 40, 24, 4, F32, "nf4-dq", 32, bias=False)
    wargs, bs, _ = _op_args(case, 0.0, 0)
    args = lambda **kw: dict(dict(x=case.x, weight=wargs[0], absmax=wargs[1], nested_absmax=wargs[2],  # noqa: E731
                                  nested_code=wargs[3], offset=wargs[4], blocksize=bs, lora_A=case.a,
                                  lora_B=case.b, scaling=1.0, bias=None, dropout_p=0.1,
                                  seed=torch.tensor(1, device=DEVICE)), **kw)
    with pytest.raises(ValueError, match="int64"):
        L.lora_forward(**args(seed=torch.tensor(1, dtype=torch.int32, device=DEVICE)))
    with pytest.raises(ValueError, match="needs"):
        L.lora_forward(**args(x=case.x[:, :-2].contiguous(), lora_A=case.a[:, :-2].contiguous()))
    with pytest.raises(ValueError, match="blocksize"):
        L.lora_forward(**args(blocksize=48))
    with pytest.raises(ValueError, match="together"):
        L.lora_forward(**args(nested_code=None))
    with pytest.raises(ValueError, match="dropout_p"):
        L.lora_forward(**args(dropout_p=1.0))
    with pytest.raises(ValueError, match="lora_B"):
        L.lora_forward(**args(lora_B=case.b[:, :-1]))
    with pytest.raises(TypeError, match="float64"):
        L.lora_forward(**args(x=case.x.double()))
    if DEVICE.type == "cpu":
        monkeypatch.setattr(L, "_INTERPRET", False)
        with pytest.raises(ValueError, match="CUDA tensors"):
            L.lora_forward(**args())


# ------------------------------------------------------------------------------------ sm_90 compile (no GPU)

# Compiles the kernels for sm_90 in a subprocess (this process runs Triton's interpreter), with the launch-time
# specialization of a real layer (unit inner strides, the others divisible by 16), for bf16 and fp32, dense,
# NF4 and double-quantized NF4, dropout and bias on: the interpreter checks the math, this checks that the
# kernels compile (bf16, which the interpreter mishandles, included) and reports registers and spills from
# ptxas for the config each family uses when autotuning is off.
_SM90_PROBE = r"""
import json, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from lora_ops.triton_kernels import lora_tuning as LT

UNIT = {"stride_xk", "stride_wk", "stride_sr", "stride_br", "stride_ak", "stride_yn", "stride_dyn", "stride_dsr",
        "stride_dxk", "stride_dbr", "stride_dak", "stride_bias", "stride_dbias_n", "stride_lr", "stride_cn",
        "stride_lor"}
# The GEMM kernel's Rt is B^T in the forward (unit stride along r) and A_lora in dX (unit stride along n).
UNIT_BY_KERNEL = {"lora_fwd": {"stride_rr"}, "lora_bwd_dx": {"stride_rn"}}
GEMM_FLAGS = {"lora_fwd": dict(TRANS_W=True, HAS_DROPOUT=False, HAS_BIAS=True),
              "lora_bwd_dx": dict(TRANS_W=False, HAS_DROPOUT=True, HAS_BIAS=False)}
# A projection group's variants (B_rows, dY segments), compiled besides the plain ones for bf16 dense.
GROUP_FLAGS = {"lora_fwd": dict(GROUPED=True, SEG_A=False), "lora_bwd_dx": dict(GROUPED=False, SEG_A=True),
               "lora_bwd_ds": dict(GROUPED=True, SEG_DY=True), "lora_bwd_db": dict(GROUPED=True, SEG_DY=True)}
ptxas = get_ptxas(90).path
res = []


def build(fn, sig, consts, attrs, opts, **row):
    ck = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ck.asm["ptx"])
    out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"],
                         capture_output=True, text=True).stderr
    spill = re.findall(r"(\d+) bytes spill stores", out)
    regs = re.findall(r"Used (\d+) registers", out)
    atomics = re.findall(r"\batom\.global\.[\w.]*add\.(v\d\.)?f32\b", ck.asm["ptx"])
    res.append(dict(row, regs=int(regs[0]), spill=int(spill[0]), scalar_atomics=atomics.count(""),
                    vector_atomics=len(atomics) - atomics.count("")))


for dt, tdt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
    for wk in ("dense", "nf4", "nf4dq"):
        group_runs = [(n, LT.KERNELS[n], f) for n, f in GROUP_FLAGS.items()] + [
            ("lora_bwd_ds", LT.KERNELS["lora_bwd_ds"], dict(GROUP_FLAGS["lora_bwd_ds"], MEMBER_R=True))]
        # A codes group's stacked weight: one nested offset per nested block (bf16, double-quantized GEMMs).
        offset_runs = [(n, LT.KERNELS[n], dict(NESTED_OFFSETS=True)) for n in ("lora_fwd", "lora_bwd_dx")]
        for kname, kernel, group in [(n, k, None) for n, k in LT.KERNELS.items()] + [
                run for run in group_runs if dt == "bf16" and wk == "dense"] + [
                run for run in offset_runs if dt == "bf16" and wk == "nf4dq"]:
            gemm = kname in ("lora_fwd", "lora_bwd_dx")
            if wk != "dense" and not gemm:
                continue
            # NESTED_OFFSETS: at the config of 63 rows, the most that decode NF4 in the K loop on a GPU (from
            # NF4_DEQUANT_MIN_M rows the weight is dequantized first and the GEMM reads it dense).
            rows = 63 if group and group.get("NESTED_OFFSETS") else 8192
            cfg = kernel.prune(kernel.configs, {"M": rows, "x_ptr": torch.empty(1, dtype=tdt)}, IS_NF4=wk != "dense")[0]
            # With MEMBER_R a program's rank columns are one member's (rank 16 each).
            consts = dict(cfg.kwargs, BLOCK_R=16 if group and group.get("MEMBER_R") else 64)
            flags = dict(IS_NF4=wk != "dense", NESTED=wk == "nf4dq", BLOCKSIZE=64, HAS_BIAS=True, HAS_DROPOUT=True,
                         DO_DB=True, DO_DBIAS=True, WRITE_L=True, GROUPED=False, SEG_DY=False, SEG_A=False,
                         MEMBER_R=False, NESTED_OFFSETS=False)
            flags.update(GEMM_FLAGS.get(kname, {}))
            if group:
                flags.update(group)
            for name, val in flags.items():
                if name in kernel.fn.arg_names:
                    consts[name] = val
            missing = [p.name for p in kernel.fn.params if p.is_constexpr and p.name not in consts
                       and p.name not in flags]
            assert not missing, f"{kname}: no probe value for constexpr {missing}"
            sig, attrs = {}, {}
            for i, name in enumerate(kernel.fn.arg_names):
                if name in UNIT or name in UNIT_BY_KERNEL.get(kname, ()):
                    consts[name] = 1
                if name in consts:
                    sig[name] = "constexpr"
                    continue
                if name.endswith("_ptr"):
                    sig[name] = {"seed_ptr": "*i64", "w_ptr": "*u8" if wk != "dense" else f"*{dt}",
                                 "absmax_ptr": "*u8" if wk == "nf4dq" else "*fp32"}.get(
                        name, "*fp32" if name in ("offset_ptr", "codebook_ptr", "nested_absmax_ptr",
                                                  "nested_code_ptr", "db_acc_ptr", "dbias_acc_ptr") else f"*{dt}")
                else:
                    sig[name] = "fp32" if name in ("scaling", "drop_scale") else "i32"
                # rb (a group's rank per member, 16 here) and cols_per_split (a multiple of the split unit, or K /
                # N): divisible as the launchers' calls see them where the kernel specializes them.
                spec = name in ("rb", "cols_per_split") and not kernel.fn.params[i].do_not_specialize
                if name.endswith("_ptr") or name.startswith("stride") or name in ("N", "K", "R") or spec:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            if wk == "nf4dq":
                opts["enable_fp_fusion"] = False
            suffix = (" nested offsets" if group.get("NESTED_OFFSETS") else
                      " grouped" + (" members" if group.get("MEMBER_R") else "")) if group else ""
            build(kernel.fn, sig, consts, attrs, opts, kernel=kname + suffix, dtype=dt, weight=wk, config=str(cfg))
    # The finish kernel (fp32 sources, outputs of the layer's dtype) in its one config.
    fin = LT._FINISH_KERNEL.fn
    blocks, warps, stages = LT.FINISH_CONFIG
    sig = {n: ("*fp32" if n.startswith("src") else f"*{dt}") if n.endswith("_ptr") else "i32" for n in fin.arg_names}
    sig.update({n: "constexpr" for n in blocks})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fin.arg_names) if n.endswith("_ptr")}
    build(fin, sig, dict(blocks), attrs, {"num_warps": warps, "num_stages": stages}, kernel="lora_bwd_finish",
          dtype=dt, weight="-", config=str(blocks))
print(json.dumps(res))
"""


def test_kernels_compile_for_sm90_without_spilling():
    res = run_sm90_probe(_SM90_PROBE, timeout=900)
    # + the bf16 dense group variants of fwd, dx, dS, dB and dS per member, + the finish kernel per dtype, + the
    # bf16 double-quantized fwd and dx with one nested offset per nested block
    assert len(res) == 2 * (6 + 2 * 2) + 5 + 2 + 2
    # The configs used with autotuning off were chosen spill-free (a few bytes at most) for triton 3.6's
    # ptxas; hundreds of bytes would mean a kernel change pushed them over the register file.
    heavy = [r for r in res if r["spill"] > 64]
    assert not heavy, "register spills: " + "; ".join(
        f"{r['kernel']} {r['dtype']} {r['weight']} {r['config']}: {r['spill']} B, {r['regs']} regs" for r in heavy)
    # dB's fp32 atomics in the dS pass go out as vectors (atom...add.v4.f32), the grouped kernel's (B_rows) as
    # the plain one's: with rb unspecialized its member offsets compiled to one atomic per element.
    ds = {r["kernel"]: r for r in res if r["kernel"].startswith("lora_bwd_ds") and r["dtype"] == "bf16"}
    plain = ds["lora_bwd_ds"]
    assert plain["vector_atomics"] > 0, plain
    for name in ("lora_bwd_ds grouped", "lora_bwd_ds grouped members"):  # members: BLOCK_R 16, fewer vectors
        got = ds[name]
        assert got["scalar_atomics"] == plain["scalar_atomics"] and got["vector_atomics"] > 0, (
            f"{name}: {got['scalar_atomics']} scalar / {got['vector_atomics']} vector fp32 atomics against the plain "
            f"kernel's {plain['scalar_atomics']} / {plain['vector_atomics']}")
    assert ds["lora_bwd_ds grouped"]["vector_atomics"] == plain["vector_atomics"]


# ------------------------------------------------------------------------- eager fast path vs the custom op

def _layer_grads(case, p, seed, spy=None):
    leaves = [t.detach().clone().requires_grad_() for t in (case.x, case.a, case.b, case.bias)]
    torch.manual_seed(seed)
    with spy if spy is not None else contextlib.nullcontext():
        y = lora_ops.lora_linear(leaves[0], case.w, leaves[1], leaves[2], 1.5, leaves[3], dropout_p=p)
        y.backward(case.dy)
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("weight,p", [("dense", 0.0), ("nf4-dq", 0.2)])
def test_eager_path_equals_the_custom_op_bit_for_bit(monkeypatch, weight, p):
    """lora_linear in eager mode runs the kernels through ops._EagerLoRA (no dispatcher); inside a dispatch
    mode it goes through lora_ops::lora_fwd / lora_bwd. Same kernels, same seed: identical bits, and the spy
    proves which path each call took."""
    case = make_case(37, 129, 70, 8, F32, weight, 64, bias=True, seed=5)
    with kernels_only(monkeypatch, FWD_KERNELS + BWD_KERNELS):
        eager = _layer_grads(case, p, 11)
        spy = OpSpy()
        via_op = _layer_grads(case, p, 11, spy)
    assert spy.ops.count("lora_fwd") == 1 and spy.ops.count("lora_bwd") == 1, spy.ops
    for name, a, b in zip(("y", "dx", "dA", "dB", "dbias"), eager, via_op):
        assert torch.equal(a, b), f"{name}: eager path and custom op differ"


def test_eager_path_honours_needs_input_grad(monkeypatch):
    """Frozen x and bias: the eager backward launches neither the dX kernel nor computes dbias."""
    case = make_case(37, 129, 70, 8, F32, "dense", 64, bias=True, seed=6)
    a, b = case.a.clone().requires_grad_(), case.b.clone().requires_grad_()
    with kernels_only(monkeypatch, ("lora_bwd_ds", "lora_bwd_da"), ("lora_bwd_dx", "lora_bwd_db")):
        assert lora_ops._backend.eager_impl(case.x) is not None
        lora_ops.lora_linear(case.x, case.w, a, b, 1.5, case.bias).backward(case.dy)
    assert a.grad is not None and b.grad is not None and case.bias.grad is None


def test_eager_path_not_taken_on_reference_or_float64(monkeypatch):
    x = torch.zeros(2, 3, device=DEVICE)
    assert lora_ops._backend.eager_impl(x.double()) is None
    monkeypatch.setenv("LORA_OPS_BACKEND", "reference")
    assert lora_ops._backend.eager_impl(x) is None


# ------------------------------------------------------------------------------ the TMA GEMM (16-bit dense)

TMA_CASES = {
    # name: (M, K, N, r, weight, p, bias). 16-bit, every row stride a multiple of 8 elements (TMA's 16 bytes);
    # M and N not multiples of the tiles; r = 70 takes two rank chunks; dropout touches only the LoRA term.
    "fwd+dx, r=5, bias": (37, 72, 56, 5, "dense", 0.0, True),
    "M=130 (128-row tile), r=70, dropout": (130, 64, 264, 70, "dense", 0.1, False),
    "nf4 temporary is not used on CPU: NF4 stays on the pointer kernels": (40, 64, 72, 8, "nf4-dq", 0.0, True),
    # K and N of several split units: S and dS come in fp32 slices that the TMA GEMMs sum and store rounded.
    "S and dS in slices, dropout, bias": (70, 200, 136, 8, "dense", 0.2, True),
}


@pytest.mark.parametrize("name", list(TMA_CASES))
def test_tma_gemm_matches_reference(monkeypatch, name):
    """The persistent TMA kernel (forward and dX GEMMs of 16-bit dense weights), opted in under the interpreter
    with LORA_OPS_TMA=1: same oracle and tolerances as the pointer kernels, and the launch counter shows
    which kernel ran."""
    m, k, n, r, weight, p, bias = TMA_CASES[name]
    monkeypatch.setenv("LORA_OPS_TMA", "1")
    case = make_case(m, k, n, r, torch.float16, weight, 64, bias, seed=7)
    before = L.LAUNCHES["lora_gemm_tma"]
    got, mask = run_layer(case, 1.5, p, monkeypatch)
    assert_layer_close(got, _want(oracle(case, 1.5, p, mask)), torch.float16, f"{name}: ")
    want_launches = 0 if weight != "dense" else 2
    assert L.LAUNCHES["lora_gemm_tma"] - before == want_launches


def test_tma_default_runs_only_on_the_shapes_it_measured_faster(monkeypatch):
    """LORA_OPS_TMA unset ("auto"): the TMA GEMM for M >= 2048, N*K >= 2^22 and M*N*K >= 2^35 (from 2048 x
    4096->4096 and 8192 x 4096->1024 on the H200), not for GQA's 4096->1024 below 8192 rows nor M = 1024; "1"
    wherever TMA applies, "0" never, anything else an error."""
    monkeypatch.setattr(L, "_INTERPRET", True)  # sm_90+ assumed; meta tensors: shapes and strides only

    def usable(m, k, n):
        a, w, c = (torch.empty(s, dtype=torch.bfloat16, device="meta") for s in ((m, k), (n, k), (m, n)))
        return L._tma_usable(a, w, c)

    monkeypatch.delenv("LORA_OPS_TMA", raising=False)
    assert usable(8192, 4096, 14336) and usable(8192, 14336, 4096) and usable(8192, 4096, 4096)
    assert usable(2048, 4096, 4096) and usable(2048, 4096, 14336)
    assert usable(8192, 4096, 1024) and usable(8192, 1024, 4096) and usable(16384, 4096, 1024)
    assert not usable(2048, 4096, 1024) and not usable(4096, 4096, 1024) and not usable(1024, 4096, 4096)
    assert not usable(65536, 1024, 1024) and not usable(1024, 14336, 4096)
    monkeypatch.setenv("LORA_OPS_TMA", "auto")
    assert usable(2048, 4096, 4096) and not usable(2048, 4096, 1024)
    monkeypatch.setenv("LORA_OPS_TMA", "1")
    assert usable(8192, 4096, 1024) and usable(64, 64, 64)
    monkeypatch.setenv("LORA_OPS_TMA", "0")
    assert not usable(8192, 4096, 14336)
    monkeypatch.setenv("LORA_OPS_TMA", "yes")
    with pytest.raises(ValueError, match="LORA_OPS_TMA='yes'"):
        usable(8192, 4096, 14336)


def test_tma_tile_knob_sets_the_large_tile_and_names_bad_specs():
    """LORA_OPS_TMA_TILE ("BMxBNxBK/warps/stages") replaces the large TMA config, keeps the small one, and a
    malformed or impossible tile (BLOCK_M under 128 included: the C++ path tells the large tile by it) is refused
    with the variable's name and the expected form."""
    got = LT._tma_tile("256x128x64/8/3")
    assert got[0] == (128, dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), 8, 3)
    assert got[1:] == LT._TMA_CONFIGS[1:]
    for bad in ("256x128/8/3", "256x128x64", "96x128x64/8/3", "64x256x64/8/3", "128x128x64/2/3", "128x128x64/8/0",
                "axbxc/8/3"):
        with pytest.raises(ValueError, match=r"LORA_OPS_TMA_TILE=.*(BMxBNxBK|BM >= 128)"):
            LT._tma_tile(bad)


def test_base_mm_setting_names_the_gemms_it_covers():
    """LORA_OPS_BASE_MM: 1 / both the forward and dX GEMMs, fwd or dx one of them, 0 or unset neither; anything
    else is refused with the accepted values."""
    for v, want in (("", 0), ("0", 0), ("1", 3), ("both", 3), ("fwd", L._BASE_MM_FWD), (" DX ", L._BASE_MM_DX)):
        assert L._base_mm_setting(v) == want, v
    with pytest.raises(ValueError, match="LORA_OPS_BASE_MM='2'.*fwd or dx"):
        L._base_mm_setting("2")


def test_fewest_programs_keep_the_wave_count():
    """LORA_OPS_SIDE_DA narrows the dX GEMM to the fewest persistent programs that take as many waves of tiles as
    one program per SM: q/k/v's dX at 8192 rows (1024 tiles) and 2048 rows (256) on 132 SMs take 128, an exact
    multiple keeps every SM, fewer tiles than SMs keep one program per tile."""
    for tiles, sms, want in ((1024, 132, 128), (256, 132, 128), (1536, 132, 128), (896, 132, 128),
                             (264, 132, 132), (100, 132, 100), (133, 132, 67), (1, 132, 1)):
        got = L._fewest_programs(tiles, sms)
        assert got == want, (tiles, sms, got)
        assert -(-tiles // got) == -(-tiles // min(sms, tiles)), (tiles, sms)


def test_tma_gemm_skipped_when_strides_break_its_rules(monkeypatch):
    """N = 57: y's rows are 114 bytes, not a multiple of 16, so neither GEMM can use TMA (dY has that row
    stride too); fp32 never does (TMA path is 16-bit only). Both fall back to the pointer kernels, correctly."""
    monkeypatch.setenv("LORA_OPS_TMA", "1")
    for dtype, n in ((torch.float16, 57), (torch.float32, 64)):
        case = make_case(33, 64, n, 4, dtype, "dense", 64, True, seed=8)
        before = L.LAUNCHES["lora_gemm_tma"]
        got, mask = run_layer(case, 1.5, 0.0, monkeypatch)
        assert_layer_close(got, _want(oracle(case, 1.5, 0.0, mask)), dtype, f"{dtype} N={n}: ")
        assert L.LAUNCHES["lora_gemm_tma"] == before


_TMA_PIPELINE_PROBE = r"""
import json, os, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lora_ops.triton_kernels import lora as L
from lora_ops.triton_kernels import lora_kernels as LK
out = {}
for trans, seg in ((True, False), (False, False), (False, True)):
    blocks, warps, stages = L._TMA_CONFIGS[0][1], L._TMA_CONFIGS[0][2], L._TMA_CONFIGS[0][3]
    bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
    consts = dict(TRANS_W=trans, HAS_BIAS=trans, HAS_DROPOUT=not trans, WRITE_L=True, GROUPED=trans, SEG_A=seg,
                  R_CHUNKS=1, R=16, BLOCK_R=L._TMA_BLOCK_R,
                  NUM_SMS=132, FLATTEN=os.environ.get("LORA_OPS_TMA_FLATTEN", "0") not in ("", "0"),
                  stride_lr=1, stride_bias=1, **blocks)
    consts["stride_rr" if trans else "stride_rn"] = 1
    sig = {}
    for name in LK._lora_gemm_tma_kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_desc"):
            shape = {"w_desc": [bn, bk] if trans else [bk, bn], "c_desc": [bm, bn]}.get(name, [bm, bk])
            sig[name] = f"tensordesc<bf16[{shape[0]}, {shape[1]}]>"
        elif name.endswith("_ptr"):
            sig[name] = "*i64" if name == "seed_ptr" else "*bf16"
        else:
            sig[name] = "fp32" if name in ("scaling", "drop_scale") else "i32"
    ck = triton.compile(ASTSource(LK._lora_gemm_tma_kernel, sig, consts), target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=warps, num_stages=stages))
    out["fwd" if trans else "dx_segments" if seg else "dx"] = dict(
        tma_copies=ck.asm["ttgir"].count("async_tma_copy_global_to_local"), shared=ck.metadata.shared)
print(json.dumps(out))
"""


def test_tma_gemm_mainloop_is_pipelined_for_sm90():
    """The TMA GEMM's K-loop must be software-pipelined: with the default 3 stages (tile loop not flattened) its
    TTGIR holds the prologue's and the loop's TMA copies of A and W (>= 6); shared memory must also fit an H200 SM
    (227 KB). The dX GEMM on a group's dY segments (SEG_A) has one K loop per member (four), each pipelined: >= 24
    copies. (A flattened tile loop counts 2 copies in 3-stage buffers, its prologue predicated inside the loop:
    docs/PERF_NOTES.md item 42.)"""
    res = run_sm90_probe(_TMA_PIPELINE_PROBE)
    assert sorted(res) == ["dx", "dx_segments", "fwd"]
    for name, r in res.items():
        least = 24 if name == "dx_segments" else 6
        assert r["tma_copies"] >= least, f"{name}: {r['tma_copies']} TMA copies in the TTGIR: mainloop not pipelined"
        assert r["shared"] <= 232448, f"{name}: {r['shared']} B of shared memory exceeds an H200 SM"


_WS_PROBE = r"""
import json, re, subprocess, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from lora_ops.triton_kernels import lora as L
from lora_ops.triton_kernels import lora_tuning as LT
from lora_ops.triton_kernels.lora_ws_kernel import _lora_gemm_ws_kernel as K
blocks, warps, _ = LT.WS_CONFIG
bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
ptxas = get_ptxas(90).path
out = {}
# (name, TRANS_W, HAS_BIAS, GROUPED, SEG_A, rank): the uses the launchers make of it.
for name, trans, bias, grouped, seg, r in (("fwd", True, True, False, False, 16),
                                           ("fwd_group", True, False, True, False, 16),
                                           ("fwd_r96", True, True, False, False, 96),
                                           ("dx", False, False, False, False, 16),
                                           ("dx_segments", False, False, False, True, 48)):
    dt = torch.bfloat16
    a, c = torch.empty(1024, 512, dtype=dt), torch.empty(1024, 768, dtype=dt)
    w = torch.empty((768, 512) if trans else (512, 768), dtype=dt)
    lt, rt = torch.empty(1024, r, dtype=dt), torch.empty((768, r) if trans else (r, 768), dtype=dt)
    a_blk, w_blk = (bm, bk), ((bn, bk) if trans else (bk, bn))
    descs = [L._gluon_desc(t, b) for t, b in ((a, a_blk), (w, w_blk), (c, (bm, bn)), (lt, a_blk), (rt, w_blk))]
    sig = {n: mangle_type(d) for n, d in zip(K.arg_names[:5], descs)}
    sig.update(bias_ptr="*bf16", stride_bias="i32", M="i32", N="i32", K="i32", scaling="fp32", rb="i32",
               nb1="i32", nb2="i32", nb3="i32", a2_desc=sig["a_desc"], a3_desc=sig["a_desc"], a4_desc=sig["a_desc"])
    consts = dict(blocks, TRANS_W=trans, HAS_BIAS=bias, GROUPED=grouped, SEG_A=seg,
                  SEED_STEPS=triton.cdiv(r, bk))
    sig.update({n: "constexpr" for n in consts})
    ck = triton.compile(GluonASTSource(K, sig, consts), target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=warps, maxnreg=LT.WS_MAXNREG))
    ptx = ck.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    rep = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"], capture_output=True,
                         text=True).stderr
    out[name] = dict(shared=ck.metadata.shared, warps=ck.metadata.num_warps,
                     spill=sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", rep)),
                     setmaxnreg=sorted({int(v) for v in
                                        re.findall(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+(\d+)", ptx)}),
                     wgmma=ptx.count("wgmma.mma_async"), tma_loads=ptx.count("cp.async.bulk.tensor"),
                     scratch=getattr(ck.metadata, "global_scratch_size", 0),
                     tensordesc_meta=[dict(m) for m in ck.metadata.tensordesc_meta])
print(json.dumps(out))
"""


def test_ws_gemm_compiles_for_sm90():
    """The Gluon GEMM (lora_ws_kernel.py) in each use the launchers make of it, compiled for sm_90 on the CPU:
    warp-specialized (the consumers raised to 240 registers, the producer to 40: setmaxnreg), 12 warps, shared
    memory within an H100 / H200 SM (227 KB), no spills, no global scratch (the C++ launch path sets none), one
    MMA site per seed step plus the K loop's (4 wgmma each at BLOCK_K = 64), and host metadata for every TMA
    descriptor (the C++ path encodes them from it)."""
    res = run_sm90_probe(_WS_PROBE)
    assert sorted(res) == ["dx", "dx_segments", "fwd", "fwd_group", "fwd_r96"]
    for name, r in res.items():
        assert r["warps"] == 12, (name, r)
        assert r["shared"] <= 232448, (name, r)
        assert r["spill"] == 0, (name, r)
        assert 240 in r["setmaxnreg"] and 40 in r["setmaxnreg"], (name, r)
        assert r["scratch"] == 0, (name, r)
        assert len(r["tensordesc_meta"]) == 8, (name, r)
        seed_steps = 2 if name == "fwd_r96" else 1
        assert r["wgmma"] == 4 * (seed_steps + 1), (name, r)
        assert r["tma_loads"] >= 4, (name, r)


@pytest.mark.parametrize("weight,dtype,p,tma", [("nf4-dq", F32, 0.2, "0"), ("nf4", F16, 0.1, "1")])
def test_nf4_chunked_temporary_matches_reference(monkeypatch, weight, dtype, p, tma):
    """Past NF4_CHUNK_BYTES the temporary is made chunk by chunk: W's rows for the forward GEMM (y's columns),
    W's columns for the dX GEMM (dX's columns, dropout indexed by x's full rows), pointer and TMA GEMMs alike.
    Every output matches the oracle and the chunks tile W exactly."""
    calls = []
    real_launch = L._dq._launch

    def spy(*args, **kwargs):
        calls.append((kwargs.get("row_range"), kwargs.get("col_range")))
        return real_launch(*args, **kwargs)

    monkeypatch.setenv("LORA_OPS_TMA", tma)
    monkeypatch.setattr(L, "_dequant_first", lambda x: True)
    monkeypatch.setattr(L, "NF4_CHUNK_BYTES", 40 * 256 * 4)
    monkeypatch.setattr(L, "NF4_CHUNK_MIN_M", 0)
    monkeypatch.setattr(L._dq, "_launch", spy)
    case = make_case(37, 256, 136, 8, dtype, weight, 64, bias=True, seed=21)
    got, mask = run_layer(case, 1.5, p, monkeypatch)
    assert_layer_close(got, _want(oracle(case, 1.5, p, mask)), dtype, "NF4 chunked temporary: ")
    rows = [r for r, c in calls if r is not None]
    cols = [c for r, c in calls if c is not None]
    assert len(rows) + len(cols) == len(calls), calls
    assert rows[0][0] == 0 and rows[-1][1] == 136 and all(a[1] == b[0] for a, b in zip(rows, rows[1:])), rows
    assert cols[0][0] == 0 and cols[-1][1] == 256 and all(a[1] == b[0] for a, b in zip(cols, cols[1:])), cols
    assert len(rows) > 1 and len(cols) > 1


@pytest.mark.parametrize("weight,dtype,p,tma", [("dense", F16, 0.1, "1"), ("nf4-dq", F32, 0.2, "0")])
def test_split_sum_before_a_one_slice_gemm_matches_reference(monkeypatch, weight, dtype, p, tma):
    """Up to _SPLIT_SUM_MAX_M rows the S and dS passes split even where the GEMM after them takes one slice (the
    TMA GEMM; a chunked NF4 weight): a torch reduction sums the fp32 slices first. Every output matches the
    oracle, and both passes did split."""
    seen = []
    real = L._inner_splits

    def spy(m, cols, r_chunks, device, max_m=None):
        out = real(m, cols, r_chunks, device, max_m)
        seen.append((max_m, out[0]))
        return out

    monkeypatch.setenv("LORA_OPS_TMA", tma)
    monkeypatch.setattr(L, "_SPLIT_SUM_MAX_M", 1 << 20)
    monkeypatch.setattr(L, "_inner_splits", spy)
    if weight != "dense":
        monkeypatch.setattr(L, "_dequant_first", lambda x: True)
        monkeypatch.setattr(L, "NF4_CHUNK_BYTES", 40 * 256 * 4)
        monkeypatch.setattr(L, "NF4_CHUNK_MIN_M", 0)
    case = make_case(37, 256, 136, 8, dtype, weight, 64, bias=True, seed=23)
    got, mask = run_layer(case, 1.5, p, monkeypatch)
    assert_layer_close(got, _want(oracle(case, 1.5, p, mask)), dtype, "split sum: ")
    assert [s for mm, s in seen if mm == 1 << 20 and s > 1], f"no pass split into summed slices: {seen}"


def test_nf4_chunks_plan():
    """The chunk plan: None while the dense copy fits, near-equal chunks on 8-element (and, for rows, block)
    boundaries within the bound otherwise, and no column chunks when blocks straddle rows."""
    bound, elt = L.NF4_CHUNK_BYTES, 2
    assert L._nf4_chunks(4096, 4096, 64, elt, "rows") is None  # exactly 32 MiB
    rows = L._nf4_chunks(14336, 4096, 64, elt, "rows")
    cols = L._nf4_chunks(14336, 4096, 64, elt, "cols")
    assert rows == [(i * 3584, (i + 1) * 3584) for i in range(4)], rows
    assert cols == [(i * 1024, (i + 1) * 1024) for i in range(4)], cols
    for plan, line in ((rows, 4096), (cols, 14336)):
        assert all((hi - lo) * line * elt <= bound for lo, hi in plan)
    assert L._nf4_chunks(14336, 4100, 64, elt, "cols") is None  # 4100 % 64: blocks straddle rows
    odd = L._nf4_chunks(14336, 4100, 64, elt, "rows")
    assert all(lo * 4100 % 64 == 0 and lo % 8 == 0 for lo, _ in odd) and odd[-1][1] == 14336


def test_nf4_temporary_path_matches_reference(monkeypatch):
    """The path the launchers take on CUDA from NF4_DEQUANT_MIN_M rows (the NF4 weight dequantized once into a
    temporary by the Triton dequantize, then the dense kernels), forced here under the interpreter: every output
    matches the oracle, and the dequantize ran once for the forward and once for the backward's dX."""
    calls = []
    real_launch = L._dq._launch

    def spy(*args, **kwargs):
        calls.append(args[6:8])
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(L, "_dequant_first", lambda x: True)
    monkeypatch.setattr(L._dq, "_launch", spy)
    case = make_case(37, 129, 70, 8, F32, "nf4-dq", 64, bias=True, seed=12)
    got, mask = run_layer(case, 1.5, 0.2, monkeypatch)
    assert_layer_close(got, _want(oracle(case, 1.5, 0.2, mask)), F32, "NF4 temporary: ")
    assert calls == [(70, 129), (70, 129)], calls


_SETTINGS = {"LORA_OPS_NF4_CHUNK_MIB": "NF4_CHUNK_BYTES >> 20", "LORA_OPS_SPLIT_MAX_M": "_SPLIT_MAX_M",
             "LORA_OPS_SPLIT_SUM_MAX_M": "_SPLIT_SUM_MAX_M", "LORA_OPS_ATOMIC_DB_MAX_M": "_ATOMIC_DB_MAX_M",
             "LORA_OPS_NF4_CHUNK_MIN_M": "NF4_CHUNK_MIN_M", "LORA_OPS_DS_SPLITS": "_DS_SPLITS"}


@pytest.mark.parametrize("name,value,ok", [("LORA_OPS_NF4_CHUNK_MIB", "8", True), ("LORA_OPS_NF4_CHUNK_MIB", "0", False),
                                           ("LORA_OPS_SPLIT_MAX_M", "0", True), ("LORA_OPS_SPLIT_MAX_M", "x", False),
                                           ("LORA_OPS_SPLIT_SUM_MAX_M", "2048", True),
                                           ("LORA_OPS_SPLIT_SUM_MAX_M", "-1", False),
                                           ("LORA_OPS_ATOMIC_DB_MAX_M", "4096", True),
                                           ("LORA_OPS_NF4_CHUNK_MIN_M", "0", True),
                                           ("LORA_OPS_NF4_CHUNK_MIN_M", "1.5", False),
                                           ("LORA_OPS_DS_SPLITS", "1", True), ("LORA_OPS_DS_SPLITS", "0", False)])
def test_launcher_settings_from_the_environment(name, value, ok):
    """The launcher settings come from the environment at import; a bad value names itself."""
    import subprocess
    import sys
    code = f"from lora_ops.triton_kernels import lora as L; print(L.{_SETTINGS[name]})"
    env = dict(os.environ, **{name: value})
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert int(proc.stdout.split()[-1]) == int(value)
    else:
        assert proc.returncode != 0 and f"{name}={value!r} must be an integer" in proc.stderr
