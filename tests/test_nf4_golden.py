"""Our CPU NF4 reference against bitsandbytes' CUDA output, recorded on the GPU (tests/golden/nf4_cuda_golden.pt).

bitsandbytes-on-CPU cannot vouch for the CUDA behaviour that matters most (midpoint ties, all-zero blocks,
the 8-bit nested codes), so scripts/make_golden.py runs bitsandbytes' CUDA build on the GPU machine and stores
inputs and outputs; these tests replay every case on CPU, byte for byte (``assert_nf4_equal``, the comparison
whose mutation controls live in tests/test_nf4.py):

* ``test_golden_case``: packed bytes and absmax from ``quantize_nf4``; with double quantization the nested
  codes and nested absmax from the reference 8-bit quantizer given bitsandbytes' offset; bitsandbytes' own
  state dequantized by our reference equals its CUDA dequantization in every recorded dtype.
* ``test_golden_double_quant_end_to_end``: the same with our own CPU offset (``absmax.mean()`` on CPU),
  kept apart because a CPU and a CUDA mean may round differently.
* ``test_golden_gpu_reference``: our reference run on the GPU (stored by the script) equals bitsandbytes-CUDA
  and our CPU run.

Until the data is committed, ``test_golden_data_present`` FAILS (it does not skip) and says what to run.
``LORA_OPS_NF4_GOLDEN=/path/to/file.pt`` checks another file (e.g. a fresh one from the GPU run's $OUT).
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from lora_ops import nf4 as N
from lora_ops.nf4 import NF4Weight, quantize_nf4

_spec = importlib.util.spec_from_file_location(
    "make_golden", os.path.join(os.path.dirname(__file__), "..", "scripts", "make_golden.py"))
G = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(G)

GOLDEN = Path(os.environ.get("LORA_OPS_NF4_GOLDEN", Path(__file__).parent / "golden" / G.GOLDEN_NAME))
MISSING = (f"{GOLDEN} is missing: run `python scripts/make_golden.py` on the GPU machine (CUDA + bitsandbytes' "
           f"CUDA build; `scripts/gpu_check.sh --golden` does it and leaves the file in $OUT), then commit it "
           f"as tests/golden/{G.GOLDEN_NAME}")
DATA = torch.load(GOLDEN, weights_only=True) if GOLDEN.exists() else None
CASES = DATA["cases"] if DATA is not None else []
NF4_CASES = [c for c in CASES if c["kind"] == "nf4"]
DQ_CASES = [c for c in NF4_CASES if c["double_quant"]]


def _ids(cases):
    return [c["name"] for c in cases]


def _data():
    if DATA is None:
        pytest.fail(MISSING)
    return DATA


def test_golden_data_present():
    meta = _data()["meta"]
    assert meta["format"] == G.FORMAT_VERSION, f"golden format {meta['format']} != {G.FORMAT_VERSION}: regenerate"
    assert meta["backend"] == "cuda", f"golden data must come from bitsandbytes' CUDA build, got {meta}"


def test_golden_covers_every_case():
    """The file holds exactly the cases make_golden.py builds today, with the same inputs (a stale file, or
    a builder changed without regenerating, fails here)."""
    data = _data()
    built = {c["name"]: c for c in G.build_cases()}
    stored = {c["name"]: c for c in data["cases"]}
    assert sorted(stored) == sorted(built), (f"missing {sorted(set(built) - set(stored))}, "
                                             f"extra {sorted(set(stored) - set(built))}: rerun make_golden.py")
    for name, c in built.items():
        s = stored[name]
        G.assert_nf4_equal({"input": s["input"]}, {"input": c["input"]}, f"{name} input")
        assert (s["blocksize"], s["double_quant"], s["dequant_dtypes"]) == \
            (c["blocksize"], c["double_quant"], c["dequant_dtypes"]), name
    families = {c["family"] for c in data["cases"]}
    assert families == {"ties", "zeros", "shapes", "sweep", "dq", "blockwise8"}, families


def _bnb_state_weight(case) -> NF4Weight:
    """bitsandbytes' recorded state as an NF4Weight (its bytes, absmax or nested codes, offset)."""
    b = case["bnb"]
    w = case["input"]
    if case["double_quant"]:
        return NF4Weight(b["packed"], b["absmax"], w.shape, w.dtype, case["blocksize"], b["nested_absmax"],
                         N.dynamic_map(), b["offset"])
    return NF4Weight(b["packed"], b["absmax"], w.shape, w.dtype, case["blocksize"])


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_golden_case(case):
    bnb = case["bnb"]
    bs = case["blocksize"]
    if case["kind"] == "blockwise8":
        codes, absmax = N.reference_quantize_blockwise_8bit(case["input"], N.dynamic_map(), bs)
        G.assert_nf4_equal({"codes": codes, "absmax": absmax}, bnb, case["name"])
        return
    w = case["input"]
    single = quantize_nf4(w, bs, double_quant=False)
    got = {"packed": single.data}
    if case["double_quant"]:
        codes, nested = N.reference_quantize_blockwise_8bit(single.absmax - bnb["offset"], N.dynamic_map(),
                                                            N.NESTED_BLOCKSIZE)
        got.update(absmax=codes, nested_absmax=nested)
    else:
        got["absmax"] = single.absmax
    want = {k: bnb[k] for k in ("packed", "absmax", "nested_absmax") if k in bnb}
    G.assert_nf4_equal(got, want, f"{case['name']} quantize")
    w4 = _bnb_state_weight(case)
    deq = {name: w4.dequantize(G.NAME_DTYPES[name]) for name in bnb["dequant"]}
    G.assert_nf4_equal({"dequant": deq}, {"dequant": bnb["dequant"]}, f"{case['name']} dequantize")


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    ia = a.detach().cpu().float().reshape(1).view(torch.int32).long()
    ib = b.detach().cpu().float().reshape(1).view(torch.int32).long()
    return int((ia - ib).abs().item())


