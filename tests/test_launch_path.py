"""The C++ launch path (csrc/lora_launch.cpp) builds exactly the launches the Python launchers make.

On CPU the extension cannot launch anything, but a CPU build of the same file can do its dry run: the list of
kernel launches (kernel, grid, every argument) it would make for a call. These tests run the Python launchers
under Triton's interpreter inside ``records.recording()``, register the records with the dry-run build and
require its launch list to equal them (``lora_ops._launch._register``, strict), for the forward and every
backward variant: dense and NF4 (plain and double-quantized), bias, dropout, ranks over one chunk, deterministic
mode, strided inputs, the TMA GEMM. On the GPU the same comparison guards every new configuration at run time
(tests/test_lora_gpu.py runs with LORA_OPS_LAUNCH_STRICT=1).
"""
import os
import shutil

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_ops
from helpers import assert_rel_close
from lora_ops import _launch

pytest.importorskip("triton")
if torch.cuda.is_available() or not lora_ops._backend.triton_interpreter():
    pytest.skip("the dry-run build is for CPU machines (the GPU tests check the real one)", allow_module_level=True)
L = pytest.importorskip("lora_ops.triton_kernels.lora")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def dry():
    if shutil.which("ninja") is None:
        pytest.skip("ninja is needed to build the dry-run module (pip install ninja)")
    from torch.utils import cpp_extension

    build = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lora_ops",
                         "launch_dry-" + torch.__version__.replace("+", "_"))
    os.makedirs(build, exist_ok=True)
    mod = cpp_extension.load(name="lora_ops_launch_dry",
                             sources=[os.path.join(ROOT, "csrc", "lora_launch.cpp"),
                                      os.path.join(HERE, "cpp", "launch_dry_module.cpp")],
                             extra_cflags=["-O1"], build_directory=build, verbose=False)
    assert not mod.launch_has_cuda
    saved = (_launch._module, _launch._state)
    _launch.use_module(mod)
    _launch._ensure_device(torch.device("cpu"))
    yield mod
    _launch._module, _launch._state = saved
    _launch._devices.clear()


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    monkeypatch.setenv("LORA_OPS_LAUNCH_STRICT", "1")
    monkeypatch.delenv("LORA_OPS_TMA", raising=False)


