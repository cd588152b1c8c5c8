"""The Triton LoRA/QLoRA kernels on the GPU (marker ``gpu``; skipped without CUDA).

Real layer shapes in bf16/fp16/fp32 against the reference computed in fp32 (TF32 off) on the same weights and
the kernels' own dropout mask; every config each kernel may be autotuned to; opcheck; torch.compile(fullgraph);
a sweep of random odd shapes with fresh random inputs on every run and output buffers poisoned with NaN; no
dequantized copy of an NF4 weight in the peak memory. Each test runs with LORA_OPS_BACKEND=triton and the
reference implementations patched to raise, and checks the kernels' launch counter.

Prints one "max rel" line per case (relative Frobenius error of y, dx, dA, dB, dbias and their maximum) for the
lead to quote. Most tests run with LORA_OPS_TRITON_AUTOTUNE=0 (the first config that survives pruning) so the
file stays near two minutes with a cold Triton cache; test_real_shapes' first case and the config test cover
autotuning and every config.
"""
import os
import random
import time

import pytest
import torch

import lora_ops
from lora_ops import nf4, reference
from lora_ops.testing import materialize_dropout_mask, peek_dropout_seed
from helpers import assert_rel_close, capture_graph, kernels_only, rel_error, tma_launches

pytestmark = pytest.mark.gpu

NAMES = ("y", "dx", "dA", "dB", "dbias")


def _lora():
    from lora_ops.triton_kernels import lora
    return lora


def _tuning():
    from lora_ops.triton_kernels import lora_tuning
    return lora_tuning


@pytest.fixture(autouse=True)
def _gpu_triton(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("LORA_OPS_BACKEND", "triton")
    monkeypatch.setenv("LORA_OPS_TRITON_AUTOTUNE", "0")
    # The fp32 oracle and the fp32 kernels must both be IEEE fp32 (torch's default; made sure here).
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


ALL_KERNELS = ("lora_s", "lora_fwd", "lora_bwd_ds", "lora_bwd_dx", "lora_bwd_da")


def make_inputs(m, k, n, r, dtype, weight, blocksize=64, bias=True, gen=None, device="cuda"):
    """Random inputs on the GPU; ``wd`` is the dense weight the kernel must reproduce (W, or the NF4 weight
    dequantized to ``dtype`` by the reference). B is random (not zero) so the LoRA term carries weight."""
    g = gen or torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    x, w, a, b = rnd(m, k), rnd(n, k) / k ** 0.5, rnd(r, k) / k ** 0.5, rnd(n, r) / r ** 0.5
    bias_t = rnd(n) if bias else None
    dy = rnd(m, n)
    if weight == "dense":
        wk = wd = w.to(dtype)
    else:
        wk = lora_ops.quantize_nf4(w.to(dtype), blocksize=blocksize, double_quant=weight == "nf4-dq")
        wd = nf4.reference_dequantize_nf4(*wk.tensors(), blocksize, n, k, dtype)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(x=cast(x), w=wk, wd=wd, a=cast(a), b=cast(b), bias=cast(bias_t), dy=cast(dy))


def run_layer(inp, scaling, p, monkeypatch, x_as_is=False):
    """lora_linear fwd+bwd on the Triton path: ((y, dx, dA, dB, dbias), mask). Leaves are clones (contiguous,
    aligned), except x with ``x_as_is``: then inp["x"] itself, with its strides and alignment, is the leaf."""
    a, b = (inp[k].detach().clone().requires_grad_(True) for k in ("a", "b"))
    if x_as_is:
        x = inp["x"].requires_grad_(True)
        x.grad = None  # a test may pass the same leaf twice
    else:
        x = inp["x"].detach().clone().requires_grad_(True)
    bias = inp["bias"].detach().clone().requires_grad_(True) if inp["bias"] is not None else None
    m, k = x.shape
    mask = materialize_dropout_mask(peek_dropout_seed("cuda"), m, k, p, "cuda") if p > 0 else None
    with kernels_only(monkeypatch, ALL_KERNELS):
        y = lora_ops.lora_linear(x, inp["w"], a, b, scaling, bias, dropout_p=p)
        y.backward(inp["dy"])
    return (y.detach(), x.grad, a.grad, b.grad, None if bias is None else bias.grad), mask


def oracle(inp, scaling, p, mask):
    """The reference in fp32 on the same weights and mask: (y, dx, dA, dB, dbias). Under dropout, the S that dB
    is taken from is that of dropout(x) rounded to x's dtype, as the kernels' S pass computes it (and as torch's
    dropout in that dtype gives it): with a row or two and rank 1, S is one sum whose cancellation turns that
    rounding into more than the bf16 tolerance in ~7 % of draws (1.8e-2 at M=1 K=1029 r=1 in one GPU run)."""
    f = lambda t: None if t is None else t.detach().float()  # noqa: E731
    y, s = reference.lora_forward(f(inp["x"]), f(inp["wd"]), f(inp["a"]), f(inp["b"]), scaling, f(inp["bias"]),
                                  p, mask)
    if p > 0:
        xd = f(reference._apply_dropout(inp["x"].detach(), mask, p))
        s = reference.lora_forward(xd, f(inp["wd"]), f(inp["a"]), f(inp["b"]), scaling, None)[1]
    grads = reference.lora_backward(f(inp["dy"]), f(inp["x"]), f(inp["wd"]), f(inp["a"]), f(inp["b"]), s, scaling,
                                    p, mask, True, True, True, inp["bias"] is not None)
    return (y,) + tuple(grads)


def check_and_report(got, want, dtype, label):
    """assert_rel_close on every output, then one printed line with each relative error and the maximum."""
    errs = {}
    for name, g, t in zip(NAMES, got, want):
        if t is None:
            continue
        assert not torch.isnan(g).any(), f"{label} {name}: NaN in the output (an element was never written?)"
        errs[name] = rel_error(g, t)
    print(f"\n[lora gpu] {label}: max rel {max(errs.values()):.2e} (" +
          ", ".join(f"{k} {v:.2e}" for k, v in errs.items()) + ")")
    for name, g, t in zip(NAMES, got, want):
        if t is not None:
            assert_rel_close(g, t, dtype, f"{label} {name}")


BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
# (M, K, N, r, dtype, weight, dropout p, bias, autotune)
REAL = [
    (8192, 4096, 4096, 16, BF16, "dense", 0.05, True, True),
    (8192, 4096, 14336, 64, BF16, "nf4-dq", 0.05, True, False),
    (4096, 14336, 4096, 8, BF16, "nf4", 0.0, False, False),
    (2048, 4096, 14336, 32, F16, "dense", 0.1, True, False),
    (4096, 4096, 4096, 64, F16, "nf4-dq", 0.0, True, False),
    (2048, 4096, 4096, 16, F32, "dense", 0.05, True, False),
    (1024, 14336, 4096, 8, F32, "nf4-dq", 0.0, False, False),
]


@pytest.mark.parametrize("case", REAL, ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}-r{c[3]}-{str(c[4])[6:]}-{c[5]}"
                         f"-p{c[6]}{'-bias' if c[7] else ''}{'-autotuned' if c[8] else ''}")
