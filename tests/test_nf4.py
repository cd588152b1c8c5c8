"""NF4 (lora_ops/nf4.py) against bitsandbytes 0.50.2 on CPU, in CI.

What bitsandbytes-on-CPU can and cannot vouch for (the format: lora_ops/nf4.py's docstring):

* single quantization: its CPU ``quantize_4bit`` (the pure-PyTorch "default" backend) rounds like CUDA except
  at exact midpoint ties (ties to the lower code everywhere; CUDA sends three of them up) and in all-zero
  blocks (0x77 instead of CUDA's 0x00, and absmax 1e-38 for an all-zero partial last block). Everything else
  must be byte-identical, so random weights are compared byte for byte and those two cases separately.
* dequantization: bnb 0.50.2's CPU C++ kernel is wrong when blocks straddle rows (see
  ``test_bnb_cpu_dequantize_kernel_bug``), so values are compared with bnb's pure-PyTorch
  ``_dequantize_4bit_compute`` everywhere and with ``dequantize_4bit`` where its kernel is right.
* double quantization: its CPU 8-bit quantizer is a lookup-table approximation, so the nested codes are
  compared with the exact nearest map entry instead (the CUDA rule), never with bnb-CPU.

Everything bit-exact goes through ``assert_nf4_equal`` (scripts/make_golden.py, also used for the golden
CUDA data); its mutation controls are at the end. The quantization-cost tests (SQNR) are statistical and kept
apart. CUDA itself is checked in tests/test_nf4_golden.py against data recorded on the GPU.
"""
import copy
import importlib.util
import json
import math
import os
import warnings

import pytest
import torch

with warnings.catch_warnings():  # bnb warns on CPU-only machines that its optional CPU gemm kernels are absent
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default import ops as bnb_default_ops
    from bitsandbytes.functional import QuantState

from lora_ops import nf4 as N
from lora_ops.nf4 import NF4Weight, quantize_nf4

_spec = importlib.util.spec_from_file_location(
    "make_golden", os.path.join(os.path.dirname(__file__), "..", "scripts", "make_golden.py"))
G = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(G)
assert_nf4_equal = G.assert_nf4_equal

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DNAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
BLOCKSIZES = N.VALID_BLOCKSIZES
# bnb wraps its pure-PyTorch dequantize in torch.compile (a compile per shape: seconds each on CPU); the
# undecorated function computes the same thing eagerly.
BNB_DEQUANT_COMPUTE = getattr(bnb_default_ops._dequantize_4bit_compute, "__wrapped__",
                              bnb_default_ops._dequantize_4bit_compute)
BNB_NF4_CODE = F.get_4bit_type("nf4", device="cpu")
QS_KEY = "weight." + N.QUANT_STATE_KEY
_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


@pytest.fixture(autouse=True, scope="module")
def _bnb_eager():
    """Run bnb's torch.compile-wrapped helpers eagerly (same arithmetic, no per-shape compile)."""
    with torch._dynamo.config.patch(disable=True):
        yield


# ------------------------------------------------------------------------------------------------ helpers

def make_weight(shape, dtype, seed, blocksize=64):
    """Realistic random weights (per-block scale spread, a few outliers); no all-zero block."""
    return G.random_weight(shape, dtype, seed, blocksize)


def ours_fields(w4: NF4Weight, dequant=()):
    f = {"packed": w4.data, "absmax": w4.absmax}
    if w4.nested:
        f.update(nested_absmax=w4.nested_absmax, offset=w4.offset)
    f.update({f"dequant.{DNAME[d]}": w4.dequantize(d) for d in dequant})
    return f


def bnb_absmax_fp32(qs: QuantState) -> torch.Tensor:
    """bnb's fp32 absmax, reconstructed the way its dequantize_4bit does (8-bit dequantize, then + offset)."""
    if not qs.nested:
        return qs.absmax
    absmax = F.dequantize_blockwise(qs.absmax, qs.state2)
    absmax += qs.offset
    return absmax


def bnb_dequant_compute(packed, qs: QuantState, dtype) -> torch.Tensor:
    """bnb's pure-PyTorch 4-bit dequantization (correct for every shape)."""
    return BNB_DEQUANT_COMPUTE(packed.reshape(-1).view(torch.uint8), bnb_absmax_fp32(qs), BNB_NF4_CODE,
                               qs.blocksize, qs.shape, dtype)


def bnb_dequant_api(packed, qs: QuantState, dtype) -> torch.Tensor:
    """bnb's public dequantize_4bit with output ``dtype`` (its C++ kernel for even row lengths)."""
    q2 = copy.copy(qs)
    q2.dtype = dtype
    return F.dequantize_4bit(packed, q2, quant_type="nf4")


def bnb_kernel_trusted(shape, blocksize) -> bool:
    """Where bnb 0.50.2's CPU dequantize_4bit is right: odd rows go to its PyTorch path, and its C++ kernel
    indexes absmax per row, which is right only when no block straddles two rows."""
    return shape[-1] % 2 == 1 or shape[-1] % blocksize == 0


