"""Property-based tests (hypothesis): random shapes, dtypes, scalings and dropout against float64 math, the
Triton kernels (interpreter) against the same oracle, and NF4 invariants.

Budgets. Every property exists twice: ``test_<name>`` with a small CI budget (the whole file runs in well
under two minutes on two shared cores) and ``test_<name>_slow`` marked ``slow`` with the ``slow`` profile's
budget (500 examples for the reference/NF4 properties, fewer for those that run Triton's interpreter, about
0.2-0.5 s per example). The slow ones are skipped unless selected:

    pytest tests/test_properties.py -m slow --hypothesis-show-statistics     # the slow budgets
    HYPOTHESIS_PROFILE=slow pytest tests/test_properties.py                  # both, the CI ones at slow size

Tensors are drawn from a hypothesis-chosen seed (hypothesis picks shapes, dtypes, scalars and seeds; torch
fills the tensors), except where exact values matter (NF4 blocks for monotonicity), which hypothesis draws
element by element. Comparisons use the one tolerance table (tests/helpers.py); a mutation control for each
comparison shape lives at the end of the file.

Conditioning: the dtype implementations round intermediates (S and dS to x's dtype, and the unfused reference
also x W^T and the LoRA term). When an output is a cancelling sum of such intermediates, its relative error
grows with the cancellation and no per-dtype tolerance bounds it (hypothesis found one: fp16 dA = dS^T x with
N = K = 1, whose every entry is the same 282-term dot product that happened to cancel to 1/13 of its terms'
size). So the lora properties ``assume`` kappa <= 2 for every output, kappa = ||root-sum-square size of the
rounded intermediates|| / ||output|| (see ``oracle64``); random data almost always passes, and hypothesis'
statistics (events) report how often it did not.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, event, example, given, note, settings, target
from hypothesis import strategies as st

from lora_ops import NF4Weight, _backend, quantize_nf4
from lora_ops import nf4 as N
from lora_ops.reference import dropout_mask as reference_mask

from helpers import REL_TOL, assert_rel_close, assert_same_nonfinite, kernel_mask, rel_error, run_lora

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

_COMMON = dict(deadline=None, print_blob=True,
               # The autouse skip fixture below is function-scoped but stateless per example.
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=20, **_COMMON)
settings.register_profile("slow", max_examples=500, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "slow"):
    raise ValueError(f"HYPOTHESIS_PROFILE={PROFILE!r}: this suite defines the profiles 'ci' and 'slow'")

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # NaN/Inf arithmetic inside numpy (interpreter)
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")]


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request):
    if request.node.get_closest_marker("slow") is None:
        return
    if PROFILE != "slow" and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("long property run: select it with -m slow (or HYPOTHESIS_PROFILE=slow)")


def property_test(ci: int, slow: int, examples=(), **strategies):
    """Decorate a property body once; get (CI test, slow-marked test) sharing its strategies. ``examples``: dicts
    of arguments always tried first (failures hypothesis found once, kept as regressions)."""
    def make(fn):
        def build(profile, n):
            test = given(**strategies)(fn)
            for ex in examples:
                test = example(**ex)(test)
            return settings(settings.get_profile(profile), max_examples=n)(test)
        return build(PROFILE, slow if PROFILE == "slow" else ci), pytest.mark.slow(build("slow", slow))
    return make


# ---------------------------------------------------------------------------------------- the lora oracle

def _rss(a, b):
    """sqrt(sum_k (a_ik b_kj)^2): the size of the noise that independent relative roundings of a's entries leave
    in a @ b (rounding errors add like random signs, so this, not |a| @ |b|, is their typical scale)."""
    return ((a * a) @ (b * b)).sqrt()


def oracle64(x, w, a, b, scaling, bias, mask, p, dy):
    """float64 autograd of y = x W^T + s (x*mask/(1-p)) A^T B^T + bias: ((y, dx, dA, dB, dbias), kappa).

    kappa[name] = ||noise scale|| / ||output||: the noise scale is the root-sum-square size of the intermediates
    that a dtype implementation rounds (x W^T, S and the LoRA term for y; dY W and dS for dX; dS for dA; S for
    dB). An output that is a cancelling sum of large rounded intermediates has kappa >> 1, and no per-dtype
    tolerance bounds its relative error."""
    x, a, b = (t.detach().double().requires_grad_(True) for t in (x, a, b))
    bias = None if bias is None else bias.detach().double().requires_grad_(True)
    w, dy = w.double(), dy.double()
    keep = None if mask is None else mask.double() / (1.0 - p)
    xd = x if keep is None else x * keep
    y = x @ w.t() + scaling * (xd @ a.t()) @ b.t() + (0 if bias is None else bias)
    y.backward(dy)
    outs = (y.detach(), x.grad, a.grad, b.grad, None if bias is None else bias.grad)
    with torch.no_grad():
        xd, a, b = xd.detach(), a.detach(), b.detach()
        s_ = xd @ a.t()
        # S is rounded; with dropout so is xd before it, and then S's error scale includes its own cancellation.
        s_noise = s_.abs() if keep is None else (s_ ** 2 + _rss(xd, a.t()) ** 2).sqrt()
        ds = scaling * (dy @ b)
        lora_y = scaling * s_ @ b.t()
        noise = {"y": ((x.detach() @ w.t()) ** 2 + lora_y ** 2 + (scaling * _rss(s_noise, b.t())) ** 2).sqrt(),
                 "dx": ((dy @ w) ** 2 + (_rss(ds, a) * (1.0 if keep is None else keep)) ** 2).sqrt(),
                 "dA": _rss(ds.t(), xd), "dB": abs(scaling) * _rss(dy.t(), s_noise)}
        kappa = {}
        for name, out in zip(("y", "dx", "dA", "dB"), outs):
            num, den = float(noise[name].norm()), float(out.norm())
            kappa[name] = num / den if den > 0 else (0.0 if num == 0 else math.inf)
    return outs, kappa


# Outputs with kappa above this are cancelling sums (see oracle64); the tolerance table is for the others.
KAPPA_MAX = 2.0


def not_block_multiple(hi):
    """A dimension in 1..hi that is not a multiple of 16 (so never of any tile or NF4 block)."""
    return st.integers(1, hi).filter(lambda v: v % 16 != 0)


def scalings():
    """0, or +-[2^-6, 4] (lora_alpha / r in practice). The kernels take scaling as an fp32 scalar, so a float64
    like 1e-237 would become 0 there and the float64 oracle's tiny-but-nonzero LoRA term (or its Inf * 1e-237)
    could not be matched."""
    return st.one_of(st.just(0.0), st.tuples(st.sampled_from([-1.0, 1.0]), st.floats(2.0 ** -6, 4.0))
                     .map(lambda t: t[0] * t[1]))


@st.composite
def lora_cases(draw, max_rows, max_k, max_n, max_r, dtypes, nf4=True):
    batch = draw(st.sampled_from([1, 1, 2, 3]))
    rows = draw(st.integers(0, max_rows // batch)) * batch
    case = dict(batch=batch, rows=rows, k=draw(not_block_multiple(max_k)), n=draw(not_block_multiple(max_n)),
                r=draw(st.integers(1, max_r)), dtype=draw(st.sampled_from(dtypes)),
                weight=draw(st.sampled_from(["dense", "nf4", "nf4_dq"] if nf4 else ["dense"])),
                blocksize=draw(st.sampled_from([32, 64, 128])),
                scaling=draw(scalings()),
                p=draw(st.one_of(st.just(0.0), st.floats(0.0, 0.9))),
                bias=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31 - 1)))
    return case


def make_tensors(c):
    g = torch.Generator().manual_seed(c["seed"])
    rows, k, n, r, dt = c["rows"], c["k"], c["n"], c["r"], c["dtype"]
    x = torch.randn(rows, k, generator=g).to(dt)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dt)
    a = (torch.randn(r, k, generator=g) / k ** 0.5).to(dt)
    b = torch.randn(n, r, generator=g).to(dt)
    bias = torch.randn(n, generator=g).to(dt) if c["bias"] else None
    dy = torch.randn(rows, n, generator=g).to(dt)
    if c["weight"] == "dense":
        wt, wd = w, w
    else:
        wt = quantize_nf4(w, c["blocksize"], double_quant=c["weight"] == "nf4_dq")
        wd = wt.dequantize(dt)  # the kernels dequantize to x's dtype: same-computation comparison
    return x, wt, wd, a, b, bias, dy


def check_lora_against_float64(c, backend):
    note(repr(c))
    event(f"{c['dtype']} {c['weight']} p>0={c['p'] > 0} bias={c['bias']}")
    bucket = lambda v: "0" if v == 0 else "1-16" if v <= 16 else "17-128" if v <= 128 else ">128"  # noqa: E731
    event(f"M {bucket(c['rows'])}, K {bucket(c['k'])}, N {bucket(c['n'])}, r {bucket(c['r'])}")
    x, wt, wd, a, b, bias, dy = make_tensors(c)
    shape = (c["batch"], c["rows"] // c["batch"], c["k"]) if c["batch"] > 1 else (c["rows"], c["k"])
    got = run_lora(backend, x.reshape(shape), wt, a, b, c["scaling"], bias, c["p"],
                   dy.reshape(*shape[:-1], c["n"]), c["seed"])
    mask = kernel_mask(backend, c["seed"], c["rows"], c["k"], c["p"])
    want, kappa = oracle64(x, wd, a, b, c["scaling"], bias, mask, c["p"], dy)
    worst_kappa = max(kappa.values())
    event(f"conditioning: max kappa {'<= 1' if worst_kappa <= 1 else '<= 2' if worst_kappa <= KAPPA_MAX else '> 2'}")
    if worst_kappa > KAPPA_MAX:
        event(f"ill-conditioned {max(kappa, key=kappa.get)}: skipped")
    assume(worst_kappa <= KAPPA_MAX)
    # fp16 results below its normal range (6.1e-5) keep fewer bits than the table assumes: an output whose RMS is
    # that small (a one-element dB of 5e-5, say) is an underflow question, not a rounding one.
    floor = torch.finfo(c["dtype"]).tiny * 64
    low = [n for n, t in zip(("y", "dx", "dA", "dB", "dbias"), want)
           if t is not None and t.numel() and 0 < float(t.norm()) / math.sqrt(t.numel()) < floor]
    if low:
        event(f"output near {c['dtype']} underflow: skipped")
    assume(not low)
    tol = REL_TOL[c["dtype"]]
    worst = 0.0
    for name, g, t in zip(("y", "dx", "dA", "dB", "dbias"), got, want):
        if t is None:
            continue
        g = g.reshape(t.shape)
        worst = max(worst, rel_error(g, t) / tol)
        assert_rel_close(g, t, c["dtype"], f"{backend} {name}")
    target(worst, label="max relative error / tolerance")


# ---------------------------------------------------------------------------------------- lora properties

def _reference_vs_float64(case):
    """lora_linear on the reference path = float64 math (same weights, same mask) within the dtype's tolerance:
    M 0..300 (also as (b, M/b, K) batches), K and N 1..300 off every block multiple, r 1..64, fp32/fp16/bf16,
    dense or NF4 (single or double quantized, blocksizes 32/64/128), scaling in [-4, 4], dropout 0..0.9."""
    check_lora_against_float64(case, "reference")


test_reference_matches_float64, test_reference_matches_float64_slow = property_test(
    ci=30, slow=500, case=lora_cases(300, 300, 300, 64, [F32, F16, BF16]))(_reference_vs_float64)


def _triton_vs_float64(case):
    """The Triton kernels (interpreter, LORA_OPS_BACKEND=triton) = float64 math within the dtype's tolerance, on
    small shapes (the interpreter runs each program in Python): fp32/fp16 (the interpreter mishandles bf16)."""
    import lora_ops.triton_kernels.lora as L
    before = sum(L.LAUNCHES.values())
    check_lora_against_float64(case, "triton")
    assert case["rows"] == 0 or sum(L.LAUNCHES.values()) > before, "the Triton kernels did not run"


test_triton_matches_float64, test_triton_matches_float64_slow = property_test(
    ci=10, slow=120, case=lora_cases(40, 90, 50, 20, [F32, F16]))(_triton_vs_float64)


@st.composite
def nonfinite_cases(draw):
    c = draw(lora_cases(24, 70, 24, 6, [F32], nf4=True))
    assume(c["rows"] > 0)
    spots = draw(st.lists(st.tuples(st.sampled_from(["x", "dy", "w", "a", "b"]), st.integers(0, 10 ** 6),
                                    st.integers(0, 10 ** 6), st.sampled_from([math.nan, math.inf, -math.inf])),
                          min_size=1, max_size=5))
    return c, spots


def _nonfinite_propagation(args):
    """NaN/+-Inf at random places of x, dY, W (dense), A or B: the Triton kernels put NaN and +-Inf exactly where
    the reference does, and both where float64 math does; finite entries agree within the fp32 tolerance."""
    c, spots = args
    note(repr(args))
    x, wt, wd, a, b, bias, dy = make_tensors(c)
    named = {"x": x, "dy": dy, "w": wt if c["weight"] == "dense" else None, "a": a, "b": b}
    for name, i, j, v in spots:
        t = named[name]
        if t is None:
            continue
        t[i % t.shape[0], j % t.shape[1]] = v
        event(f"non-finite in {name}")
    got = {bk: run_lora(bk, x, wt, a, b, c["scaling"], bias, c["p"], dy, c["seed"]) for bk in ("reference", "triton")}
    mask = kernel_mask("reference", c["seed"], c["rows"], c["k"], c["p"])
    want, _ = oracle64(x, wd, a, b, c["scaling"], bias, mask, c["p"], dy)
    for name, r_, t_, o_ in zip(("y", "dx", "dA", "dB", "dbias"), got["reference"], got["triton"], want):
        if o_ is None:
            continue
        for label, u in (("reference", r_), ("triton", t_)):
            assert_same_nonfinite(u, o_, f"{label} {name}")


test_nonfinite_propagation, test_nonfinite_propagation_slow = property_test(
    ci=6, slow=60, args=nonfinite_cases())(_nonfinite_propagation)


def _kernel_mask_equals_reference_hash(seed, p, rows, cols):
    """The Triton dropout mask (interpreter) equals the reference hash for any 62-bit seed and p in (0, 1)."""
    with _backend.use_backend("triton"):
        from lora_ops.triton_kernels.lora import dropout_mask as triton_mask
        got = triton_mask(seed, rows, cols, p, "cpu")
    assert torch.equal(got, reference_mask(seed, rows, cols, p, "cpu"))


test_kernel_mask_equals_reference_hash, test_kernel_mask_equals_reference_hash_slow = property_test(
    ci=10, slow=200, seed=st.integers(0, 2 ** 62 - 1), p=st.floats(1e-6, 0.999), rows=st.integers(1, 40),
    cols=st.integers(1, 90))(_kernel_mask_equals_reference_hash)


# ---------------------------------------------------------------------------------------- NF4 properties

DTYPE_EXP = {F32: 60, BF16: 60, F16: 10}  # |values| in [2^-e, 2^e]: normal numbers of the dtype, with margin


@st.composite
def nf4_weights(draw, min_exp_margin=0):
    """(weight, blocksize): a seeded tensor of log-uniform magnitudes over the dtype's normal range (random signs,
    some exact zeros, some whole zero blocks when asked), shapes off every block multiple."""
    dtype = draw(st.sampled_from([F32, F16, BF16]))
    rows, cols = draw(st.integers(1, 9)), draw(not_block_multiple(300))
    blocksize = draw(st.sampled_from([32, 64, 128, 256]))
    e = DTYPE_EXP[dtype] - min_exp_margin
    lo = draw(st.integers(-e, e))
    hi = draw(st.integers(lo, e))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    mag = torch.pow(2.0, torch.empty(rows, cols).uniform_(lo, hi, generator=g))
    sign = torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0)
    zero = torch.rand(rows, cols, generator=g) < draw(st.sampled_from([0.0, 0.05, 0.5]))
    w = torch.where(zero, 0.0, sign * mag).to(dtype)
    return w, blocksize


def _tensors_equal(a: NF4Weight, b: NF4Weight):
    return all((u is None and v is None) or (u is not None and v is not None and u.dtype == v.dtype
                                             and torch.equal(u, v)) for u, v in zip(a.tensors(), b.tensors()))


def _idempotent_single(wb):
    """Without double quantization quantize(dequantize(q)) has q's bytes and absmax, in every dtype: each value
    dequantizes to code * absmax (the absmax element to exactly +-absmax), which re-scales to within a rounding
    of its code value, far from every bound."""
    w, bs = wb
    q = quantize_nf4(w, bs, double_quant=False)
    q2 = quantize_nf4(q.dequantize(), bs, double_quant=False)
    assert _tensors_equal(q, q2), "quantize(dequantize(q)) changed the bytes or absmax"


test_nf4_idempotent, test_nf4_idempotent_slow = property_test(ci=40, slow=500, wb=nf4_weights())(_idempotent_single)


def _idempotent_double(wb):
    """With double quantization every element's 4-bit code is idempotent wherever every reconstructed absmax is
    > 0 (an all-zero block rebuilds a tiny absmax of either sign; a negative one flips its codes 0 -> 15, see
    test_hardening). Not the bytes, documented exceptions: (1) the nested state, whose offset becomes the mean of
    the reconstructed absmax; (2) the pad nibble of an odd count whose last block is all zero: it holds code 0
    there (0 * inf is NaN), while the dequantized block is -a' != 0, which pads with the code of 0.0, 7."""
    w, bs = wb
    q = quantize_nf4(w, bs, double_quant=True)
    rebuilt = N.reference_absmax(q.absmax, q.nested_absmax, q.nested_code, q.offset)
    event("a reconstructed absmax <= 0" if bool((rebuilt <= 0).any()) else "all reconstructed absmax > 0")
    assume(bool((rebuilt > 0).all()))
    q2 = quantize_nf4(q.dequantize(), bs, double_quant=True)
    n = w.numel()
    assert torch.equal(_codes(q)[:n], _codes(q2)[:n]), "double-quantized codes changed under quantize(dequantize(q))"
    last_zero = not bool(w.reshape(-1)[(n - 1) // bs * bs:].any())
    if n % 2 and last_zero:
        event("odd count, all-zero last block: pad nibble 0 -> 7")
        assert int(_codes(q)[n]) == 0 and int(_codes(q2)[n]) == 7
    else:
        assert torch.equal(q.data, q2.data), "the bytes (pad nibble included) changed"


# Found by the slow run: 33 elements, blocksize 32, the one-element last block is 0.0 (pad nibble 0 -> 7).
_PAD_CASE = torch.tensor([[-1., -1, -1, -1, 0, 0, 1, 1, -1, 1, -1], [0, -1, 0, 0, -1, -1, 0, 1, 0, 0, 0],
                          [-1, 0, -1, -1, -1, 1, 0, 0, 1, 1, 0]])

test_nf4_idempotent_double_quant, test_nf4_idempotent_double_quant_slow = property_test(
    ci=40, slow=500, examples=[dict(wb=(_PAD_CASE, 32))], wb=nf4_weights())(_idempotent_double)


@st.composite
def nf4_blocks(draw):
    """Hypothesis-drawn values (ties, +-0, subnormals, huge), up to two blocks and a partial one."""
    dtype = draw(st.sampled_from([F32, F16, BF16]))
    bs = draw(st.sampled_from([32, 64]))
    width = 16 if dtype == F16 else 32
    vals = draw(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=width), min_size=1,
                         max_size=2 * bs + 7))
    w = torch.tensor(vals, dtype=torch.float32).to(dtype)
    assume(bool(torch.isfinite(w).all()))  # a float32 beyond bf16's range rounds to inf
    return w.reshape(1, -1), bs


