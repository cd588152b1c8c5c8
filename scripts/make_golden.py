"""Write the NF4 golden vectors: bitsandbytes' CUDA outputs (and our reference's, run on the same GPU).

Run on the GPU machine (CUDA + a CUDA build of bitsandbytes; no network), then commit the file:

    python scripts/make_golden.py [--out DIR] [--fast]      # DIR defaults to tests/golden/
    python scripts/make_golden.py --device cpu --out /tmp/g  # dry run against bitsandbytes-CPU (not golden)

It writes DIR/nf4_cuda_golden.pt (torch.save of CPU tensors, < 2 MB), prints every disagreement between
bitsandbytes-CUDA and our reference computed on the GPU, and ends with a one-line summary.
``tests/test_nf4_golden.py`` then checks our CPU reference against every case byte for byte.
``--fast`` also runs the package's fast CUDA/Triton kernels (``lora_ops.quantize_nf4`` and
``NF4Weight.dequantize`` on CUDA) and prints their disagreements (not stored; may compile kernels).

File layout: {"meta": {...}, "cases": [case, ...]}; a case is
    name, family, kind ("nf4" | "blockwise8"), input (CPU tensor), blocksize, double_quant,
    bnb: {"packed", "absmax", ["nested_absmax", "offset"], "dequant": {dtype name: tensor}}
         (kind "blockwise8": {"codes", "absmax"}); ``dequant`` is bitsandbytes' dequantization of its own
         quantization, in each dtype of ``dequant_dtypes``
    ours_gpu: the same without "dequant" (our GPU dequantization is compared and printed, not stored)

The input builders (ties, zero blocks, sweeps) are plain CPU PyTorch and deterministic; the CPU tests import
them to check that the tie inputs really are ties.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from lora_ops import nf4 as N

GOLDEN_NAME = "nf4_cuda_golden.pt"
FORMAT_VERSION = 1
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# absmax values of the tie blocks: exact powers of two (the reciprocal is exact) and 1.7 (it is not).
TIE_ABSMAX = (1.0, 2.0, 0.5, 1.7)
TIE_ULPS = (-2, -1, 0, 1, 2)


# ------------------------------------------------------------------------------------------ fp32 helpers

def f32(x: float) -> float:
    """x rounded to the nearest fp32."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def f32_step(x: float, k: int) -> float:
    """The fp32 value k ulps from fp32 x (towards +inf for k > 0)."""
    t = torch.tensor(x, dtype=torch.float32)
    toward = torch.tensor(float("inf") if k > 0 else -float("inf"), dtype=torch.float32)
    for _ in range(abs(k)):
        t = torch.nextafter(t, toward)
    return float(t)