def bnb_fields(packed, qs: QuantState, dequant=()):
    f = {"packed": packed, "absmax": qs.absmax}
    if qs.nested:
        f.update(nested_absmax=qs.state2.absmax, offset=qs.offset)
    f.update({f"dequant.{DNAME[d]}": bnb_dequant_compute(packed, qs, d) for d in dequant})
    return f


def codes_by_definition(scaled: torch.Tensor, bounds=None) -> torch.Tensor:
    """NF4 codes by definition, in float64 arithmetic: the number of the 15 strict bounds below the scaled
    value (default N.NF4_BOUNDS: the fp32 midpoints with bitsandbytes-CUDA's measured one-ulp shifts);
    NaN (0 * inf) -> code 0."""
    s = scaled.double().reshape(-1, 1)
    b = torch.tensor(N.NF4_BOUNDS if bounds is None else bounds, dtype=torch.float64)
    codes = (s > b).sum(1)
    return torch.where(torch.isnan(s[:, 0]), 0, codes)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, torch.tensor([7], dtype=torch.uint8)])
    return ((c[0::2] << 4) | c[1::2]).reshape(-1, 1)


def exact_nearest_map_codes(values: torch.Tensor, nested_absmax: torch.Tensor, blocksize: int = 256):
    """(codes, tie mask): the dynamic-map entry nearest to fp32(values * fp32(1/absmax of its block)),
    distances in float64 (exact for fp32 inputs); tie = two entries exactly equally near."""
    v = values.reshape(-1).float()
    inv = torch.reciprocal(nested_absmax.float()).repeat_interleave(blocksize)[:v.numel()]
    x = (v * inv).double()
    dm = N.dynamic_map().double()
    d = (x[:, None] - dm[None, :]).abs()
    best = d.argmin(1)
    tie = (d == d.gather(1, best[:, None])).sum(1) > 1
    return best.to(torch.uint8), tie


# --------------------------------------------------------------------------------------------- constants

def test_constants_match_bitsandbytes():
    assert_nf4_equal({"code": N.nf4_codebook()}, {"code": BNB_NF4_CODE}, "NF4 codebook")
    assert_nf4_equal({"map": N.dynamic_map()}, {"map": F.create_dynamic_map(signed=True)}, "dynamic map")
    # bnb's own decision thresholds (default backend): fp32 means of neighbouring codes
    bnb_mids = (BNB_NF4_CODE[:-1] + BNB_NF4_CODE[1:]) / 2
    assert_nf4_equal({"mids": torch.tensor(N.NF4_MIDPOINTS, dtype=torch.float32)}, {"mids": bnb_mids}, "midpoints")


# ------------------------------------------------------------------------------------ single quantization