def _monotone(wb):
    """Within a block the codes never decrease as the value increases (any finite values, any dtype)."""
    w, bs = wb
    codes = _codes(quantize_nf4(w, bs, double_quant=False))[: w.numel()]
    flat = w.reshape(-1).float()
    for start in range(0, flat.numel(), bs):
        v, c = flat[start:start + bs], codes[start:start + bs]
        order = torch.argsort(v, stable=True)
        sv, sc = v[order], c[order]
        assert bool((sc[1:] >= sc[:-1]).all()), f"codes not monotone in block at {start}: {sv.tolist()} {sc.tolist()}"
        same = sv[1:] == sv[:-1]
        assert bool((sc[1:][same] == sc[:-1][same]).all()), "equal values got different codes"


def _codes(q: NF4Weight) -> torch.Tensor:
    p = q.data.reshape(-1).long()
    return torch.stack((p >> 4, p & 15), 1).reshape(-1)


test_nf4_codes_monotone, test_nf4_codes_monotone_slow = property_test(ci=60, slow=500, wb=nf4_blocks())(_monotone)


def _scale_equivariant(wb, k, dq):
    """quantize(2^k w) has the same 4-bit bytes (and nested codes), absmax * 2^k (nested absmax and offset
    * 2^k with double quantization), whenever 2^k w is exact in w's dtype."""
    w, bs = wb
    w2 = w * (2.0 ** k)
    assume(bool(torch.isfinite(w2).all()) and torch.equal(w2 / (2.0 ** k), w))
    q, q2 = quantize_nf4(w, bs, double_quant=dq), quantize_nf4(w2, bs, double_quant=dq)
    assert torch.equal(q.data, q2.data), "packed codes changed under a power-of-two scale"
    if dq:
        assert torch.equal(q.absmax, q2.absmax), "nested codes changed"
        assert torch.equal(q.nested_absmax * 2.0 ** k, q2.nested_absmax)
        assert torch.equal(q.offset * 2.0 ** k, q2.offset)
    else:
        assert torch.equal(q.absmax * 2.0 ** k, q2.absmax)


