"""The NF4 GPU kernels: Triton dequantize (triton_kernels/nf4_dequant.py) and CUDA quantize (csrc/, lora_ops._ext).

Same-computation tests, so the bar is bit equality (no tolerance): the kernels must produce the exact bytes
and values of ``lora_ops.nf4.reference_*`` and of bitsandbytes' CUDA path.

CPU (CI): the Triton kernel under TRITON_INTERPRET=1 vs the reference, the sm_90 PTX of the kernel compiled
without a GPU (no FMA contraction of the double-quant absmax), opcheck of the three NF4 ops, and the
extension's ImportError on a CPU-only torch. GPU (marker ``gpu``): CUDA quantize vs bitsandbytes'
``quantize_4bit``/``quantize_blockwise``, Triton dequantize vs the reference and ``dequantize_4bit``, opcheck
on CUDA, and printed timings of the 4096x14336 dequantize.
"""
import importlib
import sys
import warnings

import pytest
import torch

import lora_ops
from lora_ops import _backend, nf4
from helpers import run_sm90_probe

# The originals, captured before any test monkeypatches them to prove a fast path ran.
REF_DEQUANT = nf4.reference_dequantize_nf4
REF_QUANT = nf4.reference_quantize_nf4
REF_QUANT8 = nf4.reference_quantize_blockwise_8bit

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.uint8: torch.uint8}


def assert_same_bits(out: torch.Tensor, ref: torch.Tensor, what: str = "result") -> None:
    """Bit equality (NaN patterns and signed zeros included); reports the first mismatch."""
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != reference {ref.dtype}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    a = out.detach().contiguous().view(_INT_VIEW[out.dtype]).cpu().reshape(-1)
    b = ref.detach().contiguous().view(_INT_VIEW[ref.dtype]).cpu().reshape(-1)
    diff = (a != b).nonzero()
    if diff.numel():
        i = int(diff[0])
        raise AssertionError(f"{what}: {diff.numel()} of {a.numel()} elements differ; first at flat index {i}: "
                             f"{out.reshape(-1)[i].item()!r} vs reference {ref.reshape(-1)[i].item()!r}")