def _inputs(m, k, n, r, dtype, weight="dense", bias=True, p=0.0, seed=0, x_t=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    if x_t:  # a transposed view: strides (1, m)
        x = torch.randn(k, m, generator=g).to(dtype).t()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    if weight == "dense":
        wargs, bs = (w, None, None, None, None), 0
    else:
        w4 = lora_ops.quantize_nf4(w, blocksize=64, double_quant=weight == "nf4-dq")
        wargs, bs = w4.tensors(), w4.blocksize
    a = (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype)
    b = (torch.randn(n, r, generator=g) / r ** 0.5).to(dtype)
    bias_t = torch.randn(n, generator=g).to(dtype) if bias else None
    seed_t = torch.tensor(12345, dtype=torch.int64) if p > 0 else None
    fwd = (x, *wargs, bs, a, b, 1.5, bias_t, p, seed_t)
    return fwd, torch.randn(m, n, generator=g).to(dtype)


def _check(dry, phase, args, groups=()):
    args = (*args, list(groups))  # the C++ entries' and the fallback's argument list ends with the group sizes
    res = (dry.launch_fwd if phase == 0 else dry.launch_bwd)(*args, True)
    assert type(res) is tuple, f"the dry run refused the call ({res})"
    launcher = L.lora_forward if phase == 0 else L.lora_backward
    with L.recording() as records:
        out = launcher(*args)
    assert records, "the Python launcher recorded no launch"
    assert _launch._register(dry, phase, res[0], args, list(records))  # strict: raises with the differences
    return out


CASES = [
    dict(m=70, k=96, n=80, r=8, dtype=torch.float32),
    dict(m=70, k=96, n=80, r=8, dtype=torch.float16, bias=False),
    dict(m=33, k=64, n=48, r=16, dtype=torch.float16, p=0.25),
    dict(m=40, k=64, n=64, r=80, dtype=torch.float32, p=0.1),  # two rank chunks
    dict(m=70, k=128, n=64, r=8, dtype=torch.float16, weight="nf4"),
    dict(m=70, k=128, n=64, r=8, dtype=torch.float32, weight="nf4-dq", p=0.1),
    dict(m=48, k=64, n=32, r=4, dtype=torch.float32, x_t=True),
    # K and N of two or more split units: S and dS in fp32 slices, summed and stored rounded by the GEMMs.
    dict(m=37, k=200, n=136, r=8, dtype=torch.float32, p=0.2),
    dict(m=21, k=136, n=200, r=80, dtype=torch.float16, weight="nf4-dq"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_forward_and_backward_launch_lists_equal_python(dry, case):
    fwd, dy = _inputs(**case)
    y, s = _check(dry, 0, fwd)
    x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p, seed = fwd
    for need in [(True, True, True, bias is not None), (True, False, False, False), (False, True, True, False),
                 (False, False, True, bias is not None)]:
        _check(dry, 1, (dy, x, w, absmax, nabs, ncode, offset, bs, a, b, s, scaling, p, seed, *need))


def test_deterministic_backward(dry):
    fwd, dy = _inputs(m=70, k=64, n=64, r=8, dtype=torch.float32, bias=True)
    y, s = _check(dry, 0, fwd)
    x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p, seed = fwd
    torch.use_deterministic_algorithms(True)
    try:
        _check(dry, 1, (dy, x, w, absmax, nabs, ncode, offset, bs, a, b, s, scaling, p, seed, True, True, True, True))
    finally:
        torch.use_deterministic_algorithms(False)


def test_tma_gemm_launch_lists(dry, monkeypatch):
    monkeypatch.setenv("LORA_OPS_TMA", "1")
    # K and N of two split units: S and dS in two fp32 slices, which the TMA GEMMs sum and store rounded
    # (LORA_OPS_SPLIT_PRESUM=0; by default one finish launch sums them first, the next test).
    monkeypatch.setattr(L, "_PRESUM", False)
    _launch._sync_settings(dry)
    fwd, dy = _inputs(m=64, k=128, n=128, r=16, dtype=torch.float16, bias=True, p=0.1)
    try:
        y, s = _check(dry, 0, fwd)
        assert any(r[0] == "lora_gemm_tma" for r in dry.launch_fwd(*fwd, [], True)[1])
        x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p, seed = fwd
        bargs = (dy, x, w, absmax, nabs, ncode, offset, bs, a, b, s, scaling, p, seed, True, True, True, True)
        _check(dry, 1, bargs)
        with L.recording() as records, _SumCounter() as sums:
            y2, s2 = L.lora_forward(*fwd)
            forward_sums = sums.n
            L.lora_backward(*bargs)
    finally:
        monkeypatch.undo()
        _launch._sync_settings(dry)
    grids = {r.name: r.grid for r in records}
    assert grids["lora_s"][2] == 2 and grids["lora_bwd_ds"][2] == 2, grids
    assert [r.name for r in records].count("lora_gemm_tma") == 2
    # No torch reduction of the S / dS slices: the GEMMs sum them and store the rounded S (dS). The one sum left
    # is dA's over its M splits, which the finish kernel does (torch with LORA_OPS_FINISH_KERNEL=0).
    assert (forward_sums, sums.n) == (0, 1 - L._FINISH_KERNEL)
    if L._FINISH_KERNEL:
        assert records[-1].name == "lora_bwd_finish", [r.name for r in records]
    keep = lora_ops.reference.dropout_mask(int(seed), *x.shape, p)
    xd = torch.where(keep, x.float() / (1 - p), torch.zeros(()))
    torch.testing.assert_close(s2.float(), xd @ a.float().t(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("finish", [True, False], ids=["finish-kernel", "torch"])
def test_presum_hands_the_tma_gemms_rounded_s_and_ds(dry, monkeypatch, finish):
    """LORA_OPS_SPLIT_PRESUM (the default): S and dS still split before the TMA GEMMs, but each pass's slices are
    summed and rounded right after it (one finish launch; torch's sum without the finish kernel) and the GEMMs read
    the rounded S / dS: the C++ launch lists equal Python's, each pass is reduced once, and the outputs and
    gradients equal the GEMM-summed way's (LORA_OPS_SPLIT_PRESUM=0) within the dtype's tolerance."""
    monkeypatch.setenv("LORA_OPS_TMA", "1")
    fwd, dy = _inputs(m=64, k=128, n=128, r=16, dtype=torch.float16, bias=True, p=0.1)
    x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p, seed = fwd
    try:
        monkeypatch.setattr(L, "_PRESUM", False)
        y0, s0 = L.lora_forward(*fwd)
        bargs = (dy, x, w, absmax, nabs, ncode, offset, bs, a, b, s0, scaling, p, seed, True, True, True, True)
        want = L.lora_backward(*bargs)
        monkeypatch.setattr(L, "_PRESUM", True)
        monkeypatch.setattr(L, "_FINISH_KERNEL", finish)
        _launch._sync_settings(dry)
        y, s = _check(dry, 0, fwd)
        got = _check(dry, 1, bargs)
        with L.recording() as records, _SumCounter() as sums:
            L.lora_forward(*fwd)
            forward_sums, forward_launches = sums.n, len(records)
            L.lora_backward(*bargs)
    finally:
        monkeypatch.undo()
        _launch._sync_settings(dry)
    names = [r.name for r in records]
    grids = {r.name: r.grid for r in records}
    assert grids["lora_s"][2] == 2 and grids["lora_bwd_ds"][2] == 2, grids
    assert names.count("lora_gemm_tma") == 2
    if finish:
        # Right after each pass, and the backward's gradients at the end.
        assert names[:forward_launches] == ["lora_s", "lora_bwd_finish", "lora_gemm_tma"], names
        bwd = names[forward_launches:]
        assert bwd[:3] == ["lora_bwd_ds", "lora_bwd_finish", "lora_gemm_tma"] and bwd[-1] == "lora_bwd_finish", bwd
        assert (forward_sums, sums.n) == (0, 0)
    else:
        # Counted from the forward on: S's slices once, then dS's once, then dA's M splits.
        assert "lora_bwd_finish" not in names and (forward_sums, sums.n) == (1, 3), (names, forward_sums, sums.n)
    assert_rel_close(s, s0, torch.float16, "S")
    assert_rel_close(y, y0, torch.float16, "y")
    for name, gv, wv in zip(("dx", "dA", "dB", "dbias"), got, want):
        assert_rel_close(gv, wv, torch.float16, name)


class _SumCounter(TorchDispatchMode):
    """Counts aten.sum calls (torch reductions) inside the block."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket is torch.ops.aten.sum
        return func(*args, **(kwargs or {}))


def test_nf4_chunks_take_the_tma_gemm_by_the_layers_shape(dry, monkeypatch):
    """By default (LORA_OPS_TMA auto) a chunk of a chunked NF4 weight runs on the TMA GEMM when the whole layer's
    N*K passes the rule, though the chunk's own N*K does not: in the C++ path as in the Python launchers."""
    try:
        monkeypatch.setattr(L, "_DEQUANT_ON_CPU", True)
        monkeypatch.setattr(L, "NF4_CHUNK_BYTES", 40 * 256 * 2)
        monkeypatch.setattr(L, "NF4_CHUNK_MIN_M", 0)
        monkeypatch.setattr(L, "_TMA_MIN_M", 64)
        monkeypatch.setattr(L, "_TMA_MIN_NK", 256 * 136)
        monkeypatch.setattr(L, "_TMA_MIN_MNK", 64 * 256 * 136)
        _launch._sync_settings(dry)
        fwd, dy = _inputs(m=64, k=256, n=136, r=8, dtype=torch.float16, weight="nf4", p=0.1)
        y, s = _check(dry, 0, fwd)
        names = [r[0] for r in dry.launch_fwd(*fwd, [], True)[1]]
        assert names.count("nf4_dequant") > 1 and names.count("nf4_dequant") == names.count("lora_gemm_tma"), names
        x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p_, seed = fwd
        bargs = (dy, x, w, absmax, nabs, ncode, offset, bs, a, b, s, scaling, p_, seed, True, True, True, True)
        _check(dry, 1, bargs)
        names = [r[0] for r in dry.launch_bwd(*bargs, [], True)[1]]
        assert names.count("nf4_dequant") > 1 and names.count("nf4_dequant") == names.count("lora_gemm_tma"), names
        for name, bound in (("_TMA_MIN_NK", 256 * 136 + 1), ("_TMA_MIN_MNK", 64 * 256 * 136 + 1)):
            monkeypatch.setattr(L, name, bound)  # the layer below one bound of the rule: pointer GEMMs only
            _launch._sync_settings(dry)
            assert "lora_gemm_tma" not in [r[0] for r in dry.launch_fwd(*fwd, [], True)[1]], name
            assert "lora_gemm_tma" not in [r[0] for r in dry.launch_bwd(*bargs, [], True)[1]], name
            _check(dry, 0, fwd)
            _check(dry, 1, bargs)
            monkeypatch.setattr(L, name, bound - 1)
    finally:
        monkeypatch.undo()
        _launch._sync_settings(dry)


@pytest.mark.parametrize("weight", ["dense", "nf4"])
def test_split_sum_before_a_one_slice_gemm(dry, monkeypatch, weight):
    """Up to _SPLIT_SUM_MAX_M rows S and dS split before the TMA GEMM, which sums the slices (dense), or before a
    chunked temporary's GEMMs, after one reduction (NF4): the C++ launch lists equal Python's, and the S / dS
    launches have a slice grid."""
    try:
        monkeypatch.setattr(L, "_SPLIT_SUM_MAX_M", 1 << 20)
        if weight == "dense":
            monkeypatch.setenv("LORA_OPS_TMA", "1")
            dtype = torch.float16
        else:
            monkeypatch.setattr(L, "_DEQUANT_ON_CPU", True)
            monkeypatch.setattr(L, "NF4_CHUNK_BYTES", 40 * 256 * 4)
            monkeypatch.setattr(L, "NF4_CHUNK_MIN_M", 0)
            dtype = torch.float32
        _launch._sync_settings(dry)
        fwd, dy = _inputs(m=70, k=256, n=136, r=8, dtype=dtype, weight=weight)
        y, s = _check(dry, 0, fwd)
        recs = dry.launch_fwd(*fwd, [], True)[1]
        assert any(r[0] == "lora_s" for r in recs) and ("lora_gemm_tma" if weight == "dense" else "nf4_dequant") in \
            [r[0] for r in recs], [r[0] for r in recs]
        x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p_, seed = fwd
        torch.testing.assert_close(s.float(), x.float() @ a.float().t(), rtol=2e-3, atol=2e-3)
        bargs = (dy, x, w, absmax, nabs, ncode, offset, bs, a, b, s, scaling, p_, seed, True, True, True, True)
        _check(dry, 1, bargs)
        with L.recording() as records:
            L.lora_forward(*fwd)
            L.lora_backward(*bargs)
        grids = {r.name: r.grid for r in records}
        assert grids["lora_s"][2] > 1 and grids["lora_bwd_ds"][2] > 1, grids
    finally:
        monkeypatch.undo()
        _launch._sync_settings(dry)


@pytest.mark.parametrize("ds_splits", [4, 1])
def test_ds_slices_above_the_split_sum_bound(dry, monkeypatch, ds_splits):
    """Above _SPLIT_SUM_MAX_M rows, before the TMA dX GEMM (which sums them), the dS pass still runs in _DS_SPLITS
    slices of N; S keeps one slice. The C++ launch lists equal Python's."""
    try:
        monkeypatch.setattr(L, "_SPLIT_SUM_MAX_M", 32)
        monkeypatch.setattr(L, "_DS_SPLITS", ds_splits)
        monkeypatch.setenv("LORA_OPS_TMA", "1")
        _launch._sync_settings(dry)
        fwd, dy = _inputs(m=70, k=256, n=136, r=8, dtype=torch.float16, weight="dense")
        y, s = _check(dry, 0, fwd)
        x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p_, seed = fwd
        bargs = (dy, x, w, absmax, nabs, ncode, offset, bs, a, b, s, scaling, p_, seed, True, True, True, True)
        dx, da, db, dbias = _check(dry, 1, bargs)
        assert "lora_gemm_tma" in [r[0] for r in dry.launch_bwd(*bargs, [], True)[1]]
        with L.recording() as records:
            L.lora_forward(*fwd)
            L.lora_backward(*bargs)
        grids = {r.name: r.grid for r in records}
        # 136 columns in units of 64 (the interpreter's): two slices of 128 and 8 columns.
        assert grids["lora_s"][2] == 1 and grids["lora_bwd_ds"][2] == (2 if ds_splits > 1 else 1), grids
        ds = (dy.float() @ b.float()) * scaling
        torch.testing.assert_close(da.float(), ds.t() @ x.float(), rtol=2e-2, atol=2e-2)
    finally:
        monkeypatch.undo()
        _launch._sync_settings(dry)


def test_nf4_chunks_only_from_the_chunk_min_m(dry, monkeypatch):
    """Below NF4_CHUNK_MIN_M rows the NF4 temporary is made whole even past NF4_CHUNK_BYTES, in the C++ path as in
    the Python launchers; from it, in chunks."""
    try:
        monkeypatch.setattr(L, "_DEQUANT_ON_CPU", True)
        monkeypatch.setattr(L, "NF4_CHUNK_BYTES", 40 * 256 * 4)
        fwd, dy = _inputs(m=70, k=256, n=136, r=8, dtype=torch.float32, weight="nf4")
        x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p_, seed = fwd
        for min_m, chunked in ((71, False), (70, True)):
            monkeypatch.setattr(L, "NF4_CHUNK_MIN_M", min_m)
            _launch._sync_settings(dry)
            y, s = _check(dry, 0, fwd)
            names = [r[0] for r in dry.launch_fwd(*fwd, [], True)[1]]
            assert (names.count("nf4_dequant") > 1) == chunked, names
            bargs = (dy, x, w, absmax, nabs, ncode, offset, bs, a, b, s, scaling, p_, seed, True, True, True, True)
            _check(dry, 1, bargs)
            names = [r[0] for r in dry.launch_bwd(*bargs, [], True)[1]]
            assert (names.count("nf4_dequant") > 1) == chunked, names
    finally:
        monkeypatch.undo()
        _launch._sync_settings(dry)


def test_db_without_atomics_above_the_atomic_limit(dry, monkeypatch):
    """Above _ATOMIC_DB_MAX_M rows dB and dbias leave the dS pass for the atomic-free dB kernel, in the C++ path as
    in the Python launchers; at or below it they ride along as atomics."""
    fwd, dy = _inputs(m=70, k=96, n=80, r=8, dtype=torch.float32, bias=True)
    y, s = _check(dry, 0, fwd)
    x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p_, seed = fwd
    bargs = (dy, x, w, absmax, nabs, ncode, offset, bs, a, b, s, scaling, p_, seed, True, True, True, True)
    try:
        for limit, separate in ((70, False), (69, True)):
            monkeypatch.setattr(L, "_ATOMIC_DB_MAX_M", limit)
            _launch._sync_settings(dry)
            _check(dry, 1, bargs)
            names = [r[0] for r in dry.launch_bwd(*bargs, [], True)[1]]
            assert ("lora_bwd_db" in names) == separate, names
    finally:
        monkeypatch.undo()
        _launch._sync_settings(dry)


FINISH_CASES = [
    # fp32: dB stays the atomic buffer itself; dbias is copied out of it (the outputs may not alias).
    dict(m=70, k=96, n=80, r=8, dtype=torch.float32),
    dict(m=70, k=96, n=80, r=8, dtype=torch.float16),
    dict(m=33, k=64, n=48, r=16, dtype=torch.float16, bias=False, p=0.25),
    dict(m=41, k=136, n=200, r=80, dtype=torch.float16, weight="nf4-dq"),  # two rank chunks
]


@pytest.mark.parametrize("way", ["atomics", "db-kernel", "deterministic"])
@pytest.mark.parametrize("case", FINISH_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_finish_kernel_launch_lists_and_values(dry, monkeypatch, case, way):
    """The finish kernel (the default): dA's M-split partials and dB / dbias (the dS pass's atomic buffer, or the dB
    kernel's partials) leave their fp32 buffers in one lora_bwd_finish launch, the last one, in the C++ list as in
    the Python launchers'; the gradients equal torch's sums and casts bit for bit (the interpreter's two M splits
    are one fp32 addition either way)."""
    fwd, dy = _inputs(**case)
    x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p_, seed = fwd
    y, s = L.lora_forward(*fwd)
    has_bias = bias is not None
    calls = [(dy, x, w, absmax, nabs, ncode, offset, bs, a, b, s, scaling, p_, seed, *need)
             for need in [(True, True, True, has_bias), (False, True, True, False), (False, False, True, has_bias),
                          (True, False, False, False)]]
    try:
        if way == "db-kernel":
            monkeypatch.setattr(L, "_ATOMIC_DB_MAX_M", 0)
        torch.use_deterministic_algorithms(way == "deterministic")
        monkeypatch.setattr(L, "_FINISH_KERNEL", False)  # the reference: torch's sums and casts
        want = [L.lora_backward(*c) for c in calls]
        finished = 0
        monkeypatch.setattr(L, "_FINISH_KERNEL", True)
        _launch._sync_settings(dry)
        for c, w_ in zip(calls, want):
            got = _check(dry, 1, c)
            names = [r[0] for r in dry.launch_bwd(*c, [], True)[1]]
            # One launch for the gradients, after every other; another one only right after a split dS pass
            # (summing its slices where no dX GEMM does).
            assert all(names[i - 1] == "lora_bwd_ds" for i, v in enumerate(names[:-1]) if v == "lora_bwd_finish"), \
                names
            finished += names[-1] == "lora_bwd_finish"
            assert names[-1] != "lora_bwd_finish" or any(c[-3:]), names  # never for dX alone
            for name, g_, e in zip(("dx", "dA", "dB", "dbias"), got, w_):
                assert g_.dtype == e.dtype and torch.equal(g_, e), name
        assert finished >= 2, "the finish kernel ran for fewer than two of the calls"
    finally:
        torch.use_deterministic_algorithms(False)
        monkeypatch.undo()
        _launch._sync_settings(dry)


BASE_MM_CASES = [
    dict(m=70, k=96, n=80, r=8, dtype=torch.float32, p=0.2),
    dict(m=70, k=96, n=80, r=8, dtype=torch.float16, bias=False),
    dict(m=40, k=64, n=64, r=80, dtype=torch.float32, x_t=True),  # two rank chunks, x a transposed view
    dict(m=70, k=128, n=64, r=8, dtype=torch.float32, weight="nf4-dq"),  # decoded in the K-loop: no base_mm
    dict(m=70, k=128, n=64, r=8, dtype=torch.float32, weight="nf4", dequant=True),  # dequantized whole: base_mm
]


@pytest.mark.parametrize("way", [3, 1, 2], ids=["both", "fwd", "dx"])
@pytest.mark.parametrize("case", BASE_MM_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_base_mm_launch_lists_and_values(dry, monkeypatch, case, way):
    """LORA_OPS_BASE_MM=1 / fwd / dx: where W is dense in one piece, the forward and / or dX GEMM launch with an
    empty K-loop (their LoRA term, bias and dropout alone) and torch's addmm_ adds x @ W^T / dY @ W after them.
    The C++ launch lists equal the Python launchers'; y, dx, dA, dB and dbias equal the fused kernels' within the
    dtype's tolerance (the LoRA term is rounded once more). An NF4 weight decoded in the K-loop keeps the fused
    GEMMs."""
    case = dict(case)
    dequant = case.pop("dequant", False)
    fwd, dy = _inputs(**case)
    x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p_, seed = fwd
    dt = case["dtype"]
    needs = [(True, True, True, bias is not None), (True, False, False, False)]
    try:
        monkeypatch.setattr(L, "_DEQUANT_ON_CPU", dequant)
        _launch._sync_settings(dry)
        y0, s0 = L.lora_forward(*fwd)
        want = [L.lora_backward(dy, *fwd[:9], s0, scaling, p_, seed, *need) for need in needs]
        monkeypatch.setattr(L, "_BASE_MM", way)
        _launch._sync_settings(dry)
        y, s = _check(dry, 0, fwd)
        got = [_check(dry, 1, (dy, *fwd[:9], s, scaling, p_, seed, *need)) for need in needs]
        with L.recording() as records:
            L.lora_forward(*fwd)
            L.lora_backward(dy, *fwd[:9], s, scaling, p_, seed, *needs[0])
    finally:
        monkeypatch.undo()
        _launch._sync_settings(dry)
    gemms = [r_ for r_ in records if r_.name in ("lora_fwd", "lora_bwd_dx")]
    assert len(gemms) == 2
    dense = case.get("weight", "dense") == "dense" or dequant
    for r_ in gemms:
        empty = dense and bool(way & (L._BASE_MM_FWD if r_.name == "lora_fwd" else L._BASE_MM_DX))
        assert (r_.args[r_.fn.arg_names.index("K")] == 0) == empty, (r_.name, empty)
    assert_rel_close(s, s0, dt, "S")
    assert_rel_close(y, y0, dt, "y")
    for g_, w_ in zip(got, want):
        for name, gv, wv in zip(("dx", "dA", "dB", "dbias"), g_, w_):
            assert gv.shape == wv.shape, name
            if gv.numel():
                assert_rel_close(gv, wv, dt, name)


@pytest.mark.parametrize("way", [3, 1, 2], ids=["both", "fwd", "dx"])
def test_base_mm_in_a_group(dry, monkeypatch, way):
    """LORA_OPS_BASE_MM=1 / fwd / dx in a B_rows group's stacked calls: the LoRA term of block_diag(B_i) alone,
    then addmm_ over W_cat; for the dX GEMM dY as the members' tensors is concatenated first (torch's matmul takes
    one tensor), in the C++ path as in the Python launchers; values within tolerance of the fused kernels'."""
    sizes, rb = (128, 64, 64), 8
    fwd, dy = _inputs(m=70, k=128, n=sum(sizes), r=rb * len(sizes), dtype=torch.float32, bias=True)
    x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p_, seed = fwd
    b = b[:, :rb].contiguous()
    rows = (x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p_, seed)
    dys = [t.contiguous() for t in dy.split(list(sizes), 1)]
    y0, s0 = L.lora_forward(*rows, list(sizes))
    want = L.lora_backward(dys, *rows[:8], b, s0, scaling, p_, seed, True, True, True, True, list(sizes))
    try:
        monkeypatch.setattr(L, "_BASE_MM", way)
        _launch._sync_settings(dry)
        y, s = _check(dry, 0, rows, sizes)
        got = _check(dry, 1, (dy, *rows[:8], b, s, scaling, p_, seed, True, True, True, True), sizes)
        segs = L._segments_ok(dys, L._group(list(sizes), sum(sizes), rb * len(sizes)), x.device)
        assert segs == (way == L._BASE_MM_FWD)
    finally:
        monkeypatch.undo()
        _launch._sync_settings(dry)
    assert_rel_close(y, y0, torch.float32, "y")
    for name, gv, wv in zip(("dx", "dA", "dB", "dbias"), got, want):
        assert_rel_close(gv, wv, torch.float32, name)


@pytest.mark.parametrize("b_way", ["rows", "block_diag"])
def test_finish_kernel_in_a_group_backward(dry, monkeypatch, b_way):
    """The finish launch in a projection group's stacked backward: B_rows' (sum N_i, r) gradient, or B_bd's whole
    (sum N_i, sum r_i) one, cast in the same launch as dA's partials are summed; launch lists equal Python's and
    the gradients equal the call without the finish kernel bit for bit."""
    sizes, rb = (64, 32, 32), 8
    fwd, dy = _inputs(m=70, k=128, n=sum(sizes), r=rb * len(sizes), dtype=torch.float16, bias=True)
    x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p_, seed = fwd
    groups = sizes if b_way == "rows" else ()
    if groups:
        b = b[:, :rb].contiguous()
    y, s = L.lora_forward(x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p_, seed, list(groups) or None)
    call = (dy, x, w, absmax, nabs, ncode, offset, bs, a, b, s, scaling, p_, seed, True, True, True, True)
    try:
        monkeypatch.setattr(L, "_FINISH_KERNEL", False)  # the reference: torch's sums and casts
        want = L.lora_backward(*call, list(groups) or None)
        monkeypatch.setattr(L, "_FINISH_KERNEL", True)
        _launch._sync_settings(dry)
        got = _check(dry, 1, call, groups)
        names = [r[0] for r in dry.launch_bwd(*call, list(groups), True)[1]]
        assert names[-1] == "lora_bwd_finish", names
        assert got[2].shape == b.shape
        for name, g_, e in zip(("dx", "dA", "dB", "dbias"), got, want):
            assert torch.equal(g_, e), name
    finally:
        monkeypatch.undo()
        _launch._sync_settings(dry)


B_ROWS_CASES = [(setting, dy_way, False) for dy_way in ("cat", "segments")
                for setting in ("pointer", "tma", "nf4-chunks", "nf4-chunks-tma", "deterministic", "ds-slices")]
# LORA_OPS_DS_MEMBERS=1: the dS pass's programs per member.
B_ROWS_CASES += [("pointer", "cat", True), ("tma", "segments", True), ("ds-slices", "segments", True),
                 ("ds-slices", "cat", True), ("nf4-chunks", "cat", True), ("deterministic", "cat", True)]


@pytest.mark.parametrize("setting,dy_way,members", B_ROWS_CASES, ids=lambda v: str(v))
def test_group_b_rows_launch_lists_and_values(dry, monkeypatch, setting, dy_way, members):
    """A projection group's stacked call with B_rows = cat(B_i) and the members' sizes (``groups``): the C++ launch
    lists equal the Python launchers' on the pointer and TMA GEMMs, NF4 chunks (boundaries seen from each chunk's
    first column), the atomic-free dB kernel and dS slices; y, dX, dA equal the call on block_diag(B_i), and dB is
    that call's diagonal blocks, stacked. ``dy_way`` "segments": the backward takes dY as the members' own tensors
    (sizes in whole split units), which the dS / dB kernels and the dX GEMM read as they are (SEG_DY / SEG_A),
    with the same values as on cat(dY_i). ``members`` (LORA_OPS_DS_MEMBERS=1): the dS pass runs one program per
    member over its own columns (MEMBER_R, grid[1] = the member count), with the same values."""
    sizes, rb = ((64, 40, 32) if dy_way == "cat" else (128, 64, 64)), 8
    dtype, weight = torch.float32, "dense"
    try:
        monkeypatch.setattr(L, "_DS_MEMBERS", members)
        if setting == "tma":
            monkeypatch.setenv("LORA_OPS_TMA", "1")
            dtype = torch.float16
        elif setting.startswith("nf4-chunks"):
            monkeypatch.setattr(L, "_DEQUANT_ON_CPU", True)
            monkeypatch.setattr(L, "NF4_CHUNK_BYTES", 40 * 256 * 4)
            monkeypatch.setattr(L, "NF4_CHUNK_MIN_M", 0)
            weight = "nf4"
            if setting.endswith("tma"):  # each chunk's GEMM on the TMA kernel (16-bit)
                monkeypatch.setenv("LORA_OPS_TMA", "1")
                dtype = torch.float16
        elif setting == "ds-slices":
            monkeypatch.setattr(L, "_SPLIT_SUM_MAX_M", 32)
            monkeypatch.setenv("LORA_OPS_TMA", "1")
            dtype = torch.float16
        _launch._sync_settings(dry)
        fwd, dy = _inputs(m=70, k=256, n=sum(sizes), r=rb * len(sizes), dtype=dtype, weight=weight, bias=True)
        x, w, absmax, nabs, ncode, offset, bs, a, b_bd, scaling, bias, p_, seed = fwd
        b_rows = b_bd[:, :rb].contiguous()
        n0 = 0
        for i, ni in enumerate(sizes):  # b_bd: block diagonal, member i's block the rows' B_i
            b_bd[n0:n0 + ni] = 0
            b_bd[n0:n0 + ni, i * rb:(i + 1) * rb] = b_rows[n0:n0 + ni]
            n0 += ni
        rows = (x, w, absmax, nabs, ncode, offset, bs, a, b_rows, scaling, bias, p_, seed)
        y, s = _check(dry, 0, rows, sizes)
        y_bd, s_bd = L.lora_forward(*fwd)
        assert torch.equal(s, s_bd)
        torch.testing.assert_close(y, y_bd, rtol=1e-6, atol=1e-6)
        if setting.startswith("nf4-chunks"):
            names = [r[0] for r in dry.launch_fwd(*rows, list(sizes), True)[1]]
            assert names.count("nf4_dequant") > 1 and ("lora_gemm_tma" in names) == setting.endswith("tma"), names
        need = (True, True, True, True)
        deterministic = setting == "deterministic"
        dy_in = dy if dy_way == "cat" else [t.contiguous() for t in dy.split(list(sizes), 1)]
        torch.use_deterministic_algorithms(deterministic)
        try:
            got = _check(dry, 1, (dy_in, *rows[:8], b_rows, s, scaling, p_, seed, *need), sizes)
            with L.recording() as records:
                L.lora_backward(dy_in, *rows[:8], b_rows, s, scaling, p_, seed, *need, sizes)
            want = L.lora_backward(dy, *fwd[:8], b_bd, s, scaling, p_, seed, *need)
            names = [r[0] for r in dry.launch_bwd(dy_in, *rows[:8], b_rows, s, scaling, p_, seed, *need,
                                                  list(sizes), True)[1]]
        finally:
            torch.use_deterministic_algorithms(False)
        assert ("lora_bwd_db" in names) == deterministic, names
        seg = {r.name: bool(r.named.get("SEG_DY", r.named.get("SEG_A"))) for r in records
               if r.name in ("lora_bwd_ds", "lora_bwd_db", "lora_bwd_dx", "lora_gemm_tma")}
        assert seg and all(v == (dy_way == "segments") for v in seg.values()), seg
        ds_launch = [r for r in records if r.name == "lora_bwd_ds"][0]
        assert bool(ds_launch.named.get("MEMBER_R")) == members, ds_launch.named
        assert ds_launch.grid[1] == (len(sizes) if members else 1), ds_launch.grid
        dx, da, db, dbias = got
        assert db.shape == b_rows.shape
        n0 = 0
        blocks = []
        for i, ni in enumerate(sizes):
            blocks.append(want[2][n0:n0 + ni, i * rb:(i + 1) * rb])
            n0 += ni
        for name, g_, w_ in (("dx", dx, want[0]), ("dA", da, want[1]), ("dB", db, torch.cat(blocks)),
                             ("dbias", dbias, want[3])):
            torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5, msg=name)
    finally:
        monkeypatch.undo()
        _launch._sync_settings(dry)


def test_group_dy_segments_have_their_own_plan(dry):
    """The same group's backward on the members' dY_i and on cat(dY_i) compiles other kernels (SEG_DY / SEG_A) with
    the same argument types: they must not share a launch plan, or a plan made for one would launch the other's
    kernels."""
    g = torch.Generator().manual_seed(12)
    m, k, sizes, rb = 40, 64, (128, 64), 4
    n, r = sum(sizes), rb * len(sizes)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / 8
    a, b, dy = torch.randn(r, k, generator=g) / 8, torch.randn(n, rb, generator=g), torch.randn(m, n, generator=g)
    s = torch.randn(m, r, generator=g)
    tail = (x, w, None, None, None, None, 0, a, b, s, 2.0, 0.0, None, True, True, True, False, list(sizes), True)
    plan_cat = dry.launch_bwd(dy, *tail)[0]
    plan_segs = dry.launch_bwd([t.contiguous() for t in dy.split(list(sizes), 1)], *tail)[0]
    assert plan_cat >= 0 and plan_segs >= 0 and plan_cat != plan_segs


@pytest.mark.parametrize("sizes", [(64, 128), (64, 96)])
def test_group_dy_segments_fall_back_to_cat(sizes):
    """dY as the members' tensors is read as it is only when every N_i is a whole number of split units (64 columns
    in the interpreter) and each tensor is contiguous; otherwise the launcher concatenates them. The values are
    the same either way. A list without groups raises."""
    g = torch.Generator().manual_seed(11)
    m, k, rb = 40, 64, 4
    n, r = sum(sizes), rb * len(sizes)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / 8
    a, b, dy = torch.randn(r, k, generator=g) / 8, torch.randn(n, rb, generator=g), torch.randn(m, n, generator=g)
    y, s = L.lora_forward(x, w, None, None, None, None, 0, a, b, 2.0, None, 0.0, None, sizes)
    args = (x, w, None, None, None, None, 0, a, b, s, 2.0, 0.0, None, True, True, True, False)
    want = L.lora_backward(dy, *args, sizes)
    parts = list(dy.split(list(sizes), 1))  # column views: not contiguous
    aligned = all(ni % 64 == 0 for ni in sizes)
    for dys, segments in ((parts, False), ([t.contiguous() for t in parts], aligned)):
        with L.recording() as records:
            got = L.lora_backward(dys, *args, sizes)
        assert {bool(rec.named.get("SEG_DY")) for rec in records if rec.name == "lora_bwd_ds"} == {segments}
        for gt, wt in zip(got[:3], want[:3]):
            assert torch.equal(gt, wt)
    with pytest.raises(ValueError, match="groups="):  # one layer (B of rank r) given dY in parts
        L.lora_backward([t.contiguous() for t in parts], *args[:8], torch.randn(n, r), *args[9:])


def test_group_sizes_are_checked():
    """Group sizes that do not describe lora_B / lora_A raise a ValueError that names them (the launchers)."""
    x, a, b = torch.randn(4, 32), torch.randn(8, 32), torch.randn(24, 4)
    w = torch.randn(24, 32)
    for groups in ((8, 8), (8, 8, 8, 0), (12, 12, 0), (4, 4, 4, 4, 4, 4)):
        with pytest.raises(ValueError, match="groups="):
            L.lora_forward(x, w, None, None, None, None, 0, a, b, 1.0, None, 0.0, None, groups)
    with pytest.raises(ValueError, match="lora_B"):  # two members of rank 4 over A's 8 ranks need B (24, 4)
        L.lora_forward(x, w, None, None, None, None, 0, a, torch.randn(24, 8), 1.0, None, 0.0, None, (12, 12))


def test_comparison_catches_a_changed_argument(dry):
    """The check that guards every launch can fail: one changed int, one swapped input pointer, one grid."""
    fwd, _ = _inputs(m=70, k=96, n=80, r=8, dtype=torch.float32)
    plan, launches = dry.launch_fwd(*fwd, [], True)
    with L.recording() as records:
        L.lora_forward(*fwd)
    records = list(records)
    inputs = _launch._inputs(0, fwd)
    _launch._register(dry, 0, plan, (*fwd, []), records)  # registers the variants, so the grids are known
    plan, launches = dry.launch_fwd(*fwd, [], True)
    assert _launch.compare(launches, records, inputs) == []
    bad_int = [list(l) for l in launches]
    bad_int[0][2] = list(bad_int[0][2])
    bad_int[0][2][4] += 1  # x.stride(0) of the S kernel
    assert _launch.compare(bad_int, records, inputs)
    bad_ptr = [list(l) for l in launches]
    bad_ptr[0][2] = list(bad_ptr[0][2])
    bad_ptr[0][2][0], bad_ptr[0][2][1] = bad_ptr[0][2][1], bad_ptr[0][2][0]  # x and A swapped
    assert _launch.compare(bad_ptr, records, inputs)
    bad_grid = [list(l) for l in launches]
    bad_grid[1][1] = (bad_grid[1][1][0] + 1, 1, 1)
    assert _launch.compare(bad_grid, records, inputs)
    assert _launch.compare(launches[:1], records, inputs)


def test_unsupported_calls_are_refused(dry):
    fwd, _ = _inputs(m=8, k=32, n=16, r=4, dtype=torch.float32)
    x = fwd[0]
    assert dry.launch_fwd(x[:0], *fwd[1:], [], True) == -1  # an empty batch stays on the Python launchers
    assert dry.launch_fwd(x.double(), *fwd[1:], [], True) == -1  # float64: reference only
    bad_a = torch.zeros(4, 31)
    assert dry.launch_fwd(x, *fwd[1:7], bad_a, *fwd[8:], [], True) == -1  # wrong shape: Python raises the error


@pytest.mark.parametrize("weight,p", [("nf4", 0.2), ("nf4-dq", 0.0)])
def test_nf4_temporary_and_its_chunks(dry, monkeypatch, weight, p):
    """The NF4 temporary path (on CUDA from NF4_DEQUANT_MIN_M rows; switched on here for CPU tensors) whole and,
    past NF4_CHUNK_BYTES, chunk by chunk: W's row ranges for the forward, column windows for dX (dropout indexed
    by x's full rows), each dequantize followed by its GEMM."""
    try:
        monkeypatch.setattr(L, "_DEQUANT_ON_CPU", True)
        monkeypatch.setattr(L, "NF4_CHUNK_MIN_M", 0)
        for bound, chunked in ((L.NF4_CHUNK_BYTES, False), (40 * 256 * 4, True)):
            monkeypatch.setattr(L, "NF4_CHUNK_BYTES", bound)
            _launch._sync_settings(dry)
            fwd, dy = _inputs(m=70, k=256, n=136, r=8, dtype=torch.float32, weight=weight, p=p)
            y, s = _check(dry, 0, fwd)
            names = [r[0] for r in dry.launch_fwd(*fwd, [], True)[1]]
            assert names.count("nf4_dequant") == (4 if chunked else 1), names
            assert names.count("lora_fwd") == names.count("nf4_dequant"), names
            x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p_, seed = fwd
            for need in [(True, True, True, True), (True, False, False, False)]:
                bargs = (dy, x, w, absmax, nabs, ncode, offset, bs, a, b, s, scaling, p_, seed, *need)
                _check(dry, 1, bargs)
                names = [r[0] for r in dry.launch_bwd(*bargs, [], True)[1]]
                assert names.count("lora_bwd_dx") == (4 if chunked else 1), names
    finally:
        monkeypatch.undo()
        _launch._sync_settings(dry)


AUTOGRAD_CASES = [
    dict(m=24, k=64, n=48, r=8, dtype=torch.float32, weight="dense", bias=True, p=0.0, x3d=False, x_grad=True),
    dict(m=24, k=64, n=48, r=8, dtype=torch.float16, weight="dense", bias=False, p=0.25, x3d=True, x_grad=True),
    dict(m=20, k=128, n=64, r=16, dtype=torch.float32, weight="nf4-dq", bias=True, p=0.1, x3d=True, x_grad=False),
    dict(m=16, k=128, n=64, r=4, dtype=torch.float32, weight="nf4", bias=True, p=0.0, x3d=False, x_grad=False,
         bias_grad=False),
]


@pytest.mark.parametrize("case", AUTOGRAD_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_cpp_autograd_function_equals_lora_linear(dry, monkeypatch, case):
    """lora_linear's eager CUDA entry is a C++ autograd Function (csrc/lora_launch.cpp LoRAFunction: the seed drawn
    in C++, x flattened and its gradient reshaped, S saved, the edges of A / B / bias worked out from the inputs
    present). The CPU test build (``launch_linear_call`` with any_device) runs it on CPU tensors with every call
    taken by the fallback (the Python launchers under the interpreter): y and every gradient equal lora_linear's own
    path bit for bit, dropout mask included, and only the gradients asked for are made."""
    monkeypatch.setenv("LORA_OPS_BACKEND", "triton")
    c = dict(case)
    fwd, dy = _inputs(c["m"], c["k"], c["n"], c["r"], c["dtype"], c["weight"], c["bias"], seed=7)
    x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p, _ = fwd
    if c["x3d"]:
        x, dy = x.reshape(2, c["m"] // 2, c["k"]), dy.reshape(2, c["m"] // 2, c["n"])
    weight = w if c["weight"] == "dense" else lora_ops.NF4Weight(w, absmax, torch.Size((c["n"], c["k"])), c["dtype"],
                                                                 bs, nabs, ncode, offset)

    def leaves():
        out = [x.clone().requires_grad_(c["x_grad"]), a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
        return out + [bias.clone().requires_grad_(c.get("bias_grad", True)) if bias is not None else None]

    def grads(ts):
        return [t.grad if t is not None and t.requires_grad else None for t in ts]

    got_in = leaves()
    torch.manual_seed(123)
    y = dry.launch_linear_call(got_in[0], w, absmax, nabs, ncode, offset, bs, c["n"], c["k"], got_in[1], got_in[2],
                               scaling, got_in[3], c["p"], 0, True)
    assert isinstance(y, torch.Tensor) and y.grad_fn is not None and y.grad_fn.name().endswith("LoRAFunction>")
    y.backward(dy)
    want_in = leaves()
    torch.manual_seed(123)
    y_ref = lora_ops.lora_linear(want_in[0], weight, want_in[1], want_in[2], scaling, bias=want_in[3],
                                 dropout_p=c["p"], training=True)
    y_ref.backward(dy)
    assert y.shape == y_ref.shape and torch.equal(y, y_ref)
    for name, g, g_ref in zip(("dx", "dA", "dB", "dbias"), grads(got_in), grads(want_in)):
        assert (g is None) == (g_ref is None), name
        if g is not None:
            assert g.shape == g_ref.shape and torch.equal(g, g_ref), name
    assert grads(got_in)[0] is None if not c["x_grad"] else grads(got_in)[0] is not None
    if c["p"] > 0:  # control: the mask depends on the seed, so the equality above says the C++ draw is lora_linear's
        torch.manual_seed(124)
        with torch.no_grad():
            other = lora_ops.lora_linear(x, weight, a, b, scaling, bias=bias, dropout_p=c["p"], training=True)
        assert not torch.equal(other, y.detach())


def _fallback_phases(dry, fn, calls=None):
    """Run fn() and return the phase (0 forward, 1 backward) of each call the C++ side handed to the Python
    launchers (in the test build, every call); ``calls``, a list, receives each call's (phase, lora_B's shape,
    group sizes, whether dY came as the members' tensors)."""
    phases = []

    def counting(phase, plan, *args):
        phases.append(phase)
        if calls is not None:
            calls.append((phase, tuple(args[8 if phase == 0 else 9].shape), list(args[-1]),
                          isinstance(args[0], (list, tuple))))
        return _launch._fallback(phase, plan, *args)
    dry.launch_set_fallback(counting)
    try:
        fn()
    finally:
        dry.launch_set_fallback(_launch._fallback)
    return phases


GROUP_CASES = [
    dict(m=24, k=64, sizes=(48, 16, 16), ranks=(8, 8, 8), scalings=(2.0, 2.0, 2.0), dtype=torch.float32,
         weight="dense", bias=False, p=0.0, x3d=False, x_grad=True, use=(0, 1, 2)),
    dict(m=24, k=64, sizes=(32, 16, 16), ranks=(8, 4, 4), scalings=(2.0, 0.5, 1.0), dtype=torch.float16,
         weight="dense", bias=True, p=0.25, x3d=True, x_grad=True, use=(0, 2)),
    dict(m=20, k=128, sizes=(64, 32, 32), ranks=(8, 4, 4), scalings=(1.5, 1.5, 1.5), dtype=torch.float32,
         weight="nf4-dq", bias=False, p=0.1, x3d=True, x_grad=False, use=(0, 1, 2)),
    dict(m=16, k=128, sizes=(64, 64), ranks=(4, 8), scalings=(1.0, 3.0), dtype=torch.float32, weight="nf4",
         bias=True, p=0.0, x3d=False, x_grad=True, use=(0, 1), a_grad=False),
    # Equal ranks and scalings: the stacked calls take B_rows = cat(B_i) with the members' sizes (no B_bd).
    dict(m=24, k=128, sizes=(64, 32, 32), ranks=(4, 4, 4), scalings=(1.5, 1.5, 1.5), dtype=torch.float16,
         weight="nf4", bias=True, p=0.25, x3d=True, x_grad=True, use=(0, 2)),
    dict(m=20, k=128, sizes=(64, 32, 32), ranks=(8, 8, 8), scalings=(0.5, 0.5, 0.5), dtype=torch.float32,
         weight="nf4-dq", bias=False, p=0.1, x3d=False, x_grad=True, use=(0, 1, 2)),
    dict(m=20, k=64, sizes=(16, 48, 16, 32), ranks=(8, 8, 8, 8), scalings=(2.0,) * 4, dtype=torch.float32,
         weight="dense", bias=True, p=0.0, x3d=False, x_grad=True, use=(0, 1, 3)),
    # Sizes in whole split units (64 columns in the interpreter): with the dY segments (the default) the stacked
    # backward hands the kernels the members' dY_i as they are; one output unused (its dY_i zeros).
    dict(m=24, k=64, sizes=(128, 64, 64), ranks=(4, 4, 4), scalings=(2.0,) * 3, dtype=torch.float16, weight="dense",
         bias=True, p=0.1, x3d=True, x_grad=True, use=(0, 2)),
    # Five members: more than the kernels' three boundaries, so B_bd again.
    dict(m=20, k=64, sizes=(16,) * 5, ranks=(4,) * 5, scalings=(1.0,) * 5, dtype=torch.float16, weight="dense",
         bias=False, p=0.0, x3d=False, x_grad=True, use=(0, 1, 2, 3, 4)),
]


def _b_rows(case, setting: str) -> bool:
    """Whether a group case's stacked calls take B_rows under ``setting`` ("blockdiag": LORA_OPS_GROUP_B=blockdiag,
    else the default; csrc/lora_launch.cpp rows_way)."""
    return (setting != "blockdiag" and len(set(case["ranks"])) == 1 and len(set(case["scalings"])) == 1
            and len(case["sizes"]) <= 4)


@pytest.mark.parametrize("b_way", ["blockdiag", "default"])
@pytest.mark.parametrize("fwd", ["concat", "members"])
@pytest.mark.parametrize("mode", ["concat", "members"])
@pytest.mark.parametrize("case", GROUP_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_cpp_group_function_equals_python_group(dry, monkeypatch, case, mode, fwd, b_way):
    """A projection group's eager CUDA entry is one C++ autograd Function (csrc/lora_launch.cpp GroupFunction: A_cat
    and B_bd stacked in C++). Its forward either runs one forward on the stacked call, the members' outputs being
    views ("concat"), or each member's forward on its slice, the outputs contiguous (``fwd`` "members"). Its
    backward either concatenates dY and runs one backward, slicing dA_i / dB_i out ("concat"), or runs each member's
    backward on its own dY and rows of W and sums dX ("members"). Neither runs per member for a double-quantized
    absmax. On CPU tensors (``launch_group_call`` with any_device, every launch taken by the fallback) the outputs
    and every gradient equal the Python group's composition (grouped.py: cat, block_diag, one lora_linear, split):
    bit for bit with "concat", within rounding per member (other tiles; dX summed in another order); per-member
    scalings, ranks, a concatenated bias, dropout, 3-D x, NF4, an output left unused. By default the stacked calls
    take B_rows = cat(B_i) where ranks and scalings are equal (at most four members) and dY as the members' tensors;
    with LORA_OPS_GROUP_B=blockdiag (``b_way``) they take block_diag(B_i) and cat(dY_i), with the same values."""
    monkeypatch.setenv("LORA_OPS_BACKEND", "triton")
    monkeypatch.setenv("LORA_OPS_GROUP_BWD", mode)
    monkeypatch.setenv("LORA_OPS_GROUP_FWD", fwd)
    if b_way == "blockdiag":
        monkeypatch.setenv("LORA_OPS_GROUP_B", "blockdiag")
        monkeypatch.setenv("LORA_OPS_GROUP_DY", "cat")
    else:
        monkeypatch.delenv("LORA_OPS_GROUP_B", raising=False)
        monkeypatch.delenv("LORA_OPS_GROUP_DY", raising=False)
    c = dict(case)
    dtype, k, sizes, ranks = c["dtype"], c["k"], c["sizes"], c["ranks"]
    g = torch.Generator().manual_seed(3)
    n = sum(sizes)
    x = torch.randn(c["m"], k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    if c["weight"] == "dense":
        weight, wargs, rows, cols = w, (w, None, None, None, None, 0), 0, 0
    else:
        weight = lora_ops.quantize_nf4(w, blocksize=64, double_quant=c["weight"] == "nf4-dq")
        wargs, rows, cols = (*weight.tensors(), weight.blocksize), n, k
    As = [(torch.randn(r, k, generator=g) / k ** 0.5).to(dtype) for r in ranks]
    Bs = [(torch.randn(ni, r, generator=g) / r ** 0.5).to(dtype) for ni, r in zip(sizes, ranks)]
    bias = torch.randn(n, generator=g).to(dtype) if c["bias"] else None
    if c["x3d"]:
        x = x.reshape(2, c["m"] // 2, k)
    dys = [torch.randn(*x.shape[:-1], ni, generator=g).to(dtype) for ni in sizes]

    def leaves():
        return (x.clone().requires_grad_(c["x_grad"]), [a.clone().requires_grad_(c.get("a_grad", True)) for a in As],
                [b.clone().requires_grad_(True) for b in Bs], None if bias is None else bias.clone().requires_grad_())

    def backward(ys):
        torch.autograd.backward([ys[i] for i in c["use"]], [dys[i] for i in c["use"]])

    def grads(lv):
        xg, as_, bs_, bg = lv
        return [xg.grad] + [t.grad for t in as_] + [t.grad for t in bs_] + [None if bg is None else bg.grad]

    got = leaves()
    torch.manual_seed(123)
    fwd_member = fwd == "members" and c["weight"] != "nf4-dq"
    out, calls = [], []
    forwards = _fallback_phases(dry, lambda: out.append(dry.launch_group_call(
        got[0], *wargs, rows, cols, got[1], got[2], list(c["scalings"]), got[3], c["p"], 0, True)), calls)
    ys = out[0]
    assert forwards == [0] * (len(sizes) if fwd_member else 1)
    assert isinstance(ys, tuple) and len(ys) == len(sizes)
    assert all(y.grad_fn is not None and y.grad_fn.name().endswith("GroupFunction>") for y in ys)
    assert all(y.is_contiguous() for y in ys) == fwd_member
    backwards = _fallback_phases(dry, lambda: backward(ys), calls)
    per_member = mode == "members" and c["weight"] != "nf4-dq"
    assert backwards == [1] * (len(sizes) if per_member else 1)
    # Which B each call got: a member's own (N_i, r_i) rows, or for a stacked call B_rows (sum N_i, r) with the
    # members' sizes, or B_bd (sum N_i, sum r_i) without.
    # With B_rows (and the dY segments) a stacked backward gets dY as the members' tensors when every
    # N_i is a whole number of split units.
    for phase, b_shape, groups, dy_list in calls:
        if (fwd_member if phase == 0 else per_member) or (fwd_member and per_member):
            assert groups == [] and b_shape[0] in sizes and not dy_list, (phase, b_shape, groups)
        elif _b_rows(c, b_way):
            assert groups == list(sizes) and b_shape == (n, ranks[0]), (phase, b_shape, groups)
            assert dy_list == (phase == 1 and all(ni % 64 == 0 for ni in sizes)), (phase, sizes, dy_list)
        else:
            assert groups == [] and b_shape == (n, sum(ranks)) and not dy_list, (phase, b_shape, groups)

    want = leaves()
    torch.manual_seed(123)
    xw, as_w, bs_w, bias_w = want
    if len(set(c["scalings"])) == 1:
        b_bd, scaling = torch.block_diag(*bs_w), c["scalings"][0]
    else:
        b_bd, scaling = torch.block_diag(*[b * s for b, s in zip(bs_w, c["scalings"])]), 1.0
    y_ref = lora_ops.lora_linear(xw, weight, torch.cat(as_w, 0), b_bd, scaling, bias=bias_w, dropout_p=c["p"],
                                 training=True)
    ys_ref = y_ref.split(list(sizes), dim=-1)
    backward(ys_ref)
    for i, (y, y_r) in enumerate(zip(ys, ys_ref)):
        assert y.shape == y_r.shape, f"y_{i}"
        if fwd_member:
            assert_rel_close(y, y_r, dtype, f"y_{i}")
        else:
            assert torch.equal(y, y_r), f"y_{i}"
    names = ["dx"] + [f"dA_{i}" for i in range(len(sizes))] + [f"dB_{i}" for i in range(len(sizes))] + ["dbias"]
    for name, gg, gr in zip(names, grads(got), grads(want)):
        assert (gg is None) == (gr is None), name
        if gg is None:
            continue
        assert gg.shape == gr.shape, name
        if per_member or fwd_member:  # the same sums in another order (per-member tiles, dX summed)
            assert_rel_close(gg, gr, dtype, name)
        else:
            assert torch.equal(gg, gr), name
    assert (grads(got)[0] is None) == (not c["x_grad"])
    if per_member and fwd_member and c["weight"] == "dense":
        # Nothing stacked: each member is the single layer on its rows of W, its own A_i, B_i and s_i, so its
        # output, dA_i and dB_i equal that layer's bit for bit.
        n0 = 0
        for i, (ni, s_i) in enumerate(zip(sizes, c["scalings"])):
            xi, ai, bi = (x.clone().requires_grad_(c["x_grad"]), As[i].clone().requires_grad_(c.get("a_grad", True)),
                          Bs[i].clone().requires_grad_(True))
            torch.manual_seed(123)
            yi = lora_ops.lora_linear(xi, w[n0:n0 + ni], ai, bi, s_i,
                                      bias=None if bias is None else bias[n0:n0 + ni], dropout_p=c["p"], training=True)
            assert torch.equal(yi, ys[i].detach()), f"y_{i} against the single layer"
            if i in c["use"]:
                yi.backward(dys[i])
                for name, gg, gr in ((f"dA_{i}", got[1][i].grad, ai.grad), (f"dB_{i}", got[2][i].grad, bi.grad)):
                    assert (gg is None) == (gr is None) and (gg is None or torch.equal(gg, gr)), name
            n0 += ni


@pytest.mark.parametrize("sizes,k,per_member", [((64, 64), 64, True), ((48, 16, 16), 64, False),
                                                ((160, 32, 32), 64, True), ((16, 16), 64, False)])
def test_group_backward_rule(dry, monkeypatch, sizes, k, per_member):
    """By default the group's forward and backward run per member exactly when summing the members' dX (3 (g - 1)
    M K elements moved) costs less than concatenating their dY (2 M sum N_i): the MLP's gate/up, not GQA's q/k/v;
    then the outputs are contiguous tensors, not views of one."""
    monkeypatch.setenv("LORA_OPS_BACKEND", "triton")
    monkeypatch.delenv("LORA_OPS_GROUP_BWD", raising=False)
    monkeypatch.delenv("LORA_OPS_GROUP_FWD", raising=False)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, k, generator=g).requires_grad_()
    w = torch.randn(sum(sizes), k, generator=g) / k ** 0.5
    As = [(torch.randn(4, k, generator=g) / k ** 0.5).requires_grad_() for _ in sizes]
    Bs = [torch.randn(n, 4, generator=g).requires_grad_() for n in sizes]
    out = []
    forwards = _fallback_phases(dry, lambda: out.append(dry.launch_group_call(
        x, w, None, None, None, None, 0, 0, 0, As, Bs, [1.0] * len(sizes), None, 0.0, 0, True)))
    ys = out[0]
    assert len(forwards) == (len(sizes) if per_member else 1)
    assert all(y.is_contiguous() for y in ys) == per_member
    backwards = _fallback_phases(dry, lambda: sum(y.sum() for y in ys).backward())
    assert len(backwards) == (len(sizes) if per_member else 1)


@pytest.mark.parametrize("way", ["concat", "members", "concat-rows"])
def test_cpp_group_under_checkpointing(dry, monkeypatch, way):
    """Non-reentrant activation checkpointing unpacks each saved tensor once: the group's backward (stacked, on
    B_bd or B_rows, or each member on its own adapters) reads its saved tensors in one go, and the gradients equal
    the plain run's."""
    monkeypatch.setenv("LORA_OPS_BACKEND", "triton")
    monkeypatch.setenv("LORA_OPS_GROUP_FWD", way.split("-")[0])
    monkeypatch.setenv("LORA_OPS_GROUP_BWD", way.split("-")[0])
    monkeypatch.setenv("LORA_OPS_GROUP_B", "rows" if way.endswith("rows") else "blockdiag")
    from torch.utils.checkpoint import checkpoint
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(8, 64, generator=g)
    w = torch.randn(96, 64, generator=g) / 8
    As0 = [torch.randn(4, 64, generator=g) / 8 for _ in range(2)]
    Bs0 = [torch.randn(48, 4, generator=g) for _ in range(2)]
    scalings = [2.0, 2.0] if way.endswith("rows") else [2.0, 0.5]  # B_rows needs one scaling

    def run(use_checkpoint):
        x = x0.clone().requires_grad_()
        As = [a.clone().requires_grad_() for a in As0]
        Bs = [b.clone().requires_grad_() for b in Bs0]

        def f(x):
            ys = dry.launch_group_call(x, w, None, None, None, None, 0, 0, 0, As, Bs, scalings, None, 0.0, 0, True)
            return ys[0].square().sum() + ys[1].sum()
        (checkpoint(f, x, use_reentrant=False) if use_checkpoint else f(x)).backward()
        return [x.grad] + [t.grad for t in As + Bs]

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want)


def _packed(ts):
    """Leaves with the values of ``ts`` that are row views of one buffer each (as ProjectionGroup packs a group's
    adapters)."""
    buf = torch.cat([t.reshape(-1) for t in ts])
    out, off = [], 0
    for t in ts:
        p = nn.Parameter(torch.empty(0))
        p.data = buf[off:off + t.numel()].view(t.shape)
        out.append(p)
        off += t.numel()
    return out


@pytest.mark.parametrize("b_way", ["rows", "blockdiag"])
@pytest.mark.parametrize("ranks", [(4, 4, 4), (8, 4, 4)])
def test_group_reads_packed_adapters_as_views(dry, monkeypatch, b_way, ranks):
    """Adapters that lie one after another in one storage (a group's packed lora_A / lora_B) are stacked as a view:
    the forward dispatches no cat for A_cat (nor for B_rows, with equal ranks), and the outputs and every
    gradient equal those of the same values in separate tensors bit for bit (the Python launchers in this build).
    Adapters out of order in their buffer are concatenated as before."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("LORA_OPS_BACKEND", "triton")
    monkeypatch.setenv("LORA_OPS_GROUP_FWD", "concat")
    monkeypatch.setenv("LORA_OPS_GROUP_BWD", "concat")
    monkeypatch.setenv("LORA_OPS_GROUP_B", b_way)
    sizes, m, k = (128, 64, 64), 16, 64
    g = torch.Generator().manual_seed(5)
    w = torch.randn(sum(sizes), k, generator=g) / 8
    x0 = torch.randn(m, k, generator=g)
    As0 = [torch.randn(r, k, generator=g) / 8 for r in ranks]
    Bs0 = [torch.randn(n, r, generator=g) for n, r in zip(sizes, ranks)]
    dys = [torch.randn(m, n, generator=g) for n in sizes]

    def run(make):
        x = x0.clone().requires_grad_()
        As, Bs = make(As0), make(Bs0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ys = dry.launch_group_call(x, w, None, None, None, None, 0, 0, 0, As, Bs, [2.0] * 3, None, 0.0, 0, True)
        cats = sum(e.count for e in prof.key_averages() if e.key == "aten::cat")
        torch.autograd.backward(list(ys), dys)
        return cats, [y.detach() for y in ys] + [x.grad] + [t.grad for t in As + Bs]

    def separate(ts):
        return [t.clone().requires_grad_() for t in ts]

    def swapped(ts):  # packed with the first two members' places exchanged in the buffer, handed over in order
        p = _packed([ts[1], ts[0], ts[2]])
        return [p[1], p[0], p[2]]

    cats_sep, want = run(separate)
    cats_packed, got = run(_packed)
    cats_swapped, got_swapped = run(swapped)
    rows = b_way == "rows" and len(set(ranks)) == 1
    assert cats_sep == (2 if rows else 1)  # A_cat (and B_rows); block_diag is not a cat
    assert cats_packed == 0
    assert cats_swapped == cats_sep
    for i, (a, b, c) in enumerate(zip(got, want, got_swapped)):
        assert torch.equal(a, b) and torch.equal(c, b), i
    # The stacked view shares the first member's version counter only; an in-place change of another member
    # between the forward and the backward is still caught, as the single layer's saved adapters are.
    for j, what in ((1, "A"), (2, "B")):
        if what == "B" and not rows:
            continue  # block_diag(B_i) is a copy: the forward's values stay
        x = x0.clone().requires_grad_()
        As, Bs = _packed(As0), _packed(Bs0)
        ys = dry.launch_group_call(x, w, None, None, None, None, 0, 0, 0, As, Bs, [2.0] * 3, None, 0.0, 0, True)
        with torch.no_grad():
            (As if what == "A" else Bs)[j].mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.backward(list(ys), dys)


class _RecordingModule:
    """Stands in for lora_ops._C: records what _launch's entries pass to C++."""

    def __init__(self):
        self.calls = []

    def launch_linear(self, *args):
        self.calls.append(("linear", args))
        return "y"

    def launch_group(self, *args):
        self.calls.append(("group", args))
        return ("y0", "y1")


@pytest.mark.parametrize("quantize,way", [(None, "default"), ("nf4", "default"),
                                          (None, "rows+segments+finish+base_mm")])
def test_modules_reach_the_cpp_functions_with_any_device(dry, monkeypatch, quantize, way):
    """``_launch.use_module(mod, any_device=True)``: the modules hand their CPU calls to the test build's C++
    entries, a projection group (q/k/v) to GroupFunction and a lone layer (o) to LoRAFunction, whose launches the
    fallback runs (the Python launchers under the interpreter). Output and every adapter gradient equal the
    reference backend's: the modules' per-call path (dtype, bias, adapters, scaling, dropout off in eval) reaches
    C++ intact. ``way``: also with B_rows, dY segments (which base_mm turns back into one dY), the finish kernel
    and the base product from torch's matmul."""
    from torch import nn

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 32)
            self.o_proj = nn.Linear(64, 64, bias=False)

        def forward(self, x):
            return self.o_proj(x) * self.q_proj(x) + torch.cat([self.k_proj(x), self.v_proj(x)], -1)

    def run(backend, any_device):
        monkeypatch.setenv("LORA_OPS_BACKEND", backend)
        monkeypatch.setenv("LORA_OPS_GROUP_FWD", "concat")
        monkeypatch.setenv("LORA_OPS_GROUP_BWD", "concat")
        torch.manual_seed(0)
        model = lora_ops.apply_lora(Attn(), target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=8,
                                    lora_alpha=16, quantize=quantize, group_projections=True)
        for name, p_ in model.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    p_.normal_()
        x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        _launch.use_module(dry, any_device=any_device)
        try:
            y = model(x)
            names = set()
            todo = [y.grad_fn]
            while todo:  # the graph's C++ Functions
                fn = todo.pop()
                if fn is not None and fn.name() not in names:
                    names.add(fn.name())
                    todo += [f for f, _ in fn.next_functions]
            y.square().sum().backward()
        finally:
            _launch.use_module(dry)
        grads = {n: p_.grad for n, p_ in model.named_parameters() if p_.grad is not None}
        return y.detach(), x.grad, grads, names

    if way != "default":
        monkeypatch.setenv("LORA_OPS_GROUP_B", "rows")
        monkeypatch.setenv("LORA_OPS_GROUP_DY", "segments")
        monkeypatch.setattr(L, "_FINISH_KERNEL", True)
        monkeypatch.setattr(L, "_BASE_MM", 3)
    try:
        _launch._sync_settings(dry)
        y, dx, grads, names = run("triton", True)
    finally:
        monkeypatch.undo()
        _launch._sync_settings(dry)
    assert any(n.endswith("GroupFunction>") for n in names) and any(n.endswith("LoRAFunction>") for n in names), names
    y_ref, dx_ref, grads_ref, names_ref = run("reference", False)
    assert not any(n.endswith("Function>") and "lora_launch" in n for n in names_ref), names_ref
    assert_rel_close(y, y_ref, torch.float32, "y")
    assert_rel_close(dx, dx_ref, torch.float32, "dx")
    assert grads.keys() == grads_ref.keys() and len(grads) == 8
    for n in grads:
        assert_rel_close(grads[n], grads_ref[n], torch.float32, n)


def test_host_timer_counts_the_runs_and_their_phases(dry, monkeypatch):
    """launch_timing(True) zeroes the per-phase host timer and counts every run (forward and backward) with its
    phases in launch_stats; launch_timing(False) stops it. Under LORA_OPS_LAUNCH_NOOP=1 the CPU build runs the
    whole host path but the launches, so every phase but encode (no TMA here) and launch (nothing launched but
    the memset's zero_) takes time."""
    fwd, dy = _inputs(m=70, k=96, n=80, r=8, dtype=torch.float32)
    x, w, absmax, nabs, ncode, offset, bs, a, b, scaling, bias, p_, seed = fwd
    leaves = [x.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()]

    def step():
        y = dry.launch_linear_call(leaves[0], w, absmax, nabs, ncode, offset, bs, 80, 96, leaves[1], leaves[2],
                                   scaling, bias, 0.0, 0, True)
        y.backward(dy)

    monkeypatch.setenv("LORA_OPS_LAUNCH_NOOP", "1")
    step()
    dry.launch_timing(True)
    try:
        for _ in range(3):
            step()
        st = dry.launch_stats()
    finally:
        dry.launch_timing(False)
    assert st["timed_calls"] == 6, st
    assert set(st["host_ns"]) == {"build", "resolve", "encode", "launch", "after"}
    assert st["host_ns"]["build"] > 0 and st["host_ns"]["after"] > 0 and st["host_ns"]["encode"] == 0, st
    step()
    st = dry.launch_stats()
    assert st["timed_calls"] == 0 and not any(st["host_ns"].values()), st


def test_entries_pass_the_weight_and_settings_to_cpp(dry, monkeypatch):
    """_launch.linear / _launch.group (the eager CUDA entries of lora_linear and of a projection group) hand C++
    the weight's tensors (NF4: bytes, absmax state, blocksize, rows, cols; dense: the tensor and zeros), p = 0
    outside training, the decode bound (0 when the triton backend is forced), and return None where the general
    path must take the call (the reference backend, a dispatch mode, a weight or scaling of another type)."""
    fake = _RecordingModule()
    monkeypatch.setattr(_launch, "_module", fake)
    monkeypatch.setattr(_launch, "_state", "ready")
    monkeypatch.setattr(_launch, "_decode_max", 7)
    monkeypatch.delenv("LORA_OPS_BACKEND", raising=False)
    x, a, b = torch.randn(4, 64), torch.randn(2, 64), torch.randn(8, 2)
    w = torch.randn(8, 64)
    w4 = lora_ops.quantize_nf4(w, blocksize=64, double_quant=True)

    assert _launch.linear(x, w, a, b, 2, None, 0.1, True) == "y"
    name, args = fake.calls[-1]
    assert name == "linear" and args[1] is w and args[2:9] == (None, None, None, None, 0, 0, 0)
    assert args[9] is a and args[10] is b and args[11] == 2.0 and type(args[11]) is float and args[13:] == (0.1, 7)

    assert _launch.group(x, w4, [a, a], [b, b], [1, 3], None, 0.2, False) == ("y0", "y1")
    name, args = fake.calls[-1]
    assert name == "group" and args[1:6] == w4.tensors() and args[6:9] == (64, 8, 64)
    assert args[9] == [a, a] and args[10] == [b, b] and args[11] == [1.0, 3.0] and args[13:] == (0.0, 7)

    monkeypatch.setenv("LORA_OPS_BACKEND", "triton")
    assert _launch.group(x, w, [a], [b], [1.0], None, 0.0, True) is not None and fake.calls[-1][1][-1] == 0
    n = len(fake.calls)
    monkeypatch.setenv("LORA_OPS_BACKEND", "reference")
    assert _launch.linear(x, w, a, b, 2.0, None, 0.0, True) is None
    assert _launch.group(x, w, [a], [b], [1.0], None, 0.0, True) is None
    monkeypatch.setenv("LORA_OPS_BACKEND", "triton")
    assert _launch.linear(x, w, a, b, torch.tensor(2.0), None, 0.0, True) is None  # a tensor scaling
    assert _launch.group(x, "not a weight", [a], [b], [1.0], None, 0.0, True) is None
    monkeypatch.setattr(_launch._backend, "op_required", lambda: True)
    assert _launch.linear(x, w, a, b, 2.0, None, 0.0, True) is None
    assert _launch.group(x, w, [a], [b], [1.0], None, 0.0, True) is None
    assert len(fake.calls) == n
    # The recorded arguments fit the real entries' signatures (which decline CPU tensors: None).
    for name, args in fake.calls:
        assert getattr(dry, "launch_" + name)(*args) is None


def test_group_host_ops_with_b_rows_and_dy_segments(dry, monkeypatch):
    """The host path of a q/k/v-shaped group's fwd+bwd without its launches (LORA_OPS_LAUNCH_NOOP, this test build;
    scripts/host_group_cpu.py times it): B_rows makes no block_diag and casts dB once, the dY segments skip dY's
    cat, the finish kernel (the default) takes the casts and sums that are left, so each way dispatches fewer aten
    ops than the one before."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("LORA_OPS_LAUNCH_NOOP", "1")
    monkeypatch.setenv("LORA_OPS_GROUP_FWD", "concat")
    monkeypatch.setenv("LORA_OPS_GROUP_BWD", "concat")
    sizes, m, k, r = (256, 64, 64), 64, 128, 4
    g = torch.Generator().manual_seed(1)
    w = torch.randn(sum(sizes), k, generator=g).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16).requires_grad_()
    As = [torch.randn(r, k, generator=g).to(torch.bfloat16).requires_grad_() for _ in sizes]
    Bs = [torch.randn(n, r, generator=g).to(torch.bfloat16).requires_grad_() for n in sizes]
    dys = [torch.randn(m, n, generator=g).to(torch.bfloat16) for n in sizes]

    def ops(b_way, dy_way, finish=False):
        monkeypatch.setenv("LORA_OPS_GROUP_B", b_way)
        monkeypatch.setenv("LORA_OPS_GROUP_DY", dy_way)
        monkeypatch.setattr(L, "_FINISH_KERNEL", finish)
        _launch._sync_settings(dry)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ys = dry.launch_group_call(x, w, None, None, None, None, 0, 0, 0, As, Bs, [2.0] * 3, None, 0.0, 0, True)
            torch.autograd.backward(list(ys), dys)
        assert all(t.grad is not None for t in [x, *As, *Bs])
        for t in [x, *As, *Bs]:
            t.grad = None
        return {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}

    try:
        bd, rows, segs = ops("blockdiag", "cat"), ops("rows", "cat"), ops("rows", "segments")
        fin = ops("rows", "segments", finish=True)
    finally:
        monkeypatch.undo()
        _launch._sync_settings(dry)
    assert bd.get("aten::block_diag") == 1 and "aten::block_diag" not in rows
    assert rows.get("aten::cat") == 3 and segs.get("aten::cat") == 2  # A_cat, B_rows (and dY's cat)
    assert bd.get("aten::_to_copy") == 4 and rows.get("aten::_to_copy") == 2  # dB: three block casts, then one
    assert "aten::_to_copy" not in fin and "aten::sum" not in fin, fin
    assert sum(bd.values()) > sum(rows.values()) > sum(segs.values()) > sum(fin.values()), (bd, rows, segs, fin)


@pytest.mark.parametrize("dequant", [False, True])
def test_per_nested_block_offsets_launch_lists_and_values(dry, monkeypatch, dequant):
    """A projection group's stacked double-quantized weight with one offset per nested block (the kernels'
    NESTED_OFFSETS, ``LORA_OPS_GROUP_ABSMAX=codes``): the C++ dry run makes the Python launchers' launches, in a
    plan of its own (not the one-offset weight's), forward and backward, with the weight decoded in the K loop or
    dequantized first; the values equal those of the same weight with its absmax decoded to fp32, bit for bit."""
    from helpers import stacked_nf4_with_offsets
    from lora_ops.nf4 import NF4Weight, reference_absmax

    try:
        monkeypatch.setattr(L, "_DEQUANT_ON_CPU", dequant)
        _launch._sync_settings(dry)
        w4, _ = stacked_nf4_with_offsets((256, 128, 128), 128, seed=2)
        fp32 = NF4Weight(w4.data, reference_absmax(*w4.tensors()[1:]), w4.shape, w4.dtype, 64)
        g = torch.Generator().manual_seed(4)
        m, k, n, r = 64, 128, 512, 8
        x = torch.randn(m, k, generator=g)
        a, b = torch.randn(r, k, generator=g) / k ** 0.5, torch.randn(n, r, generator=g) / r ** 0.5
        dy = torch.randn(m, n, generator=g)
        outs = []
        for weight in (w4, fp32):
            fwd = (x, *weight.tensors(), 64, a, b, 1.5, None, 0.0, None)
            y, s = _check(dry, 0, fwd)
            plan = dry.launch_fwd(*fwd, [], True)[0]
            dx, da, db, _ = _check(dry, 1, (dy, x, *weight.tensors(), 64, a, b, s, 1.5, 0.0, None,
                                            True, True, True, False))
            outs.append(((y, s, dx, da, db), plan))
        assert outs[0][1] != outs[1][1], "the per-block offsets must not reuse the one-offset weight's plan"
        for name, got, want in zip(("y", "s", "dx", "dA", "dB"), outs[0][0], outs[1][0]):
            assert torch.equal(got, want), name
        names = [rec[0] for rec in dry.launch_fwd(x, *w4.tensors(), 64, a, b, 1.5, None, 0.0, None, [], True)[1]]
        assert ("nf4_dequant" in names) == dequant, names
    finally:
        monkeypatch.undo()
        _launch._sync_settings(dry)