test_nf4_scale_equivariance, test_nf4_scale_equivariance_slow = property_test(
    ci=40, slow=500, wb=nf4_weights(min_exp_margin=8), k=st.integers(-8, 8), dq=st.booleans())(_scale_equivariant)


def _state_dict_round_trip(wb, dq, prefix):
    """from_state_dict(state_dict(q, prefix), prefix) holds q's exact tensors, shape, dtype and blocksize."""
    w, bs = wb
    q = quantize_nf4(w, bs, double_quant=dq)
    back = NF4Weight.from_state_dict(q.state_dict(prefix), prefix)
    assert _tensors_equal(q, back) and (back.shape, back.dtype, back.blocksize) == (q.shape, q.dtype, q.blocksize)
    assert torch.equal(back.dequantize(), q.dequantize())


test_nf4_state_dict_round_trip, test_nf4_state_dict_round_trip_slow = property_test(
    ci=40, slow=500, wb=nf4_weights(), dq=st.booleans(),
    prefix=st.sampled_from(["", "m.", "model.layers.0.self_attn.q_proj."]))(_state_dict_round_trip)


def _matches_bitsandbytes_cpu(seed, rows, cols, bs, dtype, dq):
    """Packed codes, absmax (and offset, nested absmax) equal bitsandbytes-CPU's for random normal weights, at
    every element not within 2 fp32 ulps of an NF4 midpoint (ties: CUDA's golden data decides those, and
    bitsandbytes-CPU rounds them differently; a draw lands there about once per 10^7 elements)."""
    F = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 10.0 ** float(torch.empty(()).uniform_(-3, 3, generator=g)))
    w = w.to(dtype)
    ours = quantize_nf4(w, bs, double_quant=dq)
    q, qs = F.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=dq)
    n = w.numel()
    flat = w.reshape(-1).float()
    nb = -(-n // bs)
    absmax = torch.zeros(nb * bs)
    absmax[:n] = flat.abs()
    absmax = absmax.view(nb, bs).amax(1)
    scaled = flat * torch.reciprocal(absmax)[torch.arange(n) // bs]
    mids = torch.tensor(N.NF4_MIDPOINTS)
    ulp = torch.abs(torch.nextafter(mids, torch.tensor(2.0)) - mids)
    near = ((scaled[:, None] - mids[None, :]).abs() <= 2 * ulp[None, :]).any(1)
    event("an element within 2 ulps of a midpoint" if bool(near.any()) else "no near-tie element")
    mine, theirs = _codes(ours)[:n], _codes(NF4Weight(q, ours.absmax, ours.shape, ours.dtype, bs))[:n]
    assert torch.equal(mine[~near], theirs[~near]), "4-bit codes differ from bitsandbytes-CPU away from ties"
    if dq:
        assert torch.equal(ours.offset, qs.offset) and torch.equal(ours.nested_absmax, qs.state2.absmax)
    else:
        assert torch.equal(ours.absmax, qs.absmax)


test_nf4_matches_bitsandbytes_cpu, test_nf4_matches_bitsandbytes_cpu_slow = property_test(
    ci=30, slow=500, seed=st.integers(0, 2 ** 31 - 1), rows=st.integers(1, 20), cols=not_block_multiple(200),
    bs=st.sampled_from(N.VALID_BLOCKSIZES[:5]), dtype=st.sampled_from([F32, F16, BF16]),
    dq=st.booleans())(_matches_bitsandbytes_cpu)


# --------------------------------------------------------------------------------------- mutation controls

def test_mutations_fail_the_property_checks():
    """Each property's assertion rejects a deliberately wrong result: a missing scaling (reference path), a
    dropout mask from another seed, a swapped nibble, an off-by-one absmax block, and a moved NaN."""
    c = dict(batch=1, rows=37, k=67, n=29, r=5, dtype=F32, weight="nf4_dq", blocksize=64, scaling=1.5, p=0.3,
             bias=True, seed=1)
    x, wt, wd, a, b, bias, dy = make_tensors(c)
    mask = kernel_mask("reference", 1, 37, 67, 0.3)
    want, _ = oracle64(x, wd, a, b, 1.5, bias, mask, 0.3, dy)
    no_scaling = run_lora("reference", x, wt, a, b, 1.0, bias, 0.3, dy, 1)
    other_mask = run_lora("reference", x, wt, a, b, 1.5, bias, 0.3, dy, 2)
    for bad, what in ((no_scaling, "missing scaling"), (other_mask, "another dropout seed")):
        with pytest.raises(AssertionError):
            for name, g, t in zip(("y", "dx", "dA", "dB", "dbias"), bad, want):
                assert_rel_close(g, t, F32, f"{what} {name}")
    # NF4: a swapped nibble and an off-by-one absmax block change the bytes the invariants compare.
    q = quantize_nf4(torch.randn(5, 77, generator=torch.Generator().manual_seed(3)), 64, double_quant=False)
    swapped = NF4Weight(((q.data >> 4) | (q.data << 4)).to(torch.uint8), q.absmax, q.shape, q.dtype, 64)
    shifted = NF4Weight(q.data, torch.roll(q.absmax, 1), q.shape, q.dtype, 64)
    for bad in (swapped, shifted):
        assert not _tensors_equal(quantize_nf4(bad.dequantize(), 64, double_quant=False), q)
    with pytest.raises(AssertionError, match="NaN positions"):
        assert_same_nonfinite(torch.tensor([math.nan, 1.0]), torch.tensor([1.0, math.nan]), "moved NaN")


def test_profiles_are_registered():
    assert settings.get_profile("slow").max_examples >= 500
    assert settings.get_profile("ci").max_examples <= 60
    slow_tests = [v for k, v in globals().items() if k.startswith("test_") and k.endswith("_slow")]
    fast_tests = [v for k, v in globals().items() if k.startswith("test_") and not k.endswith("_slow")
                  and hasattr(v, "hypothesis")]
    assert len(slow_tests) == len(fast_tests) >= 10
    assert all(any(m.name == "slow" for m in getattr(t, "pytestmark", [])) for t in slow_tests)