def _weight(rows, cols, seed, zero_block_of=None):
    """A random weight with the spread of a real layer; optionally one all-zero block and one partly-zero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w.view(-1)[:: max(1, (rows * cols) // 7)] *= 9.0  # a few outliers, so blocks have different absmax
    if zero_block_of is not None:
        bs, flat = zero_block_of, w.view(-1)
        if flat.numel() >= 2 * bs:
            flat[bs:2 * bs] = 0.0
        if flat.numel() >= 3 * bs:
            flat[2 * bs + 1: 3 * bs] = 0.0
    return w


def _forbidden(name):
    def fn(*args, **kwargs):
        raise AssertionError(f"{name} ran: the fast path was not taken")
    return fn


def _swap_nibbles(packed):
    return ((packed << 4) | (packed >> 4)).to(torch.uint8)


# ----------------------------------------------------------------------------------------- CPU: Triton

# (rows, cols, blocksize, double_quant, out dtype): every block size, odd element counts, blocks straddling
# rows, tails shorter than a program, several full programs (unmasked path) plus a masked tail, > 256 blocks
# (several nested blocks), and an exact multiple of a program (no masked program at all).
DEQUANT_CASES = [
    (7, 13, 32, False, torch.float32),
    (67, 131, 32, True, torch.float16),
    (37, 129, 64, True, torch.float32),
    (64, 64, 64, False, torch.float16),
    (1, 1, 64, True, torch.float32),
    (29, 257, 128, False, torch.float16),
    (101, 103, 128, True, torch.float32),
    (3, 1001, 256, True, torch.float16),
    (45, 91, 512, False, torch.float32),
    (61, 263, 1024, True, torch.float16),
    (5, 977, 2048, True, torch.float32),
    (67, 131, 4096, False, torch.float16),
    (33, 1025, 4096, True, torch.float32),
]


def _cpu_triton(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the interpreter tests run on CPU-only machines; the GPU tests cover CUDA")
    pytest.importorskip("triton")
    monkeypatch.setenv("LORA_OPS_BACKEND", "triton")

    monkeypatch.setattr(nf4, "reference_dequantize_nf4", _forbidden("reference_dequantize_nf4"))


@pytest.mark.parametrize("rows,cols,blocksize,double_quant,dtype", DEQUANT_CASES)
def test_triton_dequant_bit_exact_interpreter(monkeypatch, rows, cols, blocksize, double_quant, dtype):
    w = _weight(rows, cols, seed=rows * 1000 + cols, zero_block_of=blocksize)
    w4 = lora_ops.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    ref = REF_DEQUANT(*w4.tensors(), blocksize, rows, cols, dtype)
    _cpu_triton(monkeypatch)
    assert_same_bits(w4.dequantize(dtype), ref, "NF4Weight.dequantize (Triton)")
    out = torch.ops.lora_ops.nf4_dequantize(*w4.tensors(), blocksize, rows, cols, dtype)
    assert_same_bits(out, ref, "torch.ops.lora_ops.nf4_dequantize (Triton)")


def test_triton_dequant_mutations_fail(monkeypatch):
    """Wrong results through the same helper fail: swapped nibbles, an off-by-one block, a fused absmax."""
    from lora_ops.triton_kernels.nf4_dequant import dequantize_nf4

    rows, cols, bs = 67, 131, 32  # 275 blocks: two nested blocks
    w = _weight(rows, cols, seed=5)
    w4 = lora_ops.quantize_nf4(w, blocksize=bs, double_quant=True)
    packed, qabs, nabs, ncode, offset = w4.tensors()
    ref = REF_DEQUANT(packed, qabs, nabs, ncode, offset, bs, rows, cols, torch.float32)
    _cpu_triton(monkeypatch)
    assert_same_bits(dequantize_nf4(packed, qabs, nabs, ncode, offset, bs, rows, cols, torch.float32), ref)
    with pytest.raises(AssertionError, match="differ"):
        assert_same_bits(dequantize_nf4(_swap_nibbles(packed), qabs, nabs, ncode, offset, bs, rows, cols,
                                        torch.float32), ref)
    with pytest.raises(AssertionError, match="differ"):
        assert_same_bits(dequantize_nf4(packed, torch.roll(qabs, 1), nabs, ncode, offset, bs, rows, cols,
                                        torch.float32), ref)
    # absmax rounded once (what an FMA would compute) instead of product-then-sum: must be told apart.
    idx = torch.arange(qabs.numel()) // nf4.NESTED_BLOCKSIZE
    fused = (ncode.double()[qabs.long()] * nabs.double()[idx] + offset.double()).float()
    with pytest.raises(AssertionError, match="differ"):
        assert_same_bits(dequantize_nf4(packed, fused, None, None, None, bs, rows, cols, torch.float32), ref)


def test_triton_dequant_rejects_bad_input(monkeypatch):
    from lora_ops.triton_kernels.nf4_dequant import dequantize_nf4

    _cpu_triton(monkeypatch)
    w4 = lora_ops.quantize_nf4(_weight(3, 5, seed=1), blocksize=64, double_quant=True)
    t = w4.tensors()
    with pytest.raises(ValueError, match="blocksize"):
        dequantize_nf4(*t, 48, 3, 5, torch.float32)
    with pytest.raises(ValueError, match="bytes"):
        dequantize_nf4(*t, 64, 3, 7, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        dequantize_nf4(*t, 64, 3, 5, torch.int32)
    with pytest.raises(ValueError, match="together"):
        dequantize_nf4(t[0], t[1], t[2], None, t[4], 64, 3, 5, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="CUDA tensors"):
        dequantize_nf4(*t, 64, 3, 5, torch.float32)


# The sm_90 compile runs in a subprocess: this process has TRITON_INTERPRET=1 set, which makes every
# @triton.jit an interpreter function at import time.
_PTX_PROBE = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lora_ops.triton_kernels import nf4_dequant as K
sig = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32",
       "offset_ptr": "*fp32", "codebook_ptr": "*fp32", "out_ptr": "*bf16", "n_elements": "i64", "n_bytes": "i64",
       "n_blocks": "i64", "n_full_programs": "i32", "win_blocks": "i64", "row_blocks": "i64", "col0_blocks": "i64",
       "HALF_BS": "constexpr", "NB": "constexpr",
       "NESTED": "constexpr", "NESTED_BS": "constexpr", "VEC": "constexpr"}
consts = {"HALF_BS": 32, "NB": K.BYTES_PER_PROGRAM // 32, "NESTED": True, "NESTED_BS": 256, "VEC": 4}
attrs = {(i,): [["tt.divisibility", 16]] for i in range(10)}
res = {}
for fusion in (False, True):
    c = triton.compile(ASTSource(K._nf4_dequant_kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": K.NUM_WARPS, "enable_fp_fusion": fusion})
    ptx, ttgir = c.asm["ptx"], c.asm["ttgir"]
    res[str(fusion)] = {"fma": ptx.count("fma.rn.f32"), "mul_rn": ptx.count("mul.rn.f32"),
                        "add_rn": ptx.count("add.rn.f32"), "st_v4": ptx.count("st.global.v4.b32"),
                        "tile_converts": len(re.findall(r"ttg\.convert_layout [^\n]*: tensor<\d+x\d+x", ttgir))}
print(json.dumps(res))
"""