@pytest.mark.parametrize("case", DQ_CASES, ids=_ids(DQ_CASES))
def test_golden_double_quant_end_to_end(case):
    """quantize_nf4(double_quant=True) on CPU gives bitsandbytes-CUDA's bytes. The offset is torch's fp32
    mean of absmax on the weight's device, as bitsandbytes computes it, so a CPU mean may sit an ulp or two
    from the CUDA mean (different reduction order); everything downstream of the offset must then be exactly
    what CUDA computes from CUDA's offset."""
    ours = quantize_nf4(case["input"], case["blocksize"], double_quant=True)
    bnb = case["bnb"]
    G.assert_nf4_equal({"packed": ours.data}, {"packed": bnb["packed"]}, f"{case['name']} packed")
    assert _ulps_apart(ours.offset, bnb["offset"]) <= 4, (
        f"{case['name']}: CPU offset {ours.offset.item()!r} vs CUDA {bnb['offset'].item()!r}: more than rounding")
    from lora_ops import nf4 as N
    fp32_absmax = N.reference_quantize_nf4(case["input"], case["blocksize"])[1]
    codes, nested = N.reference_quantize_blockwise_8bit(fp32_absmax - bnb["offset"], N.dynamic_map(),
                                                        N.NESTED_BLOCKSIZE)
    G.assert_nf4_equal({"absmax": codes, "nested_absmax": nested},
                       {k: bnb[k] for k in ("absmax", "nested_absmax")},
                       f"{case['name']} nested codes from CUDA's offset")
    if torch.equal(ours.offset, bnb["offset"].reshape(ours.offset.shape)):
        G.assert_nf4_equal({"absmax": ours.absmax, "nested_absmax": ours.nested_absmax},
                           {k: bnb[k] for k in ("absmax", "nested_absmax")}, f"{case['name']} end to end")


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_golden_gpu_reference(case):
    """Our reference on the GPU (recorded) equals bitsandbytes-CUDA, and equals our reference on CPU up to the
    device's mean (see test_golden_double_quant_end_to_end)."""
    gpu = case["ours_gpu"]
    G.assert_nf4_equal(gpu, {k: v for k, v in case["bnb"].items() if k != "dequant"}, f"{case['name']} GPU vs bnb")
    cpu = G.run_ours_reference(case, "cpu")
    cpu.pop("dequant", None)
    if case.get("double_quant") and not torch.equal(cpu["offset"], gpu["offset"]):
        assert _ulps_apart(cpu["offset"], gpu["offset"]) <= 4
        cpu = {"packed": cpu["packed"]}
    G.assert_nf4_equal(cpu, {k: gpu[k] for k in cpu}, f"{case['name']} CPU vs GPU reference")


def test_make_golden_dry_run_on_cpu(tmp_path, capsys):
    """The script end to end against bitsandbytes-CPU (what CI can run): it writes a loadable file under the
    2 MB budget, marks it backend=cpu (which test_golden_data_present refuses), and its summary reports the
    known bitsandbytes-CPU differences (midpoint ties that CUDA sends up, 0x77 in all-zero blocks)."""
    pytest.importorskip("bitsandbytes")
    with torch._dynamo.config.patch(disable=True):  # bnb's torch.compile wrappers: eager, no per-shape compile
        assert G.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    path = tmp_path / G.GOLDEN_NAME
    assert path.stat().st_size < 2_000_000, f"{path.stat().st_size} bytes > 2 MB budget"
    data = torch.load(path, weights_only=True)
    assert data["meta"]["backend"] == "cpu" and len(data["cases"]) == len(G.build_cases())
    assert "ours_cpu ties_fp32_bs64: packed differs at 16/1920 entries" in out, out[-3000:]
    assert "ours_cpu zeros_tail_float32: packed differs" in out and "pad nibble (last block all zero: True)" in out
    assert "sweep_" not in out, "random weights must not differ from bitsandbytes-CPU"
    assert out.strip().splitlines()[-1].startswith(f"nf4 golden: {len(data['cases'])} cases")
