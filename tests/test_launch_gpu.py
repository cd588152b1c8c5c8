"""The C++ launch path on the GPU (marker ``gpu``): same results as the Python launchers, used in steady state,
capturable in a CUDA graph, and under torch.compile(mode="reduce-overhead").

Every test runs with LORA_OPS_LAUNCH_STRICT=1: a configuration whose C++ launch list differs from the Python
launchers' raises instead of quietly staying on Python. "Same results" is bit for bit for y, dx and dA (the same
kernels with the same arguments); dB and dbias are reduced with fp32 atomics in a run-dependent order, so they
are compared with the dtype's tolerance.
"""
import pytest
import torch

import lora_ops
from lora_ops import _launch
from helpers import assert_rel_close, capture_graph, tma_launches

pytestmark = pytest.mark.gpu

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("LORA_OPS_LAUNCH_STRICT", "1")
    monkeypatch.setenv("LORA_OPS_TRITON_AUTOTUNE", "0")
    monkeypatch.delenv("LORA_OPS_LAUNCH", raising=False)
    monkeypatch.delenv("LORA_OPS_BACKEND", raising=False)
    if _launch.module() is None:
        pytest.fail("the C++ launch path did not load (lora_ops._C built without launch_linear?)")


def _inputs(m, k, n, r, dtype, weight, bias, lead=(), seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    w = (rnd(n, k) / k ** 0.5).to(dtype)
    if weight != "dense":
        w = lora_ops.quantize_nf4(w, blocksize=64, double_quant=weight == "nf4-dq")
    return dict(x=rnd(*lead, m, k).to(dtype), w=w, a=(rnd(r, k) / k ** 0.5).to(dtype),
                b=(rnd(n, r) / r ** 0.5).to(dtype), bias=rnd(n).to(dtype) if bias else None,
                dy=rnd(*lead, m, n).to(dtype))


def _run(inp, p, frozen_a=False, seed=1234):
    x = inp["x"].detach().clone().requires_grad_(True)
    a = inp["a"].detach().clone().requires_grad_(not frozen_a)
    b = inp["b"].detach().clone().requires_grad_(True)
    bias = None if inp["bias"] is None else inp["bias"].detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = lora_ops.lora_linear(x, inp["w"], a, b, 1.5, bias, dropout_p=p)
    y.backward(inp["dy"])
    return (y.detach(), x.grad, a.grad, b.grad, None if bias is None else bias.grad)


def _group_inputs(sizes, r, m, k, seed, bias=False):
    """A q/k/v-like group's bf16 inputs: w (sum N_i, K), x (M, K), the members' A_i (r, K) and B_i (N_i, r), their
    dY_i (M, N_i), and with ``bias`` the concatenated bias (sum N_i,)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    w = (rnd(sum(sizes), k) / k ** 0.5).to(BF16)
    x = rnd(m, k).to(BF16)
    As = [(rnd(r, k) / k ** 0.5).to(BF16) for _ in sizes]
    Bs = [(rnd(n, r) / r ** 0.5).to(BF16) for n in sizes]
    dys = [rnd(m, n).to(BF16) for n in sizes]
    return dict(w=w, x=x, As=As, Bs=Bs, dys=dys, bias=rnd(sum(sizes)).to(BF16) if bias else None)


def _group_run(inp, weight=None):
    """One fwd+bwd of the group through the C++ entry (``_launch.group``, scalings 2) from fresh leaves; ``weight``
    (default inp's w) may be its NF4 form. Returns (ys, dx, dA_i, dB_i)."""
    x = inp["x"].clone().requires_grad_()
    As = [a.clone().requires_grad_() for a in inp["As"]]
    Bs = [b.clone().requires_grad_() for b in inp["Bs"]]
    ys = _launch.group(x, inp["w"] if weight is None else weight, As, Bs, [2.0] * len(As), inp["bias"], 0.0, True)
    assert ys is not None and ys[0].grad_fn.name().endswith("GroupFunction>")
    torch.autograd.backward(list(ys), inp["dys"])
    return [y.detach() for y in ys], x.grad, [a.grad for a in As], [b.grad for b in Bs]


def _python_launchers(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setenv("LORA_OPS_LAUNCH", "python")
        return fn()


CASES = [  # (M, K, N, r, dtype, weight, bias, dropout p, leading dims)
    (256, 512, 384, 16, BF16, "dense", True, 0.0, ()),
    (100, 512, 384, 8, F16, "dense", False, 0.1, ()),
    (96, 256, 512, 80, F32, "dense", True, 0.05, ()),
    (200, 512, 256, 16, BF16, "nf4", True, 0.0, ()),
    (64, 512, 256, 16, BF16, "nf4-dq", False, 0.1, (2,)),
    (40, 512, 256, 16, F16, "nf4-dq", True, 0.0, ()),  # below the dequantize threshold: NF4 decoded in the K-loop
    (4096, 4096, 8192, 16, BF16, "dense", True, 0.0, ()),  # the TMA GEMMs
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}-r{c[3]}-{str(c[4])[6:]}-{c[5]}"
                         f"{'-bias' if c[6] else ''}-p{c[7]}{'-3d' if c[8] else ''}")
def test_cpp_path_equals_python_launchers(monkeypatch, case):
    m, k, n, r, dtype, weight, bias, p, lead = case
    inp = _inputs(m, k, n, r, dtype, weight, bias, lead)
    want = _python_launchers(monkeypatch, lambda: _run(inp, p))
    _run(inp, p)  # the first call of this configuration registers it
    from lora_ops.triton_kernels import records
    before = dict(_launch.launch_counts())
    py_before = sum(records.LAUNCHES._py.values())
    got = _run(inp, p)
    after = _launch.launch_counts()
    assert sum(after.values()) > sum(before.values()), "the C++ side launched nothing"
    assert sum(records.LAUNCHES._py.values()) == py_before, "a Python launcher ran in steady state"
    x = inp["x"].detach().clone().requires_grad_(True)
    grad_fn = lora_ops.lora_linear(x, inp["w"], inp["a"], inp["b"], 1.5, inp["bias"], dropout_p=p).grad_fn.name()
    assert "LoRAFunction" in grad_fn, f"lora_linear's autograd node is {grad_fn}, not the C++ Function"
    for name, g, w in zip(("y", "dx", "dA"), got[:3], want[:3]):
        assert torch.equal(g, w), f"{name} differs from the Python launchers' result"
    for name, g, w in zip(("dB", "dbias"), got[3:], want[3:]):
        if w is not None:
            assert_rel_close(g, w, dtype, name)


@pytest.mark.parametrize("weight,p", [("nf4", 0.1), ("nf4-dq", 0.0)])
def test_nf4_chunks_equal_the_whole_temporary(monkeypatch, weight, p):
    """Past NF4_CHUNK_BYTES the weight is dequantized in chunks (3 row ranges for the forward, 4 column windows
    for dX here): the same tiles over the same K-loops, so y, dx and dA equal the whole temporary's bit for bit,
    from the Python launchers and from the C++ path alike. M is above _SPLIT_MAX_M and _SPLIT_SUM_MAX_M: both
    take S and dS in one slice there (with _DS_SPLITS = 1: by default the chunked weight's dS runs in slices summed
    before the dX GEMMs, the whole weight's pointer GEMM in one); at smaller M the whole weight's GEMM sums fp32
    slices itself while a chunked weight's slices are summed and rounded first, which rounds differently."""
    from lora_ops.triton_kernels import lora as L
    from lora_ops.triton_kernels import records
    inp = _inputs(max(L._SPLIT_MAX_M, L._SPLIT_SUM_MAX_M) + 128, 1024, 768, 16, BF16, weight, True)
    mod = _launch.module()
    try:
        monkeypatch.setattr(L, "_DS_SPLITS", 1)
        _launch._sync_settings(mod)
        whole = _run(inp, p)
        monkeypatch.setattr(L, "NF4_CHUNK_BYTES", 512 * 1024)
        monkeypatch.setattr(L, "NF4_CHUNK_MIN_M", 0)
        _launch._sync_settings(mod)
        before = records.LAUNCHES["nf4_dequant"]
        want = _python_launchers(monkeypatch, lambda: _run(inp, p))
        assert records.LAUNCHES["nf4_dequant"] - before == 3 + 4
        _run(inp, p)  # the first call of this configuration registers it
        before = records.LAUNCHES["nf4_dequant"]
        got = _run(inp, p)
        assert records.LAUNCHES["nf4_dequant"] - before == 3 + 4
    finally:
        monkeypatch.undo()
        _launch._sync_settings(mod)
    for name, g, w, h in zip(("y", "dx", "dA"), got[:3], want[:3], whole[:3]):
        assert torch.equal(w, h), f"{name}: chunked Python launchers differ from the whole temporary"
        assert torch.equal(g, w), f"{name}: the C++ path differs from the Python launchers"
    for name, g, w in zip(("dB", "dbias"), got[3:], whole[3:]):
        assert_rel_close(g, w, BF16, name)


@pytest.mark.parametrize("weight,p", [("dense", 0.1), ("nf4", 0.0)])
def test_split_sum_before_the_tma_gemm(monkeypatch, weight, p):
    """With _SPLIT_SUM_MAX_M above M the S and dS passes split before the TMA GEMM, which sums the fp32 slices and
    stores the rounded S / dS itself: the C++ path equals the Python launchers bit for bit (y, dx, dA), and both
    equal the one-slice layer within rounding."""
    from lora_ops.triton_kernels import lora as L
    from lora_ops.triton_kernels import records
    monkeypatch.setenv("LORA_OPS_TMA", "1")
    inp = _inputs(2048, 1024, 768, 16, BF16, weight, True)
    mod = _launch.module()
    try:
        monkeypatch.setattr(L, "_SPLIT_SUM_MAX_M", 0)  # the one-slice layer (the default splits at M = 2048)
        _launch._sync_settings(mod)
        whole = _run(inp, p)
        monkeypatch.setattr(L, "_SPLIT_SUM_MAX_M", 1 << 20)
        _launch._sync_settings(mod)
        want = _python_launchers(monkeypatch, lambda: _run(inp, p))
        _run(inp, p)  # the first call of this configuration registers it
        before = tma_launches(records.LAUNCHES)
        got = _run(inp, p)
        assert weight != "dense" or tma_launches(records.LAUNCHES) - before == 2  # forward and dX
    finally:
        monkeypatch.undo()  # the defaults again, in Python and (synced) in C++
        _launch._sync_settings(mod)
    for name, g, w in zip(("y", "dx", "dA"), got[:3], want[:3]):
        assert torch.equal(g, w), f"{name}: the C++ path differs from the Python launchers"
    for name, g, w in zip(("y", "dx", "dA", "dB", "dbias"), got, whole):
        assert_rel_close(g, w, BF16, name)


def test_layer_without_the_hopper_pieces(monkeypatch):
    """LORA_OPS_TMA=0 runs what an Ampere or Ada GPU runs (no TMA GEMM) at a shape where the H200 takes the TMA
    GEMM by default: no TMA launch, and the same layer within bf16 rounding."""
    from lora_ops.triton_kernels import records
    inp = _inputs(4096, 4096, 8192, 16, BF16, "dense", True)  # (an NF4 weight this size is chunked: no TMA)
    before = tma_launches(records.LAUNCHES)
    with_tma = _run(inp, 0.0)
    assert tma_launches(records.LAUNCHES) > before, "the default no longer takes the TMA GEMM at this shape"
    monkeypatch.setenv("LORA_OPS_TMA", "0")
    before = tma_launches(records.LAUNCHES)
    for _ in range(2):  # the first call registers the configuration, the second runs it from C++
        without = _run(inp, 0.0)
    assert tma_launches(records.LAUNCHES) == before, "LORA_OPS_TMA=0 still launched the TMA GEMM"
    for name, g, w in zip(("y", "dx", "dA", "dB", "dbias"), without, with_tma):
        assert_rel_close(g, w, BF16, name)


def test_needs_input_grad_is_honoured():
    inp = _inputs(128, 256, 256, 8, BF16, "nf4", True)
    for _ in range(2):
        x = inp["x"].detach().clone()  # no grad for x
        a = inp["a"].detach().clone()  # frozen A
        b = inp["b"].detach().clone().requires_grad_(True)
        y = lora_ops.lora_linear(x, inp["w"], a, b, 1.5, inp["bias"])
        y.backward(inp["dy"])
        assert x.grad is None and a.grad is None and b.grad is not None


def test_cuda_graph_capture_replays_the_layer():
    inp = _inputs(512, 1024, 1024, 16, BF16, "nf4-dq", True)
    layer = lora_ops.QLoRALinear.from_linear(torch.nn.Linear(1024, 1024, device="cuda", dtype=BF16), r=16,
                                             lora_alpha=32)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = inp["x"].detach().clone().requires_grad_(True)

    def step():
        y = layer(x)
        y.backward(inp["dy"])
        return y
    graph, y = capture_graph(step, (x, layer.lora_A, layer.lora_B))
    x2 = torch.randn_like(x)
    x.data.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    xe = x2.detach().clone().requires_grad_(True)
    for t in (layer.lora_A, layer.lora_B):
        t.grad = None
    ye = layer(xe)
    ye.backward(inp["dy"])
    assert torch.equal(y, ye)
    assert torch.equal(x.grad, xe.grad)


def test_compile_reduce_overhead_matches_eager():
    inp = _inputs(256, 512, 512, 16, BF16, "dense", False)
    layer = lora_ops.LoRALinear.from_linear(torch.nn.Linear(512, 512, device="cuda", dtype=BF16), r=16, lora_alpha=32)
    with torch.no_grad():
        layer.lora_B.normal_()
    compiled = torch.compile(layer, mode="reduce-overhead")
    for _ in range(4):
        # As a training loop's zero_grad(set_to_none=True): CUDA-graph trees do not let a gradient made by one
        # step's graphs be accumulated into by the next step's.
        layer.lora_A.grad = layer.lora_B.grad = None
        x = inp["x"].detach().clone().requires_grad_(True)
        y = compiled(x)
        y.backward(inp["dy"])
    xe = inp["x"].detach().clone().requires_grad_(True)
    ye = layer(xe)
    ye.backward(inp["dy"])
    assert_rel_close(y, ye, BF16, "y")
    assert_rel_close(x.grad, xe.grad, BF16, "dx")


@pytest.mark.parametrize("tma,weight", [("1", "dense"), ("0", "dense"), ("auto", "nf4")])
def test_group_rows_and_dy_segments_equal_block_diag(monkeypatch, tma, weight):
    """A q/k/v-like group through the C++ entry (``_launch.group``): with B_rows and the members' dY read in place
    (LORA_OPS_GROUP_B=rows, LORA_OPS_GROUP_DY=segments; sizes in whole 256-column units) the outputs, dX and dA
    equal the block_diag(B_i) way's bit for bit (the same products in the same order; zeros where B_bd has
    them), and dB_i within the dtype's tolerance (fp32 atomics). TMA GEMMs ("1"), pointer GEMMs ("0"), NF4."""
    monkeypatch.setenv("LORA_OPS_TMA", tma)
    monkeypatch.setenv("LORA_OPS_GROUP_FWD", "concat")
    monkeypatch.setenv("LORA_OPS_GROUP_BWD", "concat")
    inp = _group_inputs((512, 256, 256), 8, 512, 256, seed=3)
    weight_arg = inp["w"] if weight == "dense" else lora_ops.quantize_nf4(inp["w"], blocksize=64, double_quant=False)

    def run(b_way, dy_way):
        monkeypatch.setenv("LORA_OPS_GROUP_B", b_way)
        monkeypatch.setenv("LORA_OPS_GROUP_DY", dy_way)
        return _group_run(inp, weight_arg)

    want = run("blockdiag", "cat")
    for _ in range(2):  # the first call of each configuration runs the Python launchers, the second the C++ path
        got = run("rows", "segments")
    for i in range(3):
        assert torch.equal(got[0][i], want[0][i]), f"y_{i}"
        assert torch.equal(got[2][i], want[2][i]), f"dA_{i}"
        assert_rel_close(got[3][i], want[3][i], BF16, f"dB_{i}")
    assert torch.equal(got[1], want[1]), "dx"


@pytest.mark.parametrize("sizes,m,k,r,weight", [((64, 32, 32), 512, 64, 8, "nf4"),
                                                  ((512, 256, 256), 512, 256, 8, "dense"),
                                                  ((1024, 256, 256), 2048, 512, 16, "dense"),
                                                  ((1024, 256, 256), 2048, 512, 16, "nf4")])
def test_group_dropout_equals_block_diag_lora_linear(sizes, m, k, r, weight):
    """A group with dropout (what apply_lora's default grouping gives a model with lora_dropout > 0): its members'
    outputs and gradients are those of one lora_linear call over W_cat, cat(A_i), block_diag(B_i) with the same
    seed (one mask for the group), within bf16's tolerance; a different mask would differ by far more."""
    inp = _group_inputs(sizes, r, m, k, seed=4)
    w = inp["w"] if weight == "dense" else lora_ops.quantize_nf4(inp["w"], blocksize=64, double_quant=True)
    p = 0.2

    def grouped():
        x = inp["x"].clone().requires_grad_()
        As = [a.clone().requires_grad_() for a in inp["As"]]
        Bs = [b.clone().requires_grad_() for b in inp["Bs"]]
        torch.manual_seed(11)
        ys = _launch.group(x, w, As, Bs, [2.0] * len(As), None, p, True)
        assert ys is not None and ys[0].grad_fn.name().endswith("GroupFunction>")
        torch.autograd.backward(list(ys), inp["dys"])
        return torch.cat([y.detach() for y in ys], -1), x.grad, [a.grad for a in As], [b.grad for b in Bs]

    def composed():
        x = inp["x"].clone().requires_grad_()
        As = [a.clone().requires_grad_() for a in inp["As"]]
        Bs = [b.clone().requires_grad_() for b in inp["Bs"]]
        torch.manual_seed(11)
        y = lora_ops.lora_linear(x, w, torch.cat(As), torch.block_diag(*Bs), 2.0, dropout_p=p, training=True)
        y.backward(torch.cat(inp["dys"], -1))
        return y.detach(), x.grad, [a.grad for a in As], [b.grad for b in Bs]

    want = composed()
    for _ in range(2):  # the first call of a configuration runs the Python launchers, the second the C++ path
        got = grouped()
        assert_rel_close(got[0], want[0], BF16, "y")
        assert_rel_close(got[1], want[1], BF16, "dx")
        for i in range(len(sizes)):
            assert_rel_close(got[2][i], want[2][i], BF16, f"dA_{i}")
            assert_rel_close(got[3][i], want[3][i], BF16, f"dB_{i}")
    torch.manual_seed(12)  # another mask: far outside the tolerance (the comparison can fail)
    y_other = lora_ops.lora_linear(inp["x"], w, torch.cat(inp["As"]), torch.block_diag(*inp["Bs"]), 2.0,
                                   dropout_p=p, training=True)
    with pytest.raises(AssertionError):
        assert_rel_close(y_other, want[0], BF16, "y, another mask")


@pytest.mark.parametrize("m,tma", [(512, "1"), (512, "0"), (4096, "1")])
def test_group_ds_members_equal_rank_chunks(monkeypatch, m, tma):
    """LORA_OPS_DS_MEMBERS=1: a B_rows group's dS pass with one program per member over its own columns
    (MEMBER_R) gives the rank-chunk way's y bit for bit (the forward is unchanged) and dX, dA, dB within the
    dtype's tolerance (dS is summed over fewer, non-zero terms in another order); through the C++ entry, with dS
    in N slices (512 rows) and unsplit or in _DS_SPLITS slices (4096 rows)."""
    from lora_ops.triton_kernels import lora as L

    monkeypatch.setenv("LORA_OPS_TMA", tma)
    monkeypatch.setenv("LORA_OPS_GROUP_FWD", "concat")
    monkeypatch.setenv("LORA_OPS_GROUP_BWD", "concat")
    inp = _group_inputs((1024, 256, 256), 16, m, 512, seed=5, bias=True)

    def run(members):
        monkeypatch.setattr(L, "_DS_MEMBERS", members)
        _launch._sync_settings(_launch.module())
        return _group_run(inp)

    try:
        want = run(False)
        for _ in range(2):  # the first call of each configuration runs the Python launchers, the second the C++ path
            got = run(True)
    finally:
        monkeypatch.setattr(L, "_DS_MEMBERS", False)
        _launch._sync_settings(_launch.module())
    assert_rel_close(got[1], want[1], BF16, "dx")
    for i in range(3):
        assert torch.equal(got[0][i], want[0][i]), f"y_{i}"
        assert_rel_close(got[2][i], want[2][i], BF16, f"dA_{i}")
        assert_rel_close(got[3][i], want[3][i], BF16, f"dB_{i}")


@pytest.mark.parametrize("case", [(2048, 1024, 768, 16, BF16, "dense", True), (1024, 1024, 512, 16, BF16, "nf4", True),
                                  (512, 512, 384, 80, F32, "dense", True), (300, 512, 256, 8, F16, "nf4-dq", False)],
                         ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}-r{c[3]}-{str(c[4])[6:]}-{c[5]}")
def test_finish_kernel_equals_torch_sums_and_casts(monkeypatch, case):
    """The finish kernel (the default): dA's M-split partials, dB and dbias leave their fp32 buffers through one
    lora_bwd_finish launch from the C++ path (steady state: no Python launcher), with y and dx bit for bit the
    torch-finished call's and the gradients within the dtype's tolerance (the split sum's order may differ from
    torch's reduction; dB / dbias are fp32 atomics either way)."""
    from lora_ops.triton_kernels import lora as L
    from lora_ops.triton_kernels import records
    m, k, n, r, dtype, weight, bias = case
    inp = _inputs(m, k, n, r, dtype, weight, bias)
    mod = _launch.module()
    try:
        monkeypatch.setattr(L, "_FINISH_KERNEL", False)  # the reference: torch's sums and casts
        _launch._sync_settings(mod)
        want = _run(inp, 0.0)
        monkeypatch.setattr(L, "_FINISH_KERNEL", True)
        _launch._sync_settings(mod)
        _run(inp, 0.0)  # the first call of this configuration registers it
        before = _launch.launch_counts().get("lora_bwd_finish", 0)
        py_before = sum(records.LAUNCHES._py.values())
        got = _run(inp, 0.0)
        assert _launch.launch_counts().get("lora_bwd_finish", 0) == before + 1
        assert sum(records.LAUNCHES._py.values()) == py_before, "a Python launcher ran in steady state"
    finally:
        monkeypatch.undo()
        _launch._sync_settings(mod)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), "y / dx"
    for name, g, w in zip(("dA", "dB", "dbias"), got[2:], want[2:]):
        if w is not None:
            assert g.dtype == w.dtype and g.shape == w.shape, name
            assert_rel_close(g, w, dtype, name)


@pytest.mark.parametrize("b_way", ["rows", "blockdiag"])
def test_finish_kernel_in_the_group_backward(monkeypatch, b_way):
    """The group's stacked backward with the finish kernel: B_rows' gradient (one cast into (sum N_i, r)) or B_bd's
    (cast whole, each dB_i a view of its diagonal block), dA's partials summed, in one launch; every gradient
    within tolerance of the torch-finished group's."""
    from lora_ops.triton_kernels import lora as L
    monkeypatch.setenv("LORA_OPS_GROUP_FWD", "concat")
    monkeypatch.setenv("LORA_OPS_GROUP_BWD", "concat")
    monkeypatch.setenv("LORA_OPS_GROUP_B", b_way)
    inp = _group_inputs((1024, 256, 256), 16, 2048, 1024, seed=5)
    mod = _launch.module()
    try:
        monkeypatch.setattr(L, "_FINISH_KERNEL", False)  # the reference: torch's sums and casts
        _launch._sync_settings(mod)
        want = _group_run(inp)
        monkeypatch.setattr(L, "_FINISH_KERNEL", True)
        _launch._sync_settings(mod)
        _group_run(inp)
        before = _launch.launch_counts().get("lora_bwd_finish", 0)
        got = _group_run(inp)
        assert _launch.launch_counts().get("lora_bwd_finish", 0) == before + 1
    finally:
        monkeypatch.undo()
        _launch._sync_settings(mod)
    assert torch.equal(got[1], want[1]), "dx"
    for i in range(3):
        assert torch.equal(got[0][i], want[0][i]), f"y_{i}"
        for j, name in ((2, "dA"), (3, "dB")):
            assert got[j][i].shape == want[j][i].shape and got[j][i].is_contiguous(), f"{name}_{i}"
            assert_rel_close(got[j][i], want[j][i], BF16, f"{name}_{i}")


def test_host_timer_sees_the_launches_and_the_tma_encodes(monkeypatch):
    """launch_timing on the GPU: one forward and one backward run per fwd+bwd, with time in the driver's launches
    and, on TMA GEMMs, in encoding their descriptors (the descriptor cache off, which would make every encode a
    hit)."""
    monkeypatch.setenv("LORA_OPS_TMA", "1")
    monkeypatch.setenv("LORA_OPS_TMA_CACHE", "0")
    inp = _inputs(2048, 1024, 1024, 16, BF16, "dense", True)
    for _ in range(2):  # register, then steady state
        _run(inp, 0.0)
    mod = _launch.module()
    mod.launch_timing(True)
    try:
        for _ in range(3):
            _run(inp, 0.0)
        st = mod.launch_stats()
    finally:
        mod.launch_timing(False)
    assert st["timed_calls"] == 6, st
    assert st["host_ns"]["launch"] > 0 and st["host_ns"]["encode"] > 0 and st["host_ns"]["build"] > 0, st


def test_tma_descriptor_cache_hits_and_keeps_results(monkeypatch):
    """The descriptor cache (on unless LORA_OPS_TMA_CACHE=0): the TMA GEMMs' descriptors come from the cache of
    encodes once their addresses repeat (hits counted in launch_stats), with y, dx and dA bit for bit those of
    fresh encodes."""
    monkeypatch.setenv("LORA_OPS_TMA", "1")
    monkeypatch.setenv("LORA_OPS_TMA_CACHE", "0")
    inp = _inputs(2048, 1024, 1024, 16, BF16, "dense", True)
    want = _run(inp, 0.0)
    _run(inp, 0.0)
    monkeypatch.setenv("LORA_OPS_TMA_CACHE", "1")
    mod = _launch.module()
    hits0, misses0 = mod.launch_stats()["tma_cache"]
    for _ in range(3):
        got = _run(inp, 0.0)
    hits, misses = mod.launch_stats()["tma_cache"]
    assert hits > hits0 and misses >= misses0, (hits0, misses0, hits, misses)
    for name, g, w in zip(("y", "dx", "dA"), got[:3], want[:3]):
        assert torch.equal(g, w), name
    for name, g, w in zip(("dB", "dbias"), got[3:], want[3:]):
        assert_rel_close(g, w, BF16, name)


@pytest.mark.parametrize("case", [(2048, 1024, 768, 16, BF16, "dense", True), (1024, 1024, 512, 16, BF16, "nf4", False),
                                  (512, 512, 384, 80, F32, "dense", True)],
                         ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}-r{c[3]}-{str(c[4])[6:]}-{c[5]}")
def test_base_mm_equals_the_python_launchers_and_the_fused_gemms(monkeypatch, case):
    """LORA_OPS_BASE_MM=1: the base products from torch's matmul (cuBLAS) added to the GEMM kernel's LoRA term.
    The C++ path (steady state) equals the Python launchers' composition bit for bit (y, dx, dA), and both are
    within the dtype's tolerance of the fused GEMMs (the LoRA term is rounded once more)."""
    from lora_ops.triton_kernels import lora as L
    m, k, n, r, dtype, weight, bias = case
    inp = _inputs(m, k, n, r, dtype, weight, bias)
    fused = _run(inp, 0.1)
    mod = _launch.module()
    try:
        monkeypatch.setattr(L, "_BASE_MM", 3)
        _launch._sync_settings(mod)
        want = _python_launchers(monkeypatch, lambda: _run(inp, 0.1))
        _run(inp, 0.1)  # the first call of this configuration registers it
        got = _run(inp, 0.1)
    finally:
        monkeypatch.undo()
        _launch._sync_settings(mod)
    for name, g, w in zip(("y", "dx", "dA"), got[:3], want[:3]):
        assert torch.equal(g, w), f"{name}: the C++ path differs from the Python launchers"
    for name, g, f in zip(("y", "dx", "dA", "dB", "dbias"), got, fused):
        if f is not None:
            assert_rel_close(g, f, dtype, name)