SHAPES = [(37, 129), (3, 5), (1, 1), (100, 333), (5, 4097), (6, 512), (64, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_single_quant_matches_bnb(shape, blocksize, dtype):
    """Packed bytes, absmax and dequantized values (all three output dtypes) identical to bnb-CPU; blocks
    straddle rows whenever in % blocksize != 0, odd counts pad with code 7."""
    seed = shape[0] * 7919 + shape[1] * 31 + blocksize + DTYPES.index(dtype)
    w = make_weight(shape, dtype, seed, blocksize)
    ours = quantize_nf4(w, blocksize, double_quant=False)
    q, qs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
    assert_nf4_equal(ours_fields(ours, DTYPES), bnb_fields(q, qs, DTYPES), f"{shape} bs={blocksize} {dtype}")
    if bnb_kernel_trusted(shape, blocksize):
        for d in DTYPES:
            assert_nf4_equal({"dequant": ours.dequantize(d)}, {"dequant": bnb_dequant_api(q, qs, d)},
                             f"dequantize_4bit {shape} bs={blocksize} {dtype}->{d}")


def test_odd_count_pads_with_code_7():
    w = make_weight((3, 5), torch.float32, 1)
    last = int(quantize_nf4(w, 64, double_quant=False).data[-1, 0])
    assert last & 0xF == 7, f"pad nibble {last & 0xF}, odd counts pad the low nibble with code 7"


def test_bnb_dequantize_compiled_path():
    """bnb as its users run it (its torch.compile wrapper enabled; one compile, seconds) on an odd-row shape."""
    with torch._dynamo.config.patch(disable=False):
        w = make_weight((3, 5), torch.bfloat16, 40)
        ours = quantize_nf4(w, 64, double_quant=False)
        q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        assert_nf4_equal({"dequant": ours.dequantize()}, {"dequant": F.dequantize_4bit(q, qs, quant_type="nf4")},
                         "compiled dequantize_4bit")


_BNB_KERNEL_BUG = _AVX512 and bnb.__version__ == "0.50.2"


@pytest.mark.parametrize("shape,blocksize", [((64, 64), 128), ((3, 48), 32), ((3, 96), 64)])
def test_bnb_cpu_dequantize_kernel_bug(shape, blocksize):
    """bitsandbytes 0.50.2's CPU dequantize_4bit (its AVX-512 kernel: even rows, length a multiple of 16) reads
    absmax[row * (cols // blocksize) + col // blocksize]: wrong whenever blocks straddle rows. Its bytes and
    its pure-PyTorch dequantize are right. This test pins the bug exactly; when it fails on "the kernel now
    matches", bitsandbytes fixed it and ``bnb_kernel_trusted`` can go."""
    w = make_weight(shape, torch.float32, 7, blocksize)
    ours = quantize_nf4(w, blocksize, double_quant=False)
    q, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert_nf4_equal(ours_fields(ours, (torch.float32,)), bnb_fields(q, qs, (torch.float32,)), "bytes")
    api = bnb_dequant_api(q, qs, torch.float32)
    if not _BNB_KERNEL_BUG:  # another version, or a CPU without AVX-512 (scalar kernel): must be right
        assert_nf4_equal({"dequant": api}, {"dequant": ours.dequantize()}, "bnb-CPU dequantize_4bit")
        return
    rows, cols = shape
    codes = G.unpack_codes(q)[:rows * cols].view(rows, cols)
    per_row = torch.arange(rows)[:, None] * (cols // blocksize) + torch.arange(cols)[None, :] // blocksize
    assert_nf4_equal({"dequant": api}, {"dequant": N.nf4_codebook()[codes] * qs.absmax[per_row]},
                     "bnb 0.50.2 CPU kernel no longer shows its per-row absmax bug (fixed upstream?)")
    with pytest.raises(AssertionError, match="dequant differs"):
        assert_nf4_equal({"dequant": api}, {"dequant": ours.dequantize()}, "bnb-CPU dequantize_4bit")


@pytest.mark.parametrize("dtype", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("builder", ["zero_block_weight", "zero_tail_weight"])
def test_all_zero_blocks_follow_cuda(builder, dtype):
    """All-zero blocks (and -0.0 blocks, and an all-zero partial last block with an odd count): code 0 for
    every element and for the pad nibble (CUDA: 1/0 = inf, 0 * inf = NaN fails every ``>``), absmax 0.
    bitsandbytes-CPU writes 0x77 there (and absmax 1e-38 for a partial last block); everything else must
    match it byte for byte, and both dequantize to zero."""
    w, bs = getattr(G, builder)(dtype, 11)
    n = w.numel()
    ours = quantize_nf4(w, bs, double_quant=False)
    q, qs = F.quantize_4bit(w, blocksize=bs, quant_type="nf4")
    flat = w.reshape(-1).float()
    nb = -(-n // bs)
    zero_block = torch.tensor([bool(flat[b * bs:(b + 1) * bs].abs().max() == 0) for b in range(nb)])
    assert zero_block.any() and (builder != "zero_tail_weight" or zero_block[-1])
    # expected = bnb-CPU's codes, with CUDA's code 0 in every element (and pad) of an all-zero block
    codes = G.unpack_codes(q)  # 2 * bytes codes: the pad nibble, if any, belongs to the last block
    in_zero = zero_block[torch.arange(codes.numel()).clamp(max=n - 1) // bs]
    assert bool((codes[in_zero] == 7).all()), "bitsandbytes-CPU no longer writes code 7 in all-zero blocks"
    want_codes = torch.where(in_zero, 0, codes)
    want_absmax = torch.where(zero_block, 0.0, qs.absmax)
    assert_nf4_equal({"packed": ours.data, "absmax": ours.absmax},
                     {"packed": pack_codes(want_codes), "absmax": want_absmax}, f"{builder} {dtype}")
    for d in DTYPES:
        deq = ours.dequantize(d)
        assert bool((deq.reshape(-1)[in_zero[:n]] == 0).all())
        assert_nf4_equal({"dequant": deq.reshape(-1)[~in_zero[:n]]},
                         {"dequant": bnb_dequant_compute(q, qs, d).reshape(-1)[~in_zero[:n]]}, f"dequant {d}")


def test_ties_fp32():
    """Values exactly on each of the 15 midpoints and k = -2..2 fp32 ulps away, absmax 1, 2, 0.5, 1.7.
    Ours follows bitsandbytes-CUDA's rule (ties down except NF4_TIES_UP); bnb-CPU ties down everywhere, so the two
    differ exactly at k = 0 on the NF4_TIES_UP midpoints and nowhere else."""
    blocks = G.fp32_tie_blocks()
    w = G.blocks_to_weight([v for v, _ in blocks], 64, torch.float32)
    absmax = w.abs().amax(1, keepdim=True)
    scaled = G.scaled_fp32(w, absmax)
    # the builder's claim: each value scales to exactly its target (midpoint moved k ulps)
    for b, (_, meta) in enumerate(blocks):
        got = scaled[b, 1:1 + len(meta)].tolist()
        assert got == [t for _, _, t in meta], f"tie block {b}: scaled {got} != targets"
    n_ties = sum(k == 0 for _, meta in blocks for _, k, _ in meta)
    assert n_ties >= 4 * 15 - 4, f"only {n_ties} of 60 exact ties were constructible (57 expected)"
    ours = quantize_nf4(w, 64, double_quant=False)
    want = codes_by_definition(scaled)
    assert_nf4_equal({"packed": ours.data}, {"packed": pack_codes(want)}, "ties vs the measured CUDA bounds")
    q, _ = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    bnb_codes, our_codes = G.unpack_codes(q), G.unpack_codes(ours.data)
    # bitsandbytes-CPU bucketizes against the plain fp32 midpoints (ties down everywhere): it must differ from
    # us exactly where the midpoints and the CUDA bounds disagree, i.e. at the four shifted thresholds.
    by_mids = codes_by_definition(scaled, N.NF4_MIDPOINTS)
    assert torch.equal(bnb_codes, by_mids[: bnb_codes.numel()].to(bnb_codes.dtype))
    differ = our_codes != bnb_codes
    expected = (want != by_mids)[: differ.numel()]
    assert torch.equal(differ, expected)
    assert int(differ.sum()) == len(N.NF4_BOUND_ULP_SHIFT) * len(G.TIE_ABSMAX), "a shifted-bound case is missing"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DNAME.get)
def test_ties_low_precision(dtype):
    """bf16/fp16 near-ties (1-2 dtype ulps from a midpoint) and the rare exact ties: codes follow the rule,
    and bnb-CPU agrees except on exact ties at the NF4_TIES_UP midpoints."""
    w = G.blocks_to_weight(G.lowp_tie_blocks(dtype), 64, dtype)
    scaled = G.scaled_fp32(w, w.float().abs().amax(1, keepdim=True))
    ours = quantize_nf4(w, 64, double_quant=False)
    assert_nf4_equal({"packed": ours.data}, {"packed": pack_codes(codes_by_definition(scaled))}, "rule")
    q, _ = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    mids = torch.tensor(N.NF4_MIDPOINTS)
    up = torch.zeros(scaled.numel(), dtype=torch.bool)
    for i in N.NF4_TIES_UP:
        up |= scaled.reshape(-1) == mids[i]
    assert torch.equal(G.unpack_codes(q)[:scaled.numel()] != G.unpack_codes(ours.data)[:scaled.numel()], up)


# ------------------------------------------------------------------------------------ double quantization

DQ_CASES = [((100, 333), 32, torch.float32), ((37, 129), 64, torch.bfloat16), ((1, 64 * 256 + 1), 64, torch.float16),
            ((149, 129), 32, torch.float32), ((64, 64), 128, torch.bfloat16), ((5, 4097), 4096, torch.float32)]


@pytest.mark.parametrize("shape,blocksize,dtype", DQ_CASES,
                         ids=[f"{s[0]}x{s[1]}-bs{b}-{DNAME[d]}" for s, b, d in DQ_CASES])
def test_double_quant(shape, blocksize, dtype):
    w = make_weight(shape, dtype, 500 + shape[0], blocksize)
    ours = quantize_nf4(w, blocksize, double_quant=True)
    q, qs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    # the 4-bit bytes, offset and nested absmax are exact in bnb-CPU too
    assert_nf4_equal({"packed": ours.data, "offset": ours.offset, "nested_absmax": ours.nested_absmax},
                     {"packed": q, "offset": qs.offset, "nested_absmax": qs.state2.absmax}, "bytes/offset")
    # nested codes: the exact nearest map entry (CUDA's rule; bnb-CPU's lookup table is approximate)
    absmax = quantize_nf4(w, blocksize, double_quant=False).absmax
    codes, tie = exact_nearest_map_codes(absmax - ours.offset, ours.nested_absmax)
    assert not bool(tie.any()), "random data produced an exact tie between two map entries"
    assert_nf4_equal({"absmax": ours.absmax}, {"absmax": codes}, "nested codes vs exact nearest")
    # bitsandbytes reads OUR state dict and dequantizes it to exactly our values
    sd = ours.state_dict("m.")
    qs_ours = QuantState.from_dict({k: v for k, v in sd.items() if k != "m.weight"}, device=torch.device("cpu"))
    for d in DTYPES:
        want = ours.dequantize(d)
        assert_nf4_equal({"dequant": bnb_dequant_compute(sd["m.weight"], qs_ours, d)}, {"dequant": want},
                         f"bnb dequant of our state {d}")
        if bnb_kernel_trusted(shape, blocksize):
            assert_nf4_equal({"dequant": bnb_dequant_api(sd["m.weight"], qs_ours, d)}, {"dequant": want},
                             f"bnb dequantize_4bit of our state {d}")
    # the quant-state JSON is byte-identical to what bnb writes for the same weight
    assert_nf4_equal({"json": sd["m." + QS_KEY]}, {"json": qs.as_dict(packed=True)[N.QUANT_STATE_KEY]}, "JSON")


@pytest.mark.parametrize("shape", [(3, 5), (1, 1), (8, 8)])
def test_double_quant_single_block(shape):
    """One absmax entry: offset = absmax, nested absmax 0, code 0 (NaN path); reconstruction is exact, so the
    dequantized weight equals the single-quant one; bnb reading our state agrees."""
    w = make_weight(shape, torch.float32, 3)
    single = quantize_nf4(w, 64, double_quant=False)
    dq = quantize_nf4(w, 64, double_quant=True)
    assert_nf4_equal({"offset": dq.offset, "nested_absmax": dq.nested_absmax, "absmax": dq.absmax},
                     {"offset": single.absmax[0], "nested_absmax": torch.zeros(1),
                      "absmax": torch.zeros(1, dtype=torch.uint8)},
                     "single-block double quant")
    assert_nf4_equal({"dequant": dq.dequantize()}, {"dequant": single.dequantize()}, "dq == single")
    sd = dq.state_dict()
    qs = QuantState.from_dict({k: v for k, v in sd.items() if k != "weight"}, device=torch.device("cpu"))
    assert_nf4_equal({"dequant": bnb_dequant_compute(sd["weight"], qs, torch.float32)},
                     {"dequant": dq.dequantize()}, "bnb reads single-block state")


def test_quantize_blockwise_8bit_is_exact_nearest():
    """2^16 values at every magnitude the dynamic map resolves: the reference's 8-bit code is the nearest map
    entry (float64 distances), the map's own entries map to themselves, and absmax is exact."""
    g = torch.Generator().manual_seed(8)
    n = 1 << 16
    mag = torch.pow(10.0, -torch.rand(n, generator=g, dtype=torch.float64) * 7)
    vals = (mag * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)).float()
    vals[::256] = torch.rand(n // 256, generator=g) + 0.5  # a varied positive absmax per block
    codes, absmax = N.reference_quantize_blockwise_8bit(vals, N.dynamic_map(), 256)
    assert_nf4_equal({"absmax": absmax}, {"absmax": vals.view(-1, 256).abs().amax(1)}, "8-bit absmax")
    want, tie = exact_nearest_map_codes(vals, absmax)
    assert not bool(tie.any())
    assert_nf4_equal({"codes": codes}, {"codes": want}, "8-bit codes vs exact nearest")
    ident, _ = N.reference_quantize_blockwise_8bit(N.dynamic_map(), N.dynamic_map(), 256)
    assert_nf4_equal({"codes": ident}, {"codes": torch.arange(256).to(torch.uint8)}, "map entries")


# -------------------------------------------------------------------------- checkpoints and bnb modules

LINEAR_CASES = [(129, 37, 64, torch.float32, True, torch.uint8), (96, 40, 32, torch.bfloat16, False, torch.uint8),
                (256, 24, 128, torch.float16, True, torch.bfloat16), (333, 7, 4096, torch.bfloat16, True, torch.uint8)]


def _bnb_linear(in_f, out_f, bs, dtype, dq, storage, seed):
    """A bnb Linear4bit at prefix "m" of a parent module, holding ``w``, quantized the way bnb 0.50.2 does on
    CPU: moving the module (``.to("cpu")``) quantizes a not-yet-quantized Params4bit."""
    w = make_weight((out_f, in_f), dtype, seed, bs)
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=True, compute_dtype=dtype, compress_statistics=dq, quant_type="nf4",
                            quant_storage=storage)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, blocksize=bs, compress_statistics=dq,
                                   quant_type="nf4", quant_storage=storage)
    parent = torch.nn.Module()
    parent.m = lin
    assert not lin.weight.bnb_quantized
    parent.to("cpu")
    assert parent.m.weight.bnb_quantized and parent.m.weight.quant_state.blocksize == bs
    return parent, w


LINEAR_IDS = [f"{c[0]}x{c[1]}-bs{c[2]}-{DNAME[c[3]]}-dq{int(c[4])}-{str(c[5])[6:]}" for c in LINEAR_CASES]


@pytest.mark.parametrize("in_f,out_f,bs,dtype,dq,storage", LINEAR_CASES, ids=LINEAR_IDS)
def test_linear4bit_state_dict_round_trip(in_f, out_f, bs, dtype, dq, storage):
    parent, w = _bnb_linear(in_f, out_f, bs, dtype, dq, storage, seed=in_f + out_f)
    lin = parent.m
    sd = parent.state_dict()
    w4 = NF4Weight.from_state_dict(sd, "m.")
    shape = (out_f, in_f)
    for d in DTYPES:
        want = bnb_dequant_compute(lin.weight, lin.weight.quant_state, d)
        assert_nf4_equal({"dequant": w4.dequantize(d)}, {"dequant": want}, f"from_state_dict dequant {d}")
        if bnb_kernel_trusted(shape, bs):
            assert_nf4_equal({"dequant": w4.dequantize(d)},
                             {"dequant": bnb_dequant_api(lin.weight, lin.weight.quant_state, d)}, f"api {d}")
    # the same weight quantized by us: same bytes (nested codes aside: bnb-CPU's are approximate)
    ours = quantize_nf4(w, bs, double_quant=dq)
    want = {"packed": lin.weight.data.reshape(-1).view(torch.uint8).reshape(-1, 1)}
    want.update({"offset": lin.weight.quant_state.offset, "nested_absmax": lin.weight.quant_state.state2.absmax}
                if dq else {"absmax": lin.weight.quant_state.absmax})
    assert_nf4_equal(ours_fields(ours), want, "quantize_nf4 vs Linear4bit")
    # prefix convention: exactly bnb's keys (bias aside), same dtypes/shapes (the packed weight is stored
    # as uint8 by us; quant_storage only reinterprets the same bytes), same quant-state JSON bytes
    ours_sd = ours.state_dict("m.")
    assert set(ours_sd) == set(sd) - {"m.bias"}
    for k, v in ours_sd.items():
        if k == "m.weight":
            assert v.numel() * v.element_size() == sd[k].numel() * sd[k].element_size()
        else:
            assert (v.dtype, tuple(v.shape)) == (sd[k].dtype, tuple(sd[k].shape)), k
    assert_nf4_equal({"json": ours_sd["m." + QS_KEY]}, {"json": sd["m." + QS_KEY]}, "quant-state JSON")


@pytest.mark.parametrize("in_f,out_f,bs,dtype,dq,storage", LINEAR_CASES[:3], ids=LINEAR_IDS[:3])
def test_from_bnb_to_bnb_round_trip(in_f, out_f, bs, dtype, dq, storage):
    parent, _ = _bnb_linear(in_f, out_f, bs, dtype, dq, storage, seed=7 * in_f)
    p = parent.m.weight
    qs = p.quant_state
    w4 = NF4Weight.from_bnb(p)
    want = {"packed": p.data.reshape(-1).view(torch.uint8).reshape(-1, 1), "absmax": qs.absmax}
    if dq:
        want.update(nested_absmax=qs.state2.absmax, offset=qs.offset)
    assert_nf4_equal(ours_fields(w4), want, "from_bnb takes bnb's bytes as they are")
    assert (w4.shape, w4.dtype, w4.blocksize, w4.nested) == (qs.shape, qs.dtype, bs, dq)
    p2 = w4.to_bnb()
    assert_nf4_equal(ours_fields(NF4Weight.from_bnb(p2)), ours_fields(w4), "from_bnb(to_bnb(w4))")
    assert_nf4_equal(p2.quant_state.as_dict(packed=True), qs.as_dict(packed=True), "to_bnb quant state")
    assert_nf4_equal({"dequant": bnb_dequant_compute(p2, p2.quant_state, dtype)}, {"dequant": w4.dequantize()},
                     "bnb dequantizes to_bnb's weight to our values")


def test_from_bnb_refuses_cpu_packed_weight():
    """An eval-mode no-grad forward on a CPU with AVX512-BF16 rewrites weight.data into bnb's CPU-only layout;
    from_bnb must refuse it rather than read scrambled bytes."""
    lin = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, compress_statistics=False,
                            quant_type="nf4").to("cpu").eval()
    with torch.no_grad():
        lin(torch.randn(1, 128, dtype=torch.bfloat16))
    if not getattr(lin.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU/bitsandbytes did not repack the weight (no AVX512-BF16 path)")
    with pytest.raises(ValueError, match="CPU-only packing"):
        NF4Weight.from_bnb(lin.weight)


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("prefix", ["", "m.", "model.layers.0.self_attn.q_proj."])
def test_state_dict_round_trip(prefix, dq):
    w4 = quantize_nf4(make_weight((37, 129), torch.bfloat16, 5), 64, double_quant=dq)
    sd = w4.state_dict(prefix)
    assert all(k.startswith(prefix + "weight") for k in sd)
    back = NF4Weight.from_state_dict(sd, prefix)
    assert_nf4_equal(ours_fields(back, DTYPES), ours_fields(w4, DTYPES), f"round trip prefix={prefix!r}")
    assert (back.shape, back.dtype, back.blocksize) == (w4.shape, w4.dtype, w4.blocksize)
    qs = json.loads(bytes(sd[prefix + QS_KEY].tolist()).decode())
    assert qs["shape"] == [37, 129] and qs["dtype"] == "bfloat16" and ("nested_offset" in qs) == dq
    # bitsandbytes reads the same dict (its from_dict strips the prefix) and dequantizes to our values
    bnb_qs = QuantState.from_dict({k: v for k, v in sd.items() if k != prefix + "weight"}, device=torch.device("cpu"))
    assert_nf4_equal({"dequant": bnb_dequant_api(sd[prefix + "weight"], bnb_qs, torch.bfloat16)},
                     {"dequant": w4.dequantize()}, "bnb from_dict + dequantize_4bit")


# --------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("weight,exc,match", [
    (torch.randn(10), ValueError, "2-D"),
    (torch.randn(2, 3, 4), ValueError, "2-D"),
    (torch.zeros(0, 5), ValueError, "empty"),
    (torch.ones(4, 4, dtype=torch.int32), TypeError, "float32, float16 or bfloat16"),
    (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN or Inf"),
    (torch.tensor([[1.0, float("inf")]]), ValueError, "NaN or Inf"),
    ([[1.0, 2.0]], TypeError, "torch.Tensor"),
], ids=["1d", "3d", "empty", "int", "nan", "inf", "list"])
def test_quantize_rejects_bad_weight(weight, exc, match):
    with pytest.raises(exc, match=match):
        quantize_nf4(weight)


@pytest.mark.parametrize("blocksize", [0, 48, 8192, True, 64.0, "64"])
def test_quantize_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match=r"blocksize=.* is not supported; use one of \(32, 64"):
        quantize_nf4(torch.randn(4, 64), blocksize=blocksize)


def test_quantize_rejects_bad_double_quant():
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        quantize_nf4(torch.randn(4, 64), double_quant="yes")


def _sd(dq=True, prefix="m."):
    return quantize_nf4(make_weight((7, 33), torch.float32, 9), 32, double_quant=dq).state_dict(prefix)


def _corrupt_json(sd, text):
    sd["m." + QS_KEY] = torch.tensor(list(text.encode()), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize("mutate,match", [
    (lambda sd: sd.pop("m.weight.absmax"), r"no key 'm.weight.absmax'"),
    (lambda sd: sd.pop("m." + QS_KEY), r"no key 'm.weight.quant_state.bitsandbytes__nf4'"),
    (lambda sd: sd.pop("m.weight.nested_absmax"), r"no key 'm.weight.nested_absmax'"),
    (lambda sd: sd.pop("m.weight"), r"no key 'm.weight'"),
    (lambda sd: _corrupt_json(sd, '{"quant_type": "nf4", "blocksize"'), "not valid UTF-8 JSON"),
    (lambda sd: sd.__setitem__("m." + QS_KEY, torch.tensor([0xff, 0xfe], dtype=torch.uint8)), "not valid UTF-8 JSON"),
    (lambda sd: _corrupt_json(sd, '{"quant_type": "fp4", "blocksize": 32, "dtype": "float32", "shape": [7, 33]}'),
     "not NF4"),
    (lambda sd: _corrupt_json(sd, '{"quant_type": "nf4", "dtype": "float32", "shape": [7, 33]}'), "lacks 'blocksize'"),
    (lambda sd: _corrupt_json(sd, '{"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [7, 33]}'),
     "blocksize=48 is not supported"),
    (lambda sd: _corrupt_json(sd, '{"quant_type": "nf4", "blocksize": 32, "dtype": "int8", "shape": [7, 33]}'),
     "dtype 'int8'"),
    (lambda sd: _corrupt_json(sd, '{"quant_type": "nf4", "blocksize": 32, "dtype": "float32", "shape": [7]}'),
     r"shape \[7\] must be \[out, in\]"),
    (lambda sd: sd.__setitem__("m.weight", sd["m.weight"][:-1]), "has 115 bytes but shape"),
    (lambda sd: sd.__setitem__("m.weight.absmax", sd["m.weight.absmax"][:-1]), "absmax has 7 entries"),
    (lambda sd: sd.__setitem__("m.weight.quant_map", torch.linspace(-1, 1, 16)), "not the NF4 codebook"),
    (lambda sd: sd.__setitem__("m.weight.absmax", sd["m.weight.absmax"].float()), "must be uint8 codes"),
    (lambda sd: sd.__setitem__("m.weight.nested_absmax", torch.ones(2)), "nested_absmax has 2 entries"),
], ids=["no-absmax", "no-json", "no-nested", "no-weight", "truncated-json", "not-utf8", "fp4", "no-blocksize",
        "bad-blocksize", "bad-dtype", "bad-shape", "wrong-byte-count", "wrong-absmax-count", "bad-quant-map",
        "float-codes", "nested-count"])
def test_from_state_dict_rejects_bad_input(mutate, match):
    sd = _sd()
    mutate(sd)
    with pytest.raises(ValueError, match=match):
        NF4Weight.from_state_dict(sd, "m.")


def test_from_state_dict_rejects_codes_without_double_quant():
    sd = _sd(dq=False)
    sd["m.weight.absmax"] = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="absmax must be float32 without double quantization"):
        NF4Weight.from_state_dict(sd, "m.")


def test_from_state_dict_wrong_prefix_names_the_key():
    with pytest.raises(ValueError, match=r"no key 'n.weight.quant_state.bitsandbytes__nf4'.*prefix 'n.'"):
        NF4Weight.from_state_dict(_sd(), "n.")


# ----------------------------------------------------------------------- cost of quantization (statistics)

def predicted_mse(blocksize: int) -> float:
    """Mean squared NF4 round-trip error per element for iid N(0,1) weights, from first principles.

    In a block of B iid samples the largest |x| is the absmax a, with density d/da erf(a/sqrt2)^B; it maps to
    ±1 exactly (error 0). Given a, the other B - 1 are iid N(0,1) conditioned on |x| < a, each with error
    a * (u - Q(u)) at u = x / a, Q = nearest NF4 codebook value. So
        MSE = (B - 1)/B * ∫ p(a) * a^3 ∫_{-1}^{1} φ(a u) (u - Q(u))^2 du / erf(a/sqrt2) da,
    evaluated by the trapezoid rule (the integrand is continuous: the error is equal on both sides of a
    midpoint)."""
    code = torch.tensor(N.NF4_CODEBOOK, dtype=torch.float64)
    u = torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64)
    e2 = (u - code[torch.bucketize(u, (code[:-1] + code[1:]) / 2)]) ** 2
    a = torch.linspace(1e-3, 9.0, 1800, dtype=torch.float64)
    phi = lambda x: torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # noqa: E731
    erf_a = torch.erf(a / math.sqrt(2))
    inner = torch.trapezoid(phi(a[:, None] * u[None, :]) * e2[None, :], u, dim=1) * a ** 3 / erf_a
    dens = blocksize * erf_a ** (blocksize - 1) * 2 * phi(a)
    return (blocksize - 1) / blocksize * float(torch.trapezoid(dens * inner, a))