def test_real_shapes(monkeypatch, case):
    m, k, n, r, dtype, weight, p, bias, autotune = case
    if autotune:
        monkeypatch.setenv("LORA_OPS_TRITON_AUTOTUNE", "1")
    inp = make_inputs(m, k, n, r, dtype, weight, bias=bias)
    t0 = time.perf_counter()
    got, mask = run_layer(inp, 2.0, p, monkeypatch)
    torch.cuda.synchronize()
    check_and_report(got, oracle(inp, 2.0, p, mask), dtype,
                     f"M={m} {k}->{n} r={r} {dtype} {weight} p={p} bias={bias}"
                     f"{' autotuned' if autotune else ''} (first call {time.perf_counter() - t0:.1f}s)")


def test_nf4_never_materialises_a_dense_weight(monkeypatch):
    """Peak extra memory of the fused NF4 forward and backward is their outputs plus at most 16 MiB of
    workspace (dS, the fp32 dB/dbias accumulators, dA partials): a dequantized (N, K) bf16 weight, 112 MiB
    here, would not fit under that bound. This is the in-loop decode path (forced here); from
    NF4_DEQUANT_MIN_M rows the launchers dequantize into a per-call temporary instead (next test)."""
    monkeypatch.setattr(_lora(), "NF4_DEQUANT_MIN_M", 1 << 62)
    m, k, n, r = 4096, 4096, 14336, 16
    inp = make_inputs(m, k, n, r, BF16, "nf4-dq", bias=True)
    w_bytes = n * k * 2
    x, a, b, bias = (inp[key].detach().clone().requires_grad_(True) for key in ("x", "a", "b", "bias"))
    run_layer(inp, 2.0, 0.05, monkeypatch)  # compile / warm up outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with kernels_only(monkeypatch, ALL_KERNELS):
        y = lora_ops.lora_linear(x, inp["w"], a, b, 2.0, bias, dropout_p=0.05)
        torch.cuda.synchronize()
        fwd_peak = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        base_b = torch.cuda.memory_allocated()
        y.backward(inp["dy"])
        torch.cuda.synchronize()
        bwd_peak = torch.cuda.max_memory_allocated() - base_b
    y_bytes, s_bytes, dx_bytes = m * n * 2, m * r * 2, m * k * 2
    workspace = 16 << 20
    assert workspace < w_bytes // 4  # the bound can see a dense copy of W
    print(f"\n[lora gpu] NF4 {m}x{k}->{n}: peak extra fwd {fwd_peak / 2**20:.1f} MiB (y+S "
          f"{(y_bytes + s_bytes) / 2**20:.1f}), bwd {bwd_peak / 2**20:.1f} MiB (dx {dx_bytes / 2**20:.1f}); "
          f"a dense bf16 W is {w_bytes / 2**20:.0f} MiB")
    assert fwd_peak <= y_bytes + s_bytes + workspace
    assert bwd_peak <= dx_bytes + workspace