def test_triton_dequant_sm90_ptx_has_no_fma():
    """Compiles the real kernel for sm_90 without a GPU and reads the PTX: the nested absmax is a rounded
    mul then a rounded add (no fma.rn.f32), as launched (enable_fp_fusion=False); Triton's default fusion
    does contract it (the control), so the check can see a contraction. Also: 16-byte stores and no layout
    conversion of the tile (the design's bandwidth claims), for the default bs=64 configuration."""
    res = run_sm90_probe(_PTX_PROBE, timeout=300)
    launched, fused = res["False"], res["True"]
    assert launched["fma"] == 0 and launched["mul_rn"] > 0 and launched["add_rn"] > 0, launched
    assert fused["fma"] > 0, f"control: default fp fusion should contract the absmax into an FMA: {fused}"
    assert launched["st_v4"] > 0, f"expected 16-byte stores (st.global.v4.b32): {launched}"
    assert launched["tile_converts"] == 0, f"the 2-D tile goes through a layout conversion: {launched}"


# --------------------------------------------------------------------------------------- CPU: opcheck, _ext

def _nf4_op_args(device, double_quant):
    w = _weight(37, 129, seed=11).to(device)
    w4 = lora_ops.quantize_nf4(w, blocksize=64, double_quant=double_quant)
    return w, w4


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_nf4_ops_cpu(monkeypatch, backend):
    if torch.cuda.is_available():
        pytest.skip("CPU variant; test_opcheck_nf4_ops_cuda covers CUDA")
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("LORA_OPS_BACKEND", backend)
    w, w4 = _nf4_op_args("cpu", double_quant=True)
    torch.library.opcheck(torch.ops.lora_ops.nf4_quantize.default, (w, 64))
    vals = torch.randn(300, generator=torch.Generator().manual_seed(2))
    torch.library.opcheck(torch.ops.lora_ops.quantize_blockwise_8bit.default, (vals, nf4.dynamic_map(), 256))
    for dq in (True, False):
        _, w4 = _nf4_op_args("cpu", double_quant=dq)
        for dtype in (torch.float32, torch.float16):
            torch.library.opcheck(torch.ops.lora_ops.nf4_dequantize.default, (*w4.tensors(), 64, 37, 129, dtype))


def test_ext_import_error_on_cpu_torch(monkeypatch, tmp_path):
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA: the extension may build here")
    sys.modules.pop("lora_ops._ext", None)
    with pytest.raises(ImportError, match=r"lora_ops\._C is not built and cannot be JIT-built: .*CPU-only"):
        importlib.import_module("lora_ops._ext")
    # Missing sources are named in the message (CUDA faked so that the source check is the one that fails;
    # the build never starts because a problem was found).
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("LORA_OPS_CSRC", str(tmp_path))
    sys.modules.pop("lora_ops._ext", None)
    with pytest.raises(ImportError, match="sources are missing"):
        importlib.import_module("lora_ops._ext")
    sys.modules.pop("lora_ops._ext", None)