def test_sqnr_matches_first_principles_and_grows_with_smaller_blocks():
    """Round-trip SQNR of NF4 on N(0,1) weights (single quantization, fp32): within 4 standard errors (blocks
    are iid, so the per-block mean errors give the standard error) of ``predicted_mse``, and the error strictly
    increases with the block size. Typical: ~20.5 dB at bs=64."""
    g = torch.Generator().manual_seed(20)
    n = 1 << 18
    x = torch.randn(n, generator=g)
    measured, predicted = [], []
    for bs in BLOCKSIZES:
        w4 = quantize_nf4(x.reshape(-1, 512), bs, double_quant=False)
        err2 = (w4.dequantize(torch.float32).reshape(-1).double() - x.double()) ** 2
        per_block = err2.view(-1, bs).mean(1)
        mse = float(per_block.mean())
        se = float(per_block.std()) / math.sqrt(per_block.numel())
        pred = predicted_mse(bs)
        assert abs(mse - pred) <= 4 * se + 1e-4 * pred, (
            f"bs={bs}: MSE {mse:.5e} ({-10 * math.log10(mse):.2f} dB) vs predicted {pred:.5e} "
            f"({-10 * math.log10(pred):.2f} dB), standard error {se:.2e}")
        measured.append(mse)
        predicted.append(pred)
    assert all(a < b for a, b in zip(predicted, predicted[1:])), predicted
    assert all(a < b for a, b in zip(measured, measured[1:])), f"MSE not increasing with block size: {measured}"
    sqnr64 = -10 * math.log10(measured[BLOCKSIZES.index(64)])
    assert 19.0 < sqnr64 < 22.0, f"SQNR at bs=64 is {sqnr64:.2f} dB; NF4 on Gaussian weights gives about 20.5"