def test_nf4_dequant_temporary_is_freed(monkeypatch):
    """From NF4_DEQUANT_MIN_M rows an NF4 weight is dequantized into a temporary for the call: the peak holds
    at most one dense (N, K) copy, and after the forward returns nothing dense is alive (only y, S and what
    autograd saves: x, the NF4 bytes, S)."""
    m, k, n, r = 4096, 4096, 14336, 16
    assert m >= _lora().NF4_DEQUANT_MIN_M
    inp = make_inputs(m, k, n, r, BF16, "nf4-dq", bias=True)
    w_bytes = n * k * 2
    x, a, b, bias = (inp[key].detach().clone().requires_grad_(True) for key in ("x", "a", "b", "bias"))
    run_layer(inp, 2.0, 0.05, monkeypatch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with kernels_only(monkeypatch):
        y = lora_ops.lora_linear(x, inp["w"], a, b, 2.0, bias, dropout_p=0.05)
        torch.cuda.synchronize()
        fwd_peak = torch.cuda.max_memory_allocated() - base
        after = torch.cuda.memory_allocated() - base
        y.backward(inp["dy"])
    y_bytes, s_bytes = m * n * 2, m * r * 2
    workspace = 16 << 20
    print(f"\n[lora gpu] NF4 temp path {m}x{k}->{n}: peak extra fwd {fwd_peak / 2**20:.1f} MiB, alive after "
          f"forward {after / 2**20:.1f} MiB (y+S {(y_bytes + s_bytes) / 2**20:.1f}, W temp {w_bytes / 2**20:.0f})")
    assert fwd_peak <= y_bytes + s_bytes + w_bytes + workspace
    assert after <= y_bytes + s_bytes + workspace, "a dense copy of W outlived the forward"


@pytest.mark.parametrize("weight,r,kernels", [("dense", 16, ("lora_fwd", "lora_bwd_dx")), ("nf4-dq", 64, None)])
def test_every_config_is_correct(monkeypatch, weight, r, kernels):
    """Each config the autotuner may choose (those that survive pruning for this call) gives the right answer,
    with dropout, bias and partial tiles in M, N and K; the atomic-free dB kernel under deterministic mode.

    K and N are multiples of 16 (not of the tiles) and r, dtype, dropout and bias are those of the first two
    real-shape cases, so the kernels compiled here are the ones those cases use (one compile per config); the
    interpreter test covers every config on fully odd shapes. The dense weight only changes the two GEMMs.
    The TMA GEMM (on by default for M >= 4096, N*K >= 2^25) is kept off here so the pointer GEMMs' configs run."""
    monkeypatch.setenv("LORA_OPS_TMA", "0")
    L = _lora()
    monkeypatch.setattr(L, "NF4_DEQUANT_MIN_M", 1 << 62)  # the NF4 configs of the in-loop decode kernels
    m, k, n = 300, 1040, 2064
    inp = make_inputs(m, k, n, r, BF16, weight, bias=True)
    p, seed = 0.05, 12345
    wargs = inp["w"].tensors() if weight != "dense" else (inp["w"], None, None, None, None)
    bs = 64 if weight != "dense" else 0
    seed_t = torch.tensor(seed, dtype=torch.int64, device="cuda")
    mask = materialize_dropout_mask(seed, m, k, p, "cuda")
    want = oracle(inp, 2.0, p, mask)
    f = lambda t: t.float()  # noqa: E731
    _, s_want = reference.lora_forward(f(inp["x"]), f(inp["wd"]), f(inp["a"]), f(inp["b"]), 2.0, f(inp["bias"]),
                                       p, mask)
    fwd = (inp["x"], *wargs, bs, inp["a"], inp["b"], 2.0, inp["bias"], p, seed_t)
    with kernels_only(monkeypatch):
        _, s = torch.ops.lora_ops.lora_fwd(*fwd)
    prev = torch.are_deterministic_algorithms_enabled()
    checked = 0
    try:
        for name, kernel in _tuning().KERNELS.items():
            if kernels is not None and name not in kernels:
                continue
            torch.use_deterministic_algorithms(name == "lora_bwd_db")
            # The configs the autotuner may run for this call (pruning sees M, the dtype and NF4 or not).
            survivors = kernel.prune(list(kernel.configs), {"M": m, "x_ptr": inp["x"]}, IS_NF4=weight != "dense")
            for cfg in survivors:
                monkeypatch.setattr(kernel, "forced", cfg)
                with kernels_only(monkeypatch, (name,)):
                    if name in ("lora_s", "lora_fwd"):
                        out = torch.ops.lora_ops.lora_fwd(*fwd)
                        pairs = zip(("y", "S"), out, (want[0], s_want))
                    else:
                        out = torch.ops.lora_ops.lora_bwd(inp["dy"], inp["x"], *wargs, bs, inp["a"], inp["b"], s,
                                                          2.0, p, seed_t, True, True, True, True)
                        pairs = zip(NAMES[1:], out, want[1:])
                torch.cuda.synchronize()
                for what, g, t in pairs:
                    assert_rel_close(g, t, BF16, f"{name} {cfg} {what}")
                checked += 1
            monkeypatch.setattr(kernel, "forced", None)
    finally:
        torch.use_deterministic_algorithms(prev)
    print(f"\n[lora gpu] every config ({weight}): {checked} kernel configs checked")


def test_deterministic_mode_is_bitwise_repeatable(monkeypatch):
    inp = make_inputs(4096, 4096, 4096, 16, BF16, "nf4-dq", bias=True)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            torch.manual_seed(3)  # the same dropout seed both times
            got, mask = run_layer(inp, 2.0, 0.05, monkeypatch)
            runs.append(got)
    finally:
        torch.use_deterministic_algorithms(prev)
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"
    check_and_report(runs[0], oracle(inp, 2.0, 0.05, mask), BF16, "deterministic 4096x4096->4096 nf4-dq")


def test_dropout_mask_bit_exact_on_gpu():
    L = _lora()
    for seed, p in ((2 ** 61 + 7, 0.05), (12345, 0.5)):
        got = L.dropout_mask(seed, 8192, 4096, p, "cuda")
        assert torch.equal(got, reference.dropout_mask(seed, 8192, 4096, p, "cuda"))


def test_opcheck_cuda(monkeypatch):
    inp = make_inputs(37, 129, 70, 8, BF16, "nf4-dq", bias=True)
    seed_t = torch.tensor(5, dtype=torch.int64, device="cuda")
    wargs = inp["w"].tensors()
    fwd = (inp["x"], *wargs, 64, inp["a"], inp["b"], 2.0, inp["bias"], 0.1, seed_t)
    with kernels_only(monkeypatch, ALL_KERNELS):
        torch.library.opcheck(torch.ops.lora_ops.lora_fwd.default, fwd)
        _, s = torch.ops.lora_ops.lora_fwd(*fwd)
        for flags in ((True, True, True, True), (False, True, True, False)):
            torch.library.opcheck(torch.ops.lora_ops.lora_bwd.default,
                                  (inp["dy"], inp["x"], *wargs, 64, inp["a"], inp["b"], s, 2.0, 0.1, seed_t, *flags))


def test_compile_fullgraph_module(monkeypatch):
    """A small module calling lora_linear compiles with fullgraph=True and matches eager (p = 0: Inductor draws
    its own random numbers); with dropout it compiles and trains (finite gradients)."""
    torch._dynamo.reset()
    inp = make_inputs(64, 129, 70, 8, BF16, "nf4-dq", bias=True)

    class Layer(torch.nn.Module):
        def __init__(self, p):
            super().__init__()
            self.w, self.p = inp["w"], p
            self.a = torch.nn.Parameter(inp["a"].clone())
            self.b = torch.nn.Parameter(inp["b"].clone())
            self.bias = torch.nn.Parameter(inp["bias"].clone())

        def forward(self, x):
            return lora_ops.lora_linear(x, self.w, self.a, self.b, 2.0, self.bias, dropout_p=self.p,
                                        training=self.training)

    x = inp["x"].reshape(2, 32, 129)
    results = []
    for compiled in (False, True):
        layer = Layer(0.0)
        fn = torch.compile(layer, fullgraph=True) if compiled else layer
        xx = x.detach().clone().requires_grad_(True)
        with kernels_only(monkeypatch, ALL_KERNELS):
            y = fn(xx)
            y.backward(inp["dy"].reshape(2, 32, 70))
        results.append((y.detach(), xx.grad, layer.a.grad, layer.b.grad, layer.bias.grad))
    for name, c, e in zip(NAMES, results[1], results[0]):
        assert_rel_close(c, e, BF16, f"compiled {name}")
    layer = Layer(0.1)
    fn = torch.compile(layer, fullgraph=True)
    # x is frozen here: the dX GEMM must be skipped.
    with kernels_only(monkeypatch, tuple(k for k in ALL_KERNELS if k != "lora_bwd_dx")):
        y = fn(x)
        y.float().square().mean().backward()
    assert torch.isfinite(layer.a.grad).all() and layer.a.grad.abs().sum() > 0


def _poison_allocator():
    """Fill freed blocks of the caching allocator with NaN, so that torch.empty inside the launchers returns
    NaN-filled memory and an output element the kernels never write stays NaN."""
    big = torch.full((96 << 20,), float("nan"), device="cuda")  # 384 MiB: the large-block pool
    smalls = [torch.full((1 << 17,), float("nan"), device="cuda") for _ in range(32)]  # small-block pool
    del big, smalls


def test_random_shape_sweep(monkeypatch):
    """Fresh random odd shapes, inputs, weight kinds and ranks on every run (the seed is printed). Each case
    runs twice: with the NaN-poisoned allocator (atomic dB path) and under deterministic mode, whose torch.empty
    fills NaN (atomic-free dB path); outputs must be NaN-free and match the fp32 reference. The variety is in
    the shapes (masks, partial tiles, straddling NF4 blocks); kernel variants are kept few (bf16, bias,
    dropout, blocksize 64, two rank chunks) because each one is a fresh Triton compile."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"\n[lora gpu] sweep seed {seed}")
    rng = random.Random(seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    worst = 0.0
    for i in range(12):
        m = rng.choice([1, 2, 7, 63, 129, 1000, 2049])
        k = rng.randrange(1, 1600) | 1
        n = rng.randrange(1, 1600) | 1
        r = rng.choice([1, 3, 17, 24])
        weight = rng.choice(["dense", "nf4-dq"])
        blocksize = 64
        p = 0.1
        label = f"sweep {i}: M={m} K={k} N={n} r={r} {weight}/{blocksize} p={p}"
        inp = make_inputs(m, k, n, r, BF16, weight, blocksize, bias=True, gen=gen)
        for deterministic in (False, True):
            prev = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(deterministic)
            try:
                if not deterministic:
                    _poison_allocator()
                got, mask = run_layer(inp, 2.0, p, monkeypatch)
            finally:
                torch.use_deterministic_algorithms(prev)
            want = oracle(inp, 2.0, p, mask)
            for name, g, t in zip(NAMES, got, want):
                assert not torch.isnan(g).any(), f"{label}: NaN in {name} (an element was never written?)"
                assert_rel_close(g, t, BF16, f"{label} det={deterministic} {name}")
                worst = max(worst, rel_error(g, t))
    print(f"[lora gpu] sweep: 12 shapes x 2 modes, max rel {worst:.2e} (bf16)")


@pytest.mark.parametrize("autotune", ["0", "1"])
def test_launch_cache_respects_specialisation(monkeypatch, autotune):
    """The launchers' cache of compiled kernels (triton_kernels/lora_tuning.py, _Kernel): repeated calls hit it, and
    arguments that Triton specialises differently (a 16-byte-misaligned x, odd strides, another M bucket) get
    their own kernel, each matching the oracle. A cache keyed too coarsely would launch a kernel compiled for
    aligned pointers on a misaligned one, or a config tuned for another M."""
    monkeypatch.setenv("LORA_OPS_TRITON_AUTOTUNE", autotune)
    L = _lora()
    inp = make_inputs(300, 1000, 520, 16, BF16, "dense")
    want = oracle(inp, 2.0, 0.0, None)
    base = dict(inp)
    for label, x in (("aligned", inp["x"]), ("aligned again", inp["x"]),
                     ("misaligned by 1 element", torch.empty(300 * 1000 + 1, dtype=BF16, device="cuda")[1:]
                      .view(300, 1000).copy_(inp["x"])),
                     ("row stride 1003", torch.empty(300, 1003, dtype=BF16, device="cuda")[:, :1000]
                      .copy_(inp["x"]))):
        entries = sum(len(k._launches) for k in _tuning().KERNELS.values())
        got, _ = run_layer(dict(base, x=x), 2.0, 0.0, monkeypatch, x_as_is=True)
        check_and_report(got, want, BF16, f"launch cache, x {label} (autotune={autotune})")
        if label == "aligned again":
            now = sum(len(k._launches) for k in _tuning().KERNELS.values())
            assert now == entries, "a repeated call missed the cache"
    small = make_inputs(20, 1000, 520, 16, BF16, "dense")
    got, _ = run_layer(small, 2.0, 0.0, monkeypatch)
    check_and_report(got, oracle(small, 2.0, 0.0, None), BF16, f"launch cache, M=20 (autotune={autotune})")


@pytest.mark.parametrize("case", [REAL[0], REAL[1], REAL[3]], ids=["bf16-dense-dropout", "bf16-nf4dq-r64", "fp16-n14336"])
def test_tma_gemm_real_shapes(monkeypatch, case):
    """The persistent TMA GEMM (forced on with LORA_OPS_TMA=1, whatever the shape) on real shapes: forward and dX run as lora_gemm_tma
    (the NF4 case through its dequantized temporary), every output within the same tolerances. r = 64 is the
    case whose shared memory once overflowed (LoRA seed in rank chunks of 64)."""
    m, k, n, r, dtype, weight, p, bias, _ = case
    monkeypatch.setenv("LORA_OPS_TMA", "1")
    L = _lora()
    before = tma_launches(L.LAUNCHES)
    inp = make_inputs(m, k, n, r, dtype, weight, bias=bias)
    got, mask = run_layer(inp, 2.0, p, monkeypatch)
    # An NF4 weight whose dense copy passes NF4_CHUNK_BYTES runs one GEMM per dequantized chunk (rows of W for the
    # forward, columns for dX) from NF4_CHUNK_MIN_M rows on.
    chunked = weight != "dense" and m >= L.NF4_CHUNK_MIN_M
    elt = torch.tensor([], dtype=dtype).element_size()
    want = sum(len(L._nf4_chunks(n, k, 64, elt, along) or [None]) if chunked else 1 for along in ("rows", "cols"))
    assert tma_launches(L.LAUNCHES) - before == want, "forward and dX should all have run on the TMA kernel"
    check_and_report(got, oracle(inp, 2.0, p, mask), dtype, f"TMA M={m} {k}->{n} r={r} {dtype} {weight} p={p}")


def _use_launch_path(monkeypatch, launch):
    """The launch path a test runs on: "python" (the Python launchers) or "cpp" (the C++ launch path, strict:
    its launch lists must equal the Python launchers')."""
    if launch == "python":
        monkeypatch.setenv("LORA_OPS_LAUNCH", "python")
    else:
        monkeypatch.delenv("LORA_OPS_LAUNCH", raising=False)
        monkeypatch.setenv("LORA_OPS_LAUNCH_STRICT", "1")


def _ws_capable():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.parametrize("launch", ["python", "cpp"])
@pytest.mark.parametrize("case", ["bf16-r16-bias", "fp16-r96", "bf16-dropout", "bf16-ws-off", "bf16-r4"])
def test_ws_gemm(monkeypatch, case, launch):
    """The Gluon GEMM (lora_ws_kernel.py) on sm_90, forced on every shape with LORA_OPS_TMA=1: M, N and K off the
    tile (300 x 1000 from 1088), bias, fp16, rank 96 (two seed steps); forward and dX run as lora_gemm_ws and
    every output matches the oracle, on the Python launchers and on the C++ launch path (strict: its launch
    lists must equal the Python launchers'). With dropout the dX GEMM stays on the TMA kernel (the forward does
    not), with LORA_OPS_WS=0 both do, and rank 4 (L's rows 8 bytes, not TMA's 16) keeps both there."""
    if not _ws_capable():
        pytest.skip("the Gluon GEMM is sm_90's")
    from lora_ops import _launch
    L = _lora()
    _use_launch_path(monkeypatch, launch)
    monkeypatch.setenv("LORA_OPS_TMA", "1")
    monkeypatch.setattr(L, "_WS", case != "bf16-ws-off")
    if launch == "cpp":  # plans of this configuration made under the other setting must go
        _launch._sync_settings(_launch.module())
    dtype = F16 if case.startswith("fp16") else BF16
    r = 96 if "r96" in case else 4 if "r4" in case else 16
    p = 0.1 if "dropout" in case else 0.0
    inp = make_inputs(300, 1088, 1000, r, dtype, "dense", bias="bias" in case)
    for rnd in range(2 if launch == "cpp" else 1):  # the C++ path launches itself from its second call on
        counts = dict(_launch.launch_counts()) if launch == "cpp" else dict(L.LAUNCHES)
        got, mask = run_layer(inp, 2.0, p, monkeypatch)
        check_and_report(got, oracle(inp, 2.0, p, mask), dtype, f"ws {case} {launch} call {rnd}")
        now = _launch.launch_counts() if launch == "cpp" else L.LAUNCHES
        ws = now.get("lora_gemm_ws", 0) - counts.get("lora_gemm_ws", 0)
        tma = now.get("lora_gemm_tma", 0) - counts.get("lora_gemm_tma", 0)
        if launch == "cpp" and rnd == 0:
            continue
        want_ws = 0 if case in ("bf16-ws-off", "bf16-r4") else 1 if p else 2
        assert (ws, tma) == (want_ws, 2 - want_ws), (case, launch, ws, tma)


@pytest.mark.parametrize("launch", ["python", "cpp"])
@pytest.mark.parametrize("sizes", [(512, 256, 256), (512, 384, 256)], ids=["aligned", "unaligned"])
def test_ws_gemm_group(monkeypatch, sizes, launch):
    """A projection group's GEMMs on the Gluon kernel: the forward reads B_rows with each tile's L box at its
    member's rank offset (every member boundary on a 256-column tile edge; "unaligned" puts one off the edge, so
    the forward stays on the TMA kernel), the dX GEMM reads the members' dY segments. Through the Python
    launchers (lora_forward / lora_backward with groups=) and the C++ group path (strict); outputs and gradients
    match the fp32 math of the block-diagonal B and the TMA kernel's within bf16 rounding."""
    if not _ws_capable():
        pytest.skip("the Gluon GEMM is sm_90's")
    from lora_ops import _launch
    L = _lora()
    _use_launch_path(monkeypatch, launch)  # "python" calls the launchers directly below
    monkeypatch.setenv("LORA_OPS_TMA", "1")
    g = torch.Generator(device="cuda").manual_seed(3)
    m, k, rb = 384, 512, 16
    n, r = sum(sizes), rb * len(sizes)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    x = rnd(m, k).to(BF16)
    w = (rnd(n, k) / k ** 0.5).to(BF16)
    a = (rnd(r, k) / k ** 0.5).to(BF16)
    b_rows = (rnd(n, rb) / rb ** 0.5).to(BF16)
    dys = [rnd(m, ni).to(BF16) for ni in sizes]
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]

    def run():
        if launch == "python":
            y, s = L.lora_forward(x, w, None, None, None, None, 64, a, b_rows, 2.0, None, 0.0, None, groups=sizes)
            dx, da, db, _ = L.lora_backward(dys, x, w, None, None, None, None, 64, a, b_rows, s, 2.0, 0.0, None,
                                            True, True, True, False, groups=sizes)
            return y, dx, da, db
        x_ = x.detach().clone().requires_grad_(True)
        a_ = [a[i * rb:(i + 1) * rb].detach().clone().requires_grad_(True) for i in range(len(sizes))]
        b_ = [b_rows[lo:hi].detach().clone().requires_grad_(True) for lo, hi in zip(bounds, bounds[1:])]
        ys = _launch.group(x_, w, a_, b_, [2.0] * len(sizes), None, 0.0, True)
        assert ys is not None, "the C++ group path did not take the call"
        torch.autograd.backward(list(ys), dys)
        return (torch.cat([t.detach() for t in ys], 1), x_.grad, torch.cat([t.grad for t in a_]),
                torch.cat([t.grad for t in b_]))

    outs = {}
    for ws in (False, True):
        monkeypatch.setattr(L, "_WS", ws)
        if launch == "cpp":  # the setting changed after this configuration's plan was made: send it again
            _launch._sync_settings(_launch.module())
        for call in range(2 if launch == "cpp" else 1):  # the C++ path launches itself from its second call on
            counts = dict(_launch.launch_counts()) if launch == "cpp" else dict(L.LAUNCHES)
            outs[ws] = run()
            now = _launch.launch_counts() if launch == "cpp" else L.LAUNCHES
            used = now.get("lora_gemm_ws", 0) - counts.get("lora_gemm_ws", 0)
        want = ((1 if sizes == (512, 256, 256) else 0) + 1) if ws else 0  # the forward where aligned; dX always
        assert used == want, (sizes, launch, ws, used)
    bd = torch.zeros(n, r, device="cuda")
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        bd[lo:hi, i * rb:(i + 1) * rb] = b_rows[lo:hi].float()
    y32 = x.float() @ w.float().t() + 2.0 * (x.float() @ a.float().t()) @ bd.t()
    dy32 = torch.cat(dys, 1).float()
    dx32 = dy32 @ w.float() + (2.0 * dy32 @ bd) @ a.float()
    for ws in (False, True):
        assert_rel_close(outs[ws][0], y32, BF16, f"group {sizes} {launch} ws={ws} y")
        assert_rel_close(outs[ws][1], dx32, BF16, f"group {sizes} {launch} ws={ws} dx")
    for i, name in enumerate(("y", "dx", "dA", "dB")):
        assert_rel_close(outs[True][i], outs[False][i].float(), BF16, f"group {sizes} {launch} ws vs tma {name}")


@pytest.mark.parametrize("launch", ["python", "cpp"])
@pytest.mark.parametrize("case", ["dense-da", "dense-da-dropout", "nf4-dq", "nf4-dq-da", "nf4-chunks"])
def test_side_stream(monkeypatch, case, launch):
    """LORA_OPS_SIDE_DA: dA on a second stream beside the TMA dX GEMM, which then runs on the fewest programs that
    keep its wave count. LORA_OPS_SIDE_DQ: an NF4 weight's whole dequantization on the second stream beside the S
    and dS passes, or (4096 rows: the 48 MiB weight in two chunks) the second chunk's beside the first chunk's
    narrowed GEMM. Every output matches the oracle, eagerly (the Python launchers, or the C++ launch path after
    its first call registered, strict) and replayed from a CUDA graph (the stream forked and joined inside the
    capture)."""
    from lora_ops import _launch
    L = _lora()
    _use_launch_path(monkeypatch, launch)
    monkeypatch.setenv("LORA_OPS_TMA", "1")
    side_da, side_dq = case.endswith("da") or "da-" in case, case.startswith("nf4")
    monkeypatch.setattr(L, "_SIDE_DA", side_da)
    monkeypatch.setattr(L, "_SIDE_DQ", side_dq)
    p = 0.05 if case.endswith("dropout") else 0.0
    grids, forks = [], []
    real_gemm, real_stream = L._tma_gemm, L._side_stream

    def spy(*args, **kw):
        grids.append(kw.get("programs", args[17] if len(args) > 17 else None))
        return real_gemm(*args, **kw)

    def stream_spy(device):
        forks.append(device)
        return real_stream(device)
    monkeypatch.setattr(L, "_tma_gemm", spy)
    monkeypatch.setattr(L, "_side_stream", stream_spy)
    chunks = case == "nf4-chunks"
    m, k, n, r = 4096 if chunks else 2048, 4096, 6144, 48
    inp = make_inputs(m, k, n, r, BF16, "nf4-dq" if side_dq else "dense")
    got, mask = run_layer(inp, 2.0, p, monkeypatch)
    want = oracle(inp, 2.0, p, mask)
    check_and_report(got, want, BF16, f"side stream {case}, eager, {launch}")
    sms = L._sm_count(torch.device("cuda"))
    narrow = L._fewest_programs(L._tma_tiles(m, k), sms)
    assert narrow < sms, "the dX GEMM should have left SMs to the dA pass"
    if chunks:  # y's two column chunks, then dX's: each first chunk's GEMM narrowed, the second dequantized beside
        assert L._nf4_chunks(n, k, 64, 2, "rows") == [(0, 3072), (3072, 6144)]
        assert grids[:4] == [L._fewest_programs(L._tma_tiles(m, 3072), sms), None,
                             L._fewest_programs(L._tma_tiles(m, 2048), sms), None], grids
        assert len(forks) == 2, forks
    else:
        assert grids[:2] == [None, narrow if side_da else None], grids
        assert len(forks) == side_da + 2 * side_dq, forks  # forward and backward dequantize, dA once
    if launch == "cpp":
        before = dict(_launch.launch_counts())
        got, mask = run_layer(inp, 2.0, p, monkeypatch)
        check_and_report(got, oracle(inp, 2.0, p, mask), BF16, f"side stream {case}, eager, C++ path")
        after = _launch.launch_counts()
        assert after.get("lora_bwd_da", 0) > before.get("lora_bwd_da", 0), "the C++ path did not run the backward"
        assert tma_launches(after) >= tma_launches(before) + 2

    x, a, b = (inp[t].detach().clone().requires_grad_(True) for t in ("x", "a", "b"))
    bias = inp["bias"].detach().clone().requires_grad_(True)
    w = inp["w"]

    def step():
        for t in (x, a, b, bias):
            t.grad = None
        y = lora_ops.lora_linear(x, w, a, b, 2.0, bias, dropout_p=p)
        y.backward(inp["dy"])
        return y
    graph, y = capture_graph(step, warmup=2)
    if p > 0:  # the replay draws the seed that the capture saw; only the no-dropout outputs are fixed
        return
    for _ in range(3):
        for t in (x, a, b, bias):
            t.grad.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_and_report((y, x.grad, a.grad, b.grad, bias.grad), want, BF16, f"side stream {case}, graph, {launch}")