def test_backend_warns_once_and_falls_back_without_ext(monkeypatch):
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA: the extension may load here")
    monkeypatch.setattr(_backend, "_loaded", {})
    monkeypatch.setattr(_backend, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _backend._load("lora_ops._ext:nf4_quantize") is None
        assert _backend._load("lora_ops._ext:nf4_quantize") is None
    msgs = [str(w.message) for w in caught if "lora_ops._ext" in str(w.message)]
    assert len(msgs) == 1 and "CPU-only" in msgs[0], msgs


# ------------------------------------------------------------------------------------------------- GPU

def _ext_or_skip():
    try:
        from lora_ops import _ext
    except ImportError as e:
        if "cannot be JIT-built" in str(e):
            pytest.skip(f"no CUDA toolchain for lora_ops._C: {e}")
        raise  # sources and toolchain present but the build failed: that is a failure
    return _ext


def _bnb_f():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F
    return F


GPU_SHAPES = [(1, 1), (1, 3), (3, 5), (37, 129), (127, 1001), (64, 64)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("blocksize", nf4.VALID_BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_nf4_quantize_matches_bnb(cuda, blocksize, dtype):
    ext, F = _ext_or_skip(), _bnb_f()
    for rows, cols in GPU_SHAPES:
        w = _weight(rows, cols, seed=rows + cols + blocksize, zero_block_of=blocksize).to(cuda, dtype)
        packed, absmax = ext.nf4_quantize(w, blocksize)
        bq, st = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
        what = f"{rows}x{cols} {dtype} bs={blocksize}"
        assert_same_bits(packed, bq.reshape(-1, 1).view(torch.uint8), f"packed vs bnb CUDA ({what})")
        assert_same_bits(absmax, st.absmax.float(), f"absmax vs bnb CUDA ({what})")
        rp, ra = REF_QUANT(w, blocksize)
        assert_same_bits(packed, rp, f"packed vs reference ({what})")
        assert_same_bits(absmax, ra, f"absmax vs reference ({what})")
    with pytest.raises(AssertionError, match="differ"):  # control: the helper sees swapped nibbles
        assert_same_bits(_swap_nibbles(packed), rp)


@pytest.mark.gpu
def test_cuda_nf4_quantize_ties_match_bnb(cuda):
    """Values exactly on the 15 midpoints (absmax = 1): the tie set NF4_TIES_UP must be bnb's CUDA behaviour."""
    ext, F = _ext_or_skip(), _bnb_f()
    w = torch.tensor([list(nf4.NF4_MIDPOINTS) + [1.0]], dtype=torch.float32, device=cuda)
    w = torch.cat([w, -w], dim=1)
    for bs in (32, 64):
        packed, _ = ext.nf4_quantize(w, bs)
        bq, _ = F.quantize_4bit(w, blocksize=bs, compress_statistics=False, quant_type="nf4")
        assert_same_bits(packed, bq.reshape(-1, 1), f"ties bs={bs}")
        assert_same_bits(packed, REF_QUANT(w, bs)[0], f"ties vs reference bs={bs}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_quantize_large_double_quant_matches_bnb(cuda, monkeypatch, dtype):
    """4096x14336 through the public API (CUDA kernels, reference disabled) == bnb's CUDA quantize_4bit with
    compress_statistics=True: packed bytes, 8-bit absmax codes, nested absmax and offset."""
    _ext_or_skip()
    F = _bnb_f()
    monkeypatch.setenv("LORA_OPS_BACKEND", "auto")
    for name in ("reference_quantize_nf4", "reference_quantize_blockwise_8bit"):
        monkeypatch.setattr(nf4, name, _forbidden(name))
    g = torch.Generator(device=cuda).manual_seed(0)
    w = (torch.randn(4096, 14336, generator=g, device=cuda) * 0.02).to(dtype)
    w4 = lora_ops.quantize_nf4(w, blocksize=64, double_quant=True)
    bq, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert_same_bits(w4.data, bq.reshape(-1, 1), "packed (4096x14336)")
    assert_same_bits(w4.absmax, st.absmax, "nested absmax codes")
    assert_same_bits(w4.nested_absmax, st.state2.absmax.float(), "nested_absmax")
    assert_same_bits(w4.offset.reshape(()), st.offset.float().reshape(()), "offset")


@pytest.mark.gpu
def test_cuda_quantize_blockwise_8bit_matches_reference_and_bnb(cuda):
    ext, F = _ext_or_skip(), _bnb_f()
    code = nf4.dynamic_map(cuda)
    g = torch.Generator(device=cuda).manual_seed(3)
    v = torch.randn(256 * 37 + 77, generator=g, device=cuda) * 0.01
    v[256:512] = 0.0                             # an all-zero block: 0 * (1/0) = NaN -> code 0
    v[512:768] = code * 0.5                       # block absmax 0.5, so x = v * 2 hits every map entry exactly
    v[768:1023] = (code[:-1] + code[1:]) * 0.25   # x lands exactly on the midpoints: the tie rules
    v[1023] = 0.5
    q, absmax = ext.quantize_blockwise_8bit(v, code, 256)
    rq, ra = REF_QUANT8(v, code, 256)
    assert_same_bits(q, rq, "8-bit codes vs reference")
    assert_same_bits(absmax, ra, "8-bit absmax vs reference")
    bq, st = F.quantize_blockwise(v, code=code, blocksize=256)
    assert_same_bits(q, bq, "8-bit codes vs bnb CUDA")
    assert_same_bits(absmax, st.absmax.float(), "8-bit absmax vs bnb CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("blocksize", nf4.VALID_BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True])
def test_triton_dequant_cuda_matches_reference_and_bnb(cuda, blocksize, nested):
    F = _bnb_f()
    from lora_ops.triton_kernels.nf4_dequant import dequantize_nf4

    for rows, cols in [(37, 129), (67, 131), (3, 1001), (256, 384)]:
        for dtype in DTYPES:
            w = _weight(rows, cols, seed=rows + blocksize, zero_block_of=blocksize).to(cuda, dtype)
            bq, st = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
            if nested:
                args = (bq, st.absmax, st.state2.absmax, st.state2.code, st.offset)
            else:
                args = (bq, st.absmax, None, None, None)
            out = dequantize_nf4(*args, blocksize, rows, cols, dtype)
            what = f"{rows}x{cols} {dtype} bs={blocksize} nested={nested}"
            assert_same_bits(out, REF_DEQUANT(*args, blocksize, rows, cols, dtype), f"vs reference ({what})")
            assert_same_bits(out, F.dequantize_4bit(bq, st), f"vs bnb dequantize_4bit ({what})")


@pytest.mark.gpu
def test_opcheck_nf4_ops_cuda(cuda, monkeypatch):
    _ext_or_skip()
    monkeypatch.setenv("LORA_OPS_BACKEND", "auto")
    w, _ = _nf4_op_args(cuda, double_quant=True)
    for dtype in DTYPES:
        torch.library.opcheck(torch.ops.lora_ops.nf4_quantize.default, (w.to(dtype), 64))
    torch.library.opcheck(torch.ops.lora_ops.quantize_blockwise_8bit.default,
                          (torch.randn(300, device=cuda), nf4.dynamic_map(cuda), 256))
    for dq in (True, False):
        _, w4 = _nf4_op_args(cuda, double_quant=dq)
        for dtype in DTYPES:
            torch.library.opcheck(torch.ops.lora_ops.nf4_dequantize.default, (*w4.tensors(), 64, 37, 129, dtype))


@pytest.mark.gpu
def test_dequant_timing_4096x14336(cuda):
    """Prints ms and GB/s of the Triton dequantize (4096x14336 -> bf16) next to a device copy of the same
    output bytes and bitsandbytes' dequantize_4bit (all triton.testing.do_bench medians), plus a small sweep
    of program sizes. Target: <= 0.040 ms. Each sweep result is checked bit-equal."""
    import triton

    from lora_ops.triton_kernels import nf4_dequant as K

    F = _bnb_f()
    rows, cols = 4096, 14336
    g = torch.Generator(device=cuda).manual_seed(0)
    w = (torch.randn(rows, cols, generator=g, device=cuda) * 0.02).to(torch.bfloat16)
    out_bytes = rows * cols * 2

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")

    src = torch.empty(rows * cols, dtype=torch.bfloat16, device=cuda).normal_()
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src))
    copy_gbs = 2 * out_bytes / t_copy / 1e6
    print(f"\n[nf4 dequant 4096x14336 -> bf16] device copy of the output bytes: {t_copy:.4f} ms "
          f"({copy_gbs:.0f} GB/s read+write)")
    for nested in (True, False):
        bq, st = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        args = ((bq, st.absmax, st.state2.absmax, st.state2.code, st.offset) if nested
                else (bq, st.absmax, None, None, None))
        in_bytes = bq.numel() + st.absmax.numel() * st.absmax.element_size()
        ref = K.dequantize_nf4(*args, 64, rows, cols, torch.bfloat16)
        assert_same_bits(ref, F.dequantize_4bit(bq, st), "timed output vs bnb")
        t_ours = bench(lambda: K.dequantize_nf4(*args, 64, rows, cols, torch.bfloat16))
        t_op = bench(lambda: torch.ops.lora_ops.nf4_dequantize(*args, 64, rows, cols, torch.bfloat16))
        t_bnb = bench(lambda: F.dequantize_4bit(bq, st))
        gbs = (in_bytes + out_bytes) / t_ours / 1e6
        verdict = "MET" if t_ours <= 0.040 else "NOT MET"
        print(f"  double_quant={nested}: ours {t_ours:.4f} ms = {gbs:.0f} GB/s = {gbs / copy_gbs * 100:.0f}% of copy "
              f"bandwidth (its bytes at copy bandwidth: {(in_bytes + out_bytes) / copy_gbs / 1e6:.4f} ms); "
              f"through torch.ops.lora_ops.nf4_dequantize {t_op:.4f} ms; bnb dequantize_4bit {t_bnb:.4f} ms "
              f"({t_bnb / t_ours:.2f}x ours); target <= 0.040 ms {verdict}")
        for bpp, nw in [(1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 8)]:
            res = K._launch(*args, 64, rows, cols, torch.bfloat16, bytes_per_program=bpp, num_warps=nw)
            assert_same_bits(res, ref, f"sweep bytes_per_program={bpp} num_warps={nw}")
            t = bench(lambda: K._launch(*args, 64, rows, cols, torch.bfloat16, bytes_per_program=bpp,
                                        num_warps=nw))
            print(f"    sweep bytes_per_program={bpp:5d} num_warps={nw}: {t:.4f} ms "
                  f"({(in_bytes + out_bytes) / t / 1e6:.0f} GB/s)")


def test_triton_dequant_per_nested_block_offsets_interpreter(monkeypatch):
    """A projection group's stacked double-quantized weight keeps each member's offset, one per nested block
    (NESTED_OFFSETS): the Triton dequantize equals the reference and the members' own dequantizations stacked,
    bit for bit, whole and in row / column windows; one offset for all would differ."""
    from helpers import stacked_nf4_with_offsets
    from lora_ops.triton_kernels.nf4_dequant import _launch, dequantize_nf4

    rows, cols = (512, 256, 256), 128  # 1024, 512 and 512 blocks: 4, 2 and 2 nested blocks
    w4, members = stacked_nf4_with_offsets(rows, cols, seed=7)
    assert len({float(m.offset) for m in members}) == 3
    n = sum(rows)
    want = torch.cat([m.dequantize(torch.float32) for m in members])
    ref = REF_DEQUANT(*w4.tensors(), 64, n, cols, torch.float32)
    assert_same_bits(ref, want, "reference with per-nested-block offsets")
    _cpu_triton(monkeypatch)
    for dtype in (torch.float32, torch.float16):
        ref = REF_DEQUANT(*w4.tensors(), 64, n, cols, dtype)
        assert_same_bits(dequantize_nf4(*w4.tensors(), 64, n, cols, dtype), ref, f"Triton {dtype}")
        assert_same_bits(w4.dequantize(dtype), ref, f"NF4Weight.dequantize {dtype}")
    ref = REF_DEQUANT(*w4.tensors(), 64, n, cols, torch.float32)
    assert_same_bits(_launch(*w4.tensors(), 64, n, cols, torch.float32, row_range=(256, 768)), ref[256:768],
                     "row window across two members")
    assert_same_bits(_launch(*w4.tensors(), 64, n, cols, torch.float32, col_range=(64, 128)), ref[:, 64:128],
                     "column window")
    one = w4.offset[:1].clone()
    with pytest.raises(AssertionError, match="differ"):
        assert_same_bits(dequantize_nf4(w4.data, w4.absmax, w4.nested_absmax, w4.nested_code, one, 64, n, cols,
                                        torch.float32), ref)
    with pytest.raises(ValueError, match="one per nested block"):
        dequantize_nf4(w4.data, w4.absmax, w4.nested_absmax, w4.nested_code, w4.offset[:3], 64, n, cols,
                       torch.float32)