def scaled_fp32(w: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """What the quantizer rounds: fp32(w) * fp32(1 / absmax) (one reciprocal, one product, both fp32)."""
    return w.to(torch.float32) * torch.reciprocal(absmax.to(torch.float32))


def fp32_tie_input(target: float, absmax: float) -> Optional[float]:
    """An fp32 w with fp32(w * fp32(1/fp32(absmax))) == target exactly, searched around target*absmax;
    None when no fp32 value lands there (possible when 1/absmax is inexact)."""
    a = torch.tensor(f32(absmax), dtype=torch.float32)
    w0 = f32(target * float(a))
    cands = torch.tensor([f32_step(w0, k) for k in range(-4, 5)], dtype=torch.float32)
    hit = scaled_fp32(cands, a) == torch.tensor(target, dtype=torch.float32)
    return float(cands[hit][0]) if bool(hit.any()) else None


# ---------------------------------------------------------------------------------------- input builders

def blocks_to_weight(blocks: Sequence[Sequence[float]], blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of (nblocks, blocksize), block b = blocks[b] then zeros; each block lists its absmax element
    first. Every value must already be exactly representable in ``dtype``."""
    w = torch.zeros(len(blocks), blocksize, dtype=torch.float64)
    for b, vals in enumerate(blocks):
        if len(vals) > blocksize:
            raise ValueError(f"block {b} has {len(vals)} values > blocksize {blocksize}")
        w[b, :len(vals)] = torch.tensor(vals, dtype=torch.float64)
    out = w.to(dtype)
    if not torch.equal(out.to(torch.float64), w):
        raise ValueError(f"a tie value is not representable in {dtype}")
    return out


def fp32_tie_blocks() -> List[Tuple[List[float], List[Tuple[int, int, float]]]]:
    """For each absmax a in TIE_ABSMAX and each of the 15 midpoints m_i: one block
    [±a, w(-2), ..., w(+2)] where fp32(w(k) * fp32(1/a)) is m_i moved k fp32 ulps (skipped if no such w).
    Returns (block values, [(midpoint i, k, target)]) per block; the sign of a alternates by block."""
    out = []
    for a in TIE_ABSMAX:
        for i, m in enumerate(N.NF4_MIDPOINTS):
            vals, meta = [f32(a) if i % 2 == 0 else -f32(a)], []
            for k in TIE_ULPS:
                target = f32_step(m, k)
                w = fp32_tie_input(target, a)
                if w is not None:
                    vals.append(w)
                    meta.append((i, k, target))
            out.append((vals, meta))
    return out


def lowp_step(x: torch.Tensor, k: int) -> torch.Tensor:
    """Values of a bf16/fp16 tensor moved k ulps of that dtype (towards +inf for k > 0); no zero crossing."""
    bits = x.view(torch.int16).to(torch.int32)
    sign = torch.where(x < 0, -1, 1).to(torch.int32)
    return (bits + sign * k).to(torch.int16).view(x.dtype)


def lowp_tie_blocks(dtype: torch.dtype, max_exact_per_midpoint: int = 2) -> List[List[float]]:
    """bf16/fp16 tie blocks. A ``dtype`` value rarely lands exactly on an fp32 midpoint (the search below is
    exhaustive over absmax mantissas: bf16 has no exact tie at any midpoint, fp16 only at midpoint 1), so
    two kinds:

    * near ties: for a in TIE_ABSMAX (rounded to dtype), the dtype values k = -2..2 dtype-ulps around
      dtype(m_i * a);
    * exact ties found by search: absmax a over all dtype values in [0.5, 2] and w within 2 dtype-ulps of
      m_i * a with fp32(fp32(w) * fp32(1/a)) == m_i exactly; up to ``max_exact_per_midpoint`` per midpoint,
      each with its dtype-ulp neighbours.
    """
    lo, hi = torch.tensor([0.5, 2.0], dtype=dtype).view(torch.int16).tolist()
    all_a = torch.arange(lo, hi + 1, dtype=torch.int32).to(torch.int16).view(dtype)
    blocks = []
    for i, m in enumerate(N.NF4_MIDPOINTS):
        sgn = 1.0 if i % 2 == 0 else -1.0
        for a in TIE_ABSMAX:
            ad = torch.tensor(a, dtype=dtype)
            c = (torch.tensor(m, dtype=torch.float64) * ad.double()).to(dtype)
            blocks.append([sgn * float(ad)] + [float(lowp_step(c.reshape(1), k)) for k in TIE_ULPS])
        # exact-tie search, vectorized over every absmax candidate and 5 neighbours of m * a
        centre = (torch.tensor(m, dtype=torch.float64) * all_a.double()).to(dtype)
        found = 0
        for k in TIE_ULPS:
            w = lowp_step(centre, k)
            hit = scaled_fp32(w, all_a) == torch.tensor(m, dtype=torch.float32)
            for j in torch.nonzero(hit).flatten().tolist():
                if found >= max_exact_per_midpoint:
                    break
                wj = w[j:j + 1]
                blocks.append([-sgn * float(all_a[j])] + [float(lowp_step(wj, s)) for s in TIE_ULPS])
                found += 1
    return blocks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_weight(shape, dtype, seed: int, blocksize: int = 64) -> torch.Tensor:
    """Gaussian weights at a realistic scale with a per-block scale spread and a few outliers (so absmax
    varies a lot between blocks, as in trained weights)."""
    g = _gen(seed)
    n = shape[0] * shape[1]
    w = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    nb = -(-n // blocksize)
    scale = torch.exp(torch.randn(nb, generator=g, dtype=torch.float64) * 0.7)
    w = w * scale.repeat_interleave(blocksize)[:n]
    idx = torch.randint(0, n, (max(1, n // 500),), generator=g)
    w[idx] *= 8.0
    return w.reshape(shape).to(dtype)


def zero_block_weight(dtype, seed: int) -> Tuple[torch.Tensor, int]:
    """(3, 43) = 129 elements (odd), blocksize 32: blocks 1 and 3 all zero (block 3 as -0.0), block 4 is the
    partial last block of one element, zero -> its byte holds that element and the pad nibble."""
    bs = 32
    w = random_weight((1, 129), torch.float64, seed, bs).reshape(-1)
    w[32:64] = 0.0
    w[96:128] = -0.0
    w[128:] = 0.0
    return w.reshape(3, 43).to(dtype), bs


def zero_tail_weight(dtype, seed: int) -> Tuple[torch.Tensor, int]:
    """(5, 27) = 135 elements (odd), blocksize 64: the partial last block (7 elements) is all zero."""
    bs = 64
    w = random_weight((1, 135), torch.float64, seed, bs).reshape(-1)
    w[128:] = 0.0
    return w.reshape(5, 27).to(dtype), bs


def sweep_shape(blocksize: int, dtype: torch.dtype) -> Tuple[int, int]:
    """About 2.5 blocks, 129 columns (blocks straddle rows), odd element count for fp32, even for 16-bit."""
    rows = max(1, round(2.5 * blocksize / 129))
    want_odd = dtype == torch.float32
    if (rows % 2 == 1) != want_odd:
        rows += 1
    return rows, 129


def build_cases() -> List[Dict]:
    """Every golden case's input (CPU tensors), deterministic."""
    cases: List[Dict] = []

    def add(name, family, w, bs, dq=False, dequant=None, kind="nf4"):
        if dequant is None:
            dequant = ALL_DTYPES if w.dtype == torch.float32 else (w.dtype,)
        cases.append({"name": name, "family": family, "kind": kind, "input": w.contiguous(), "blocksize": bs,
                      "double_quant": dq, "dequant_dtypes": [DTYPE_NAMES[d] for d in dequant]})

    # exact ties at the 15 midpoints, k = -2..2 fp32 ulps, absmax 1, 2, 0.5, 1.7
    fp32_blocks = [vals for vals, _ in fp32_tie_blocks()]
    for bs in (32, 64):
        add(f"ties_fp32_bs{bs}", "ties", blocks_to_weight(fp32_blocks, bs, torch.float32), bs)
    # the largest block: all ties with absmax 1.7 (inexact reciprocal) in one 4096 block
    per_a = len(N.NF4_MIDPOINTS)
    flat17 = [v for vals in fp32_blocks[3 * per_a:4 * per_a] for v in vals[1:]]
    add("ties_fp32_bs4096_a1.7", "ties", blocks_to_weight([[f32(1.7)] + flat17], 4096, torch.float32), 4096,
        dequant=(torch.float32,))
    for dt in (torch.bfloat16, torch.float16):
        add(f"ties_{DTYPE_NAMES[dt]}_bs64", "ties", blocks_to_weight(lowp_tie_blocks(dt), 64, dt), 64,
            dequant=(dt, torch.float32))
    # ties under double quantization (same 4-bit bytes; exercises the nested path with non-random absmax)
    add("ties_fp32_bs64_dq", "ties", blocks_to_weight(fp32_blocks, 64, torch.float32), 64, dq=True,
        dequant=(torch.float32,))

    # all-zero blocks, -0.0 blocks, a partial all-zero last block with an odd count (the pad nibble)
    for j, dt in enumerate(ALL_DTYPES):
        w, bs = zero_block_weight(dt, 100 + j)
        add(f"zeros_blocks_{DTYPE_NAMES[dt]}", "zeros", w, bs)
        w, bs = zero_tail_weight(dt, 110 + j)
        add(f"zeros_tail_{DTYPE_NAMES[dt]}", "zeros", w, bs)
    add("zeros_all_fp32_dq", "zeros", torch.zeros(4, 33), 32, dq=True)
    w, bs = zero_block_weight(torch.float32, 120)
    add("zeros_blocks_fp32_dq", "zeros", w, bs, dq=True)

    # partial blocks and odd counts
    for j, (shape, bs) in enumerate([((1, 1), 64), ((3, 5), 64), ((7, 3), 32), ((37, 129), 64),
                                     ((3, 2049), 4096), ((5, 4097), 4096)]):
        dt = ALL_DTYPES[j % 3]
        add(f"shape_{shape[0]}x{shape[1]}_bs{bs}_{DTYPE_NAMES[dt]}", "shapes",
            random_weight(shape, dt, 200 + j, bs), bs)

    # every block size x every dtype (blocks straddle rows, partial last block)
    for bs in N.VALID_BLOCKSIZES:
        for j, dt in enumerate(ALL_DTYPES):
            shape = sweep_shape(bs, dt)
            add(f"sweep_bs{bs}_{DTYPE_NAMES[dt]}", "sweep", random_weight(shape, dt, 300 + bs + j, bs), bs)

    # double quantization: several nested blocks (> 256 absmax entries), exactly 257 entries (a one-entry
    # partial nested block), wide absmax spread, and single-block weights (nested absmax = 0)
    add("dq_bs32_bf16_601blocks", "dq", random_weight((149, 129), torch.bfloat16, 400, 32), 32, dq=True)
    add("dq_bs32_fp32_280blocks", "dq", random_weight((71, 126), torch.float32, 401, 32), 32, dq=True,
        dequant=(torch.float32,))
    add("dq_bs64_fp16_257blocks", "dq", random_weight((1, 64 * 256 + 1), torch.float16, 402, 64), 64, dq=True)
    g = _gen(403)
    wide = random_weight((1, 32 * 520), torch.float64, 403, 32).reshape(520, 32)
    wide = wide * torch.pow(10.0, torch.rand(520, 1, generator=g, dtype=torch.float64) * 4 - 3)
    add("dq_bs32_bf16_wide_absmax", "dq", wide.reshape(40, 416).to(torch.bfloat16), 32, dq=True)
    add("dq_single_block_fp32", "dq", random_weight((3, 5), torch.float32, 404), 64, dq=True)
    add("dq_single_element_bf16", "dq", random_weight((1, 1), torch.bfloat16, 405), 64, dq=True)

    # the 8-bit blockwise quantizer of double quantization on its own: 2^14 values spread over [-1, 1] at
    # every magnitude the dynamic map resolves, plus every map entry and every fp32 midpoint between entries
    g = _gen(500)
    mag = torch.pow(10.0, -torch.rand(12288, generator=g, dtype=torch.float64) * 7)
    sgn = torch.where(torch.rand(12288, generator=g) < 0.5, -1.0, 1.0).double()
    dm = N.dynamic_map()
    mids = (dm[:-1] + dm[1:]) * 0.5
    vals = torch.cat([(mag * sgn).float(), dm, mids])
    vals = torch.cat([vals, torch.randn(16384 - vals.numel(), generator=g)]).reshape(-1)
    # every block of 256 gets absmax exactly 1, so map entries and midpoints stay exact after scaling (the
    # reciprocal of other absmax values is exercised by the dq cases)
    vals = vals.clamp(-1, 1)
    vals[::256] = 1.0
    add("blockwise8_dynamic_map", "blockwise8", vals, 256, dequant=(), kind="blockwise8")
    return cases


# --------------------------------------------------------------------------------------- computations

def _cpu(t):
    return None if t is None else t.detach().to("cpu").clone().contiguous()


def run_bnb(case: Dict, device) -> Dict:
    """bitsandbytes' outputs for ``case`` computed on ``device`` (bitsandbytes picks its backend by device)."""
    import bitsandbytes.functional as F
    from bitsandbytes.functional import QuantState

    w = case["input"].to(device)
    bs = case["blocksize"]
    if case["kind"] == "blockwise8":
        codes, qs = F.quantize_blockwise(w, code=N.dynamic_map(device), blocksize=bs)
        return {"codes": _cpu(codes), "absmax": _cpu(qs.absmax)}
    packed, qs = F.quantize_4bit(w, blocksize=bs, compress_statistics=case["double_quant"], quant_type="nf4")
    out = {"packed": _cpu(packed), "absmax": _cpu(qs.absmax), "dequant": {}}
    if qs.nested:
        out["nested_absmax"] = _cpu(qs.state2.absmax)
        out["offset"] = _cpu(qs.offset.reshape(()))
    for name in case["dequant_dtypes"]:
        q2 = QuantState(absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                        quant_type="nf4", dtype=NAME_DTYPES[name], offset=qs.offset, state2=qs.state2)
        out["dequant"][name] = _cpu(F.dequantize_4bit(packed, q2, quant_type="nf4"))
    return out


def run_ours_reference(case: Dict, device) -> Dict:
    """Our reference functions (plain PyTorch) on ``device``: same output layout as ``run_bnb``."""
    w = case["input"].to(device)
    bs = case["blocksize"]
    dm = N.dynamic_map(device)
    if case["kind"] == "blockwise8":
        codes, absmax = N.reference_quantize_blockwise_8bit(w, dm, bs)
        return {"codes": _cpu(codes), "absmax": _cpu(absmax)}
    packed, absmax = N.reference_quantize_nf4(w, bs)
    out = {"packed": _cpu(packed), "absmax": _cpu(absmax), "dequant": {}}
    state = (absmax, None, None, None)
    if case["double_quant"]:
        offset = absmax.mean()
        codes, nested = N.reference_quantize_blockwise_8bit(absmax - offset, dm, N.NESTED_BLOCKSIZE)
        out.update(absmax=_cpu(codes), nested_absmax=_cpu(nested), offset=_cpu(offset))
        state = (codes, nested, dm, offset)
    rows, cols = w.shape
    for name in case["dequant_dtypes"]:
        out["dequant"][name] = _cpu(N.reference_dequantize_nf4(packed, *state, bs, rows, cols, NAME_DTYPES[name]))
    return out


def run_ours_fast(case: Dict, device) -> Dict:
    """The package's public path on ``device`` (lora_ops:: ops: fast CUDA/Triton kernels where they load)."""
    w = case["input"].to(device)
    bs = case["blocksize"]
    if case["kind"] == "blockwise8":
        codes, absmax = torch.ops.lora_ops.quantize_blockwise_8bit(w, N.dynamic_map(device), bs)
        return {"codes": _cpu(codes), "absmax": _cpu(absmax)}
    w4 = N.quantize_nf4(w, bs, double_quant=case["double_quant"])
    out = {"packed": _cpu(w4.data), "absmax": _cpu(w4.absmax), "dequant": {}}
    if w4.nested:
        out.update(nested_absmax=_cpu(w4.nested_absmax), offset=_cpu(w4.offset))
    for name in case["dequant_dtypes"]:
        out["dequant"][name] = _cpu(w4.dequantize(NAME_DTYPES[name]))
    return out


# ----------------------------------------------------------------------------------------- comparison
# One comparison for the script's summary and for the tests (tests/test_nf4*.py import it), so that the
# mutation controls in tests/test_nf4.py exercise exactly the check the golden data goes through.

def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits: floats as same-width ints, so -0.0 != 0.0 and NaN payloads count."""
    t = t.detach().cpu().contiguous()
    if t.is_floating_point():
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def flatten_fields(d: Mapping) -> Dict[str, torch.Tensor]:
    """{"packed": t, "dequant": {"float32": t}} -> {"packed": t, "dequant.float32": t}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update({f"{k}.{k2}": v2 for k2, v2 in v.items()})
        else:
            out[k] = v
    return out


def field_differences(got: Mapping, want: Mapping) -> List[Tuple[str, str, Optional[torch.Tensor]]]:
    """(field, problem, flat indices that differ or None) for every field of ``want`` that ``got`` lacks or
    that differs in dtype, shape or any bit. Empty when ``got`` matches ``want`` bit for bit."""
    got, want = flatten_fields(got), flatten_fields(want)
    problems = []
    for key, b in want.items():
        a = got.get(key)
        if a is None:
            problems.append((key, "missing", None))
            continue
        if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
            problems.append((key, f"dtype/shape {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}", None))
            continue
        diff = (_bits(a) != _bits(b)).reshape(-1)
        if bool(diff.any()):
            idx = torch.nonzero(diff).flatten()
            fa, fb = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
            i = int(idx[0])
            if a.dtype == torch.uint8:
                first = f"0x{int(fa[i]):02x} != 0x{int(fb[i]):02x}"
            else:
                first = f"{fa[i].item()!r} != {fb[i].item()!r}"
            problems.append((key, f"differs at {idx.numel()}/{diff.numel()} entries, first [{i}]: {first}", idx))
    return problems


def assert_nf4_equal(got: Mapping, want: Mapping, what: str = "NF4") -> None:
    """Bit-for-bit equality of every field of ``want`` (packed bytes, absmax or nested codes, nested_absmax,
    offset, dequantized values, quant-state bytes ...): same dtype, same shape, same bits."""
    problems = field_differences(got, want)
    if problems:
        raise AssertionError(f"{what}: " + "; ".join(f"{k} {p}" for k, p, _ in problems))


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes -> 4-bit codes (int64), element 2j from the high nibble; includes the pad nibble."""
    p = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack((p >> 4, p & 15), 1).reshape(-1)


def describe_differences(case: Dict, got: Dict, want: Dict, label: str, limit: int = 40) -> List[str]:
    """``field_differences`` as printable lines; for the packed bytes one line per differing 4-bit code:
    the element, its input value, its fp32 scaled value (and bits) and both codes."""
    lines = []
    w = case["input"]
    n = w.numel()
    for key, problem, idx in field_differences(got, want):
        lines.append(f"{label} {case['name']}: {key} {problem}")
        if key == "packed" and idx is not None:
            ca, cb = unpack_codes(got["packed"]), unpack_codes(want["packed"])
            codes = torch.nonzero(ca != cb).flatten().tolist()
            bs = case["blocksize"]
            flat_w = w.reshape(-1).float()
            absmax = N.reference_quantize_nf4(w.reshape(1, -1), bs)[1]
            for e in codes[:limit]:
                if e < n:
                    s = float(scaled_fp32(flat_w[e], absmax[e // bs]))
                    lines.append(f"    element {e} (block {e // bs}) w={float(flat_w[e])!r} scaled={s!r} "
                                 f"(0x{struct.pack('>f', s).hex()}) {label}={int(ca[e])} want={int(cb[e])}")
                else:
                    last_zero = bool(flat_w[(n - 1) // bs * bs:].abs().max() == 0)
                    lines.append(f"    pad nibble (last block all zero: {last_zero}) {label}={int(ca[e])} "
                                 f"want={int(cb[e])}")
            if len(codes) > limit:
                lines.append(f"    ... {len(codes) - limit} more codes")
        elif idx is not None:
            fa, fb = flatten_fields(got)[key].reshape(-1), flatten_fields(want)[key].reshape(-1)
            for e in idx[:8].tolist():
                lines.append(f"    [{e}] {label}={fa[e].item()!r} want={fb[e].item()!r}")
            if idx.numel() > 8:
                lines.append(f"    ... {idx.numel() - 8} more")
    return lines


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "golden"), help="output directory")
    ap.add_argument("--fast", action="store_true", help="also compare the package's fast CUDA kernels")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a dry run against bitsandbytes-CPU (its file is marked backend=cpu and the "
                         "golden tests refuse it)")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("make_golden.py needs a CUDA GPU (bitsandbytes' CUDA path is the oracle)", file=sys.stderr)
        return 2
    import bitsandbytes
    dev = torch.device(args.device)
    cases = build_cases()
    # make sure bitsandbytes really runs on the device asked for, not a fallback
    probe, _ = bitsandbytes.functional.quantize_4bit(torch.ones(64, device=dev), blocksize=64, quant_type="nf4")
    if probe.device.type != dev.type:
        print(f"bitsandbytes did not run on {dev}", file=sys.stderr)
        return 2
    lines: List[str] = []
    n_bad = 0
    fast_bad = 0
    for case in cases:
        case["bnb"] = run_bnb(case, dev)
        ours = run_ours_reference(case, dev)
        d = describe_differences(case, ours, case["bnb"], f"ours_{dev.type}")
        n_bad += bool(d)
        lines += d
        # the file keeps our GPU dequantization out (size); its disagreements are printed above
        case["ours_gpu"] = {k: v for k, v in ours.items() if k != "dequant"}
        if args.fast:
            fd = describe_differences(case, run_ours_fast(case, dev), case["bnb"], "fast")
            fast_bad += bool(fd)
            lines += fd
    on_gpu = dev.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
    meta = {"format": FORMAT_VERSION, "bitsandbytes": str(bitsandbytes.__version__), "torch": str(torch.__version__),
            "cuda": str(torch.version.cuda), "device": torch.cuda.get_device_name() if on_gpu else "cpu",
            "backend": dev.type, "script": "scripts/make_golden.py"}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, GOLDEN_NAME)
    torch.save({"meta": meta, "cases": cases}, path)
    size = os.path.getsize(path)
    print(f"meta: {meta}")
    print(f"---- disagreements, bitsandbytes-{dev.type.upper()} vs ours ({len(lines)} lines) ----")
    for line in lines:
        print(line)
    print("---- end ----")
    fast = f"; fast kernels differ in {fast_bad} cases" if args.fast else ""
    print(f"nf4 golden: {len(cases)} cases; ours ({dev.type} reference) differs from bitsandbytes-"
          f"{dev.type.upper()} in {n_bad} cases{fast}; wrote {path} ({size / 1e6:.2f} MB) in "
          f"{time.time() - t0:.1f} s")
    if size > 2_000_000:
        print(f"WARNING: {path} is {size / 1e6:.2f} MB > 2 MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