def test_sqnr_prediction_detects_a_wrong_codebook():
    """Control: the same statistical check separates NF4 from a 4-bit uniform grid on the same data."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(1 << 16, generator=g, dtype=torch.float64).view(-1, 64)
    absmax = x.abs().amax(1, keepdim=True)
    grid = torch.linspace(-1, 1, 16, dtype=torch.float64)
    u = x / absmax
    xq = grid[torch.bucketize(u, (grid[:-1] + grid[1:]) / 2)] * absmax
    per_block = ((xq - x) ** 2).mean(1)
    se = float(per_block.std()) / math.sqrt(per_block.numel())
    assert abs(float(per_block.mean()) - predicted_mse(64)) > 4 * se


# ---------------------------------------------------------------------------------- mutation controls

def _good_pair():
    w = make_weight((67, 129), torch.float32, 77, 32)  # 271 blocks: two nested blocks
    ours = quantize_nf4(w, 32, double_quant=True)
    q, qs = F.quantize_4bit(w, blocksize=32, compress_statistics=True, quant_type="nf4")
    got = {"packed": ours.data, "offset": ours.offset, "nested_absmax": ours.nested_absmax,
           "dequant": ours.dequantize()}
    # bnb's dequantization of our state (its own nested codes are approximate on CPU)
    want = {"packed": q, "offset": qs.offset, "nested_absmax": qs.state2.absmax,
            "dequant": bnb_dequant_compute(ours.data, ours.to_bnb().quant_state, torch.float32)}
    return ours, got, want


def test_mutations_fail_the_comparison():
    ours, got, want = _good_pair()
    assert_nf4_equal(got, want, "control")  # the unmutated pair passes
    p = ours.data
    mutations = {
        "swapped nibbles": {"packed": ((p & 0xF) << 4) | (p >> 4)},
        "off-by-one block absmax": {"dequant": N.reference_dequantize_nf4(
            p, torch.roll(N.reference_absmax(ours.absmax, ours.nested_absmax, ours.nested_code, ours.offset), 1),
            None, None, None, 32, 67, 129, torch.float32)},
        "wrong offset": {"offset": torch.nextafter(ours.offset, torch.tensor(float("inf")))},
        "dequant one ulp": {"dequant": torch.nextafter(got["dequant"], torch.full_like(got["dequant"], 9.0))},
        "nested absmax of the next block": {"nested_absmax": ours.nested_absmax.flip(0)},
        "dtype": {"offset": ours.offset.double()},
        "missing field": {"packed": None},
    }
    for name, change in mutations.items():
        bad = dict(got)
        bad.update(change)
        bad = {k: v for k, v in bad.items() if v is not None}
        with pytest.raises(AssertionError):
            assert_nf4_equal(bad, want, name)
            pytest.fail(f"mutation {name!r} passed the comparison")


def test_mutation_tie_rounded_the_other_way():
    """A value exactly on midpoint 3 (not a tie-up midpoint): ours and bnb-CPU agree; flipping that one code to
    the upper neighbour must fail the same comparison."""
    m = N.NF4_MIDPOINTS[3]
    w = torch.tensor([[1.0, m] + [0.25] * 30], dtype=torch.float32)
    ours = quantize_nf4(w, 32, double_quant=False)
    q, _ = F.quantize_4bit(w, blocksize=32, quant_type="nf4")
    assert_nf4_equal({"packed": ours.data}, {"packed": q}, "tie control")
    assert int(ours.data[0, 0]) & 0xF == 3
    flipped = ours.data.clone()
    flipped[0, 0] = (int(flipped[0, 0]) & 0xF0) | 4
    with pytest.raises(AssertionError, match="packed differs at 1/16 entries"):
        assert_nf4_equal({"packed": flipped}, {"packed": q}, "tie flipped")
