"""The benchmark harness (benchmarks/): CPU quick mode end to end, ratio arithmetic, CSV merging, skipped
providers, presets, cost models, and that every provider of a case computes the same layer."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from helpers import assert_rel_close  # noqa: E402

from benchmarks import harness, presets, providers, report  # noqa: E402
from benchmarks.presets import Case, layer_case, decode_case, dequant_case  # noqa: E402

FAST = dict(cpu=True, cpu_min_reps=2, cpu_max_reps=3, cpu_target_s=0.001, profile=False)


def _png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ end to end

def test_cpu_quick_layer_end_to_end(tmp_path):
    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--cpu", "--preset", "layer", "--out", str(out),
                           "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Summary" in proc.stdout and "done in" in proc.stdout.splitlines()[-1]
    d = out / "cpu"
    with (d / "results.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == report.COLUMNS
        raw = list(reader)
    rows = report.read_csv(d / "results.csv")
    assert len(rows) == len(raw) > 0
    # Every planned (case, provider, mode) produced a timing, none was skipped.
    planned = {(c.name, p, m) for c in presets.PRESETS["layer"].cases(cpu=True) for p, ms in c.plan for m in ms}
    timed = {(r["case"], r["provider"], r["mode"]) for r in rows if r["metric"] == "time_ms" and r["status"] == "ok"}
    assert planned == timed
    assert not [r for r in rows if r["status"] == "skipped"]
    floors = {(r["case"], r["mode"]): r["value"] for r in rows if r["metric"] == "time_ms" and r["provider"] == "floor"}
    for r in rows:
        if r["metric"] == "time_ms":
            assert 0 < r["p20"] <= r["value"] <= r["p80"]
            assert r["ratio_to_floor"] == pytest.approx(r["value"] / floors[(r["case"], r["mode"])], rel=1e-12)
        if r["metric"] in ("peak_extra_mib", "workspace_mib", "kernel_launches"):
            assert r["status"] == "n/a" and math.isnan(r["value"])  # no device memory / kernels on the CPU
        if r["metric"] == "op_calls":
            assert r["value"] >= 1
    env = json.loads(rows[0]["env"])
    for key in ("gpu", "torch", "triton", "peft", "bitsandbytes", "lora_ops", "date_utc", "git_commit", "command"):
        assert env.get(key), key
    assert "--preset layer" in env["command"] and env["cuda_graphs"] is False and env["cpu_threads"] == 1
    cfg = json.loads(next(r["config"] for r in rows if r["provider"] == "fused" and r["metric"] == "time_ms"))
    assert cfg["provider_info"]["lora_fwd"] == "reference"  # CPU tensors: the reference, and the run says so
    assert _png(d / "layer_ratio.png")
    md = (d / "results.md").read_text()
    tail = md[md.index("## Summary"):]
    assert "| case | provider | ms p50 | × floor (eager ×) | peak extra MiB |" in tail
    assert "512x256->896 r16 nf4 drop0.05 | fused (reference path) |" in tail  # CPU rows say what ran


def test_run_records_launcher_settings_set_in_the_environment(monkeypatch):
    """A LORA_OPS_* setting set for a run (an A/B knob) is recorded with the run and named in the report's run
    line; the commit label and the checking modes are not settings."""
    from benchmarks import harness
    monkeypatch.setenv("LORA_OPS_SIDE_DA", "0")
    monkeypatch.setenv("LORA_OPS_GIT_COMMIT", "abc")
    monkeypatch.setenv("LORA_OPS_LAUNCH_STRICT", "1")
    monkeypatch.delenv("LORA_OPS_BACKEND", raising=False)
    got = harness.launcher_settings()
    assert got.get("LORA_OPS_SIDE_DA") == "0"
    assert "LORA_OPS_GIT_COMMIT" not in got and "LORA_OPS_LAUNCH_STRICT" not in got
    row = {"run_id": "r1", "preset": "layer", "case": "c", "provider": "floor", "mode": "fwd_bwd",
           "metric": "time_ms", "value": 1.0, "p20": 1.0, "p80": 1.0, "ratio_to_floor": 1.0, "status": "ok",
           "note": "", "config": "{}", "env": json.dumps({"settings": got, "git_commit": "abc"})}
    md = report.markdown([row])
    assert "launcher settings LORA_OPS_SIDE_DA=0" in md and "(not the defaults)" in md
    row["env"] = json.dumps({"settings": {}, "git_commit": "abc"})
    assert "launcher settings" not in report.markdown([row])


def test_run_cases_records_failing_provider_as_skipped():
    case = layer_case("t", 17, 24, 40, 3, "dense", 0.0, ("forward",), "float32")

    def build_fails(case, ws):
        raise RuntimeError("boom at build")

    def build_call_fails(case, ws):
        def forward(x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return providers.Built(forward=forward)

    rows, _ = harness.run_cases([case], harness.Settings(**FAST), progress=False,
                                builders={"peft": build_fails, "fused": build_call_fails})
    by = {(r["provider"], r["mode"], r["metric"]): r for r in rows if r["case"] == case.name}
    assert by[("peft", "full", "skipped")]["status"] == "skipped"
    assert "boom at build" in by[("peft", "full", "skipped")]["note"]
    for mode in ("full", "forward"):
        assert "OutOfMemoryError" in by[("fused", mode, "skipped")]["note"]
        assert ("fused", mode, "time_ms") not in by
    # The others ran, with ratios to this run's floor.
    assert by[("floor", "full", "time_ms")]["ratio_to_floor"] == 1.0
    assert by[("unfused", "full", "time_ms")]["status"] == "ok"
    assert by[("unfused", "full", "time_ms")]["ratio_to_floor"] > 0


def test_unsupported_mode_and_budget_are_skipped():
    case = decode_case("t", 3, 24, 40, 3, "dense", "float32", n_sets=3)
    no_decode = lambda case, ws: providers.Built(forward=lambda x: x)  # noqa: E731
    rows, _ = harness.run_cases([case], harness.Settings(**FAST), progress=False, builders={"peft": no_decode})
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert [(r["provider"], r["mode"]) for r in skipped] == [("peft", "decode")]
    assert "no decode mode" in skipped[0]["note"]
    cfg = json.loads(next(r["config"] for r in rows if r["provider"] == "fused" and r["metric"] == "time_ms"))
    assert cfg["n_sets"] == 3
    rows, _ = harness.run_cases([case], harness.Settings(**FAST), progress=False, budget_s=0.0)
    case_rows = [r for r in rows if r["case"] == case.name]
    assert case_rows and all(r["status"] == "skipped" and "budget" in r["note"] for r in case_rows)


def test_nf4_dequant_case_on_cpu():
    case = dequant_case("t", 40, 72, "float32")
    rows, _ = harness.run_cases([case], harness.Settings(**FAST), progress=False)
    t = {r["provider"]: r for r in rows if r["metric"] == "time_ms"}
    assert set(t) == {"copy", "bnb", "unfused", "fused"} and t["copy"]["ratio_to_floor"] == 1.0
    g = {r["provider"]: r for r in rows if r["metric"] == "gbps"}
    nbytes = providers.dequant_bytes(case)
    assert g["fused"]["value"] == pytest.approx(nbytes / (t["fused"]["value"] * 1e6), rel=1e-12)


# --------------------------------------------------------------------------------------- ratios, CSV

def _row(provider, metric, value, run_id="r1", case="c", mode="full", status="ok", preset="layer"):
    return {"run_id": run_id, "preset": preset, "case": case, "shape": "s", "provider": provider, "mode": mode,
            "metric": metric, "value": value, "p20": math.nan, "p80": math.nan, "unit": "ms",
            "ratio_to_floor": math.nan, "status": status, "note": "", "config": "{}", "env": "{}"}


def test_ratio_arithmetic():
    rows = [_row("floor", "time_ms", 2.0), _row("fused", "time_ms", 2.5), _row("peft", "time_ms", 3.1),
            _row("floor", "peak_extra_mib", 400.0), _row("fused", "peak_extra_mib", 401.0),
            _row("fused", "tflops", 99.0), _row("floor", "tflops", 120.0),
            _row("fused", "time_ms", 1.0, mode="forward"),  # no forward floor in this run
            _row("fused", "time_ms", 2.2, run_id="r2")]  # another run: never divided by r1's floor
    report.add_ratios(rows)
    r = [x["ratio_to_floor"] for x in rows]
    assert r[0] == 1.0 and r[1] == 1.25 and r[2] == pytest.approx(1.55, rel=1e-15)
    assert r[4] == pytest.approx(401.0 / 400.0, rel=1e-15)
    assert math.isnan(r[5]) and math.isnan(r[6])  # throughput is not a ratio metric
    assert math.isnan(r[7]) and math.isnan(r[8])
    # A skipped floor gives no ratio; a non-positive or NaN floor neither.
    rows = [_row("floor", "skipped", math.nan, status="skipped"), _row("fused", "time_ms", 2.5)]
    assert math.isnan(report.add_ratios(rows)[1]["ratio_to_floor"])
    assert math.isnan(report.ratio(1.0, 0.0)) and math.isnan(report.ratio(1.0, math.nan))
    # The nf4 preset's floor is the copy.
    rows = [_row("copy", "time_ms", 0.04, mode="dequant"), _row("fused", "time_ms", 0.05, mode="dequant")]
    assert report.add_ratios(rows, "copy")[1]["ratio_to_floor"] == pytest.approx(1.25, rel=1e-15)


def test_csv_merge_replaces_same_key_keeps_others(tmp_path):
    old = [_row("floor", "time_ms", 1.0), _row("floor", "eager_ms", 1.1), _row("fused", "time_ms", 5.0),
           _row("fused", "eager_ms", 5.5), _row("peft", "time_ms", 3.0),
           _row("fused", "time_ms", 0.05, preset="decode", case="d", mode="decode")]
    new = [_row("floor", "time_ms", 1.02, run_id="r2"), _row("fused", "time_ms", 1.5, run_id="r2"),
           _row("fused", "time_ms", 0.5, run_id="r2", mode="forward")]
    path = tmp_path / "results.csv"
    report.write_csv(path, old)
    merged = report.merge_rows(report.read_csv(path), new)
    report.write_csv(path, merged)
    back = report.read_csv(path)
    got = {(r["preset"], r["provider"], r["mode"], r["metric"]): (r["run_id"], r["value"]) for r in back}
    assert got == {
        ("layer", "peft", "full", "time_ms"): ("r1", 3.0),  # kept
        ("decode", "fused", "decode", "time_ms"): ("r1", 0.05),  # other preset: kept
        ("layer", "floor", "full", "time_ms"): ("r2", 1.02),  # replaced, and its stale eager row went with it
        ("layer", "fused", "full", "time_ms"): ("r2", 1.5),
        ("layer", "fused", "forward", "time_ms"): ("r2", 0.5),  # new key: added
    }
    assert len(back) == 5
    assert math.isnan(back[0]["p20"])  # NaN survives the round trip as an empty cell
    with (tmp_path / "foreign.csv").open("w") as f:
        f.write("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a benchmarks CSV"):
        report.read_csv(tmp_path / "foreign.csv")


def test_markdown_marks_rows_from_another_run():
    rows = [_row("floor", "time_ms", 1.0), _row("fused", "time_ms", 1.2, run_id="r0")]
    md = report.markdown(rows)
    assert "| fused † | full |" in md and "another run" in md
    assert md.rstrip().splitlines()[-1].startswith("|")  # the summary table closes the file


# ------------------------------------------------------------------------------ providers compute the same

@pytest.mark.parametrize("weight", ["dense", "nf4"])
def test_providers_compute_the_same_layer(weight):
    """Every LoRA provider of a case gives the same y, dx, dA, dB on the same tensors (odd shapes, r=3): the
    benchmark compares like with like. NF4 providers quantize the same W (bnb's bytes equal lora_ops')."""
    import lora_ops

    case = layer_case("t", 19, 72, 40, 3, weight, 0.0, (), "float32")
    data = providers.make_case_data(case, torch.device("cpu"), 1, seed=3)
    ws = data.sets[0]
    W = ws.W if weight == "dense" else lora_ops.quantize_nf4(ws.W).dequantize()
    x, A, B = (t.detach().double().requires_grad_(True) for t in (data.x, ws.A, ws.B))
    y_ref = x @ W.double().T + case.scaling * (x @ A.T) @ B.T
    y_ref.backward(data.dy.double())
    lora = [p for p, _ in case.plan if p not in harness.NO_LORA]
    assert set(lora) == ({"unfused", "peft", "fused"} if weight == "dense" else {"unfused", "peft_bnb", "fused"})

    def run(builder, scaling_case=case):
        b = builder(scaling_case, ws)
        with b.context():
            y = b.forward(data.x)
            y.backward(data.dy)
        dx, data.x.grad = data.x.grad, None
        return y, dx, b.params

    for p in lora:
        y, dx, params = run(providers.BUILDERS[p])
        assert_rel_close(y, y_ref, torch.float32, f"{p} y")
        assert_rel_close(dx, x.grad, torch.float32, f"{p} dx")
        assert_rel_close(params[0].grad, A.grad, torch.float32, f"{p} dA")
        assert_rel_close(params[1].grad, B.grad, torch.float32, f"{p} dB")
    # Mutation control: PEFT built with another lora_alpha (scaling 2 -> 4) fails the same check.
    import dataclasses

    class Alpha4(type(case)):
        @property
        def lora_alpha(self):
            return 4 * self.r

    wrong = Alpha4(**{f.name: getattr(case, f.name) for f in dataclasses.fields(case)})
    y, _, _ = run(providers.BUILDERS["peft" if weight == "dense" else "peft_bnb"], wrong)
    with pytest.raises(AssertionError):
        assert_rel_close(y, y_ref, torch.float32, "peft with the wrong scaling")
    # The floor has no adapter: it must differ from the LoRA layer (else the benchmark would time nothing).
    y, _, _ = run(providers.BUILDERS["floor"])
    with pytest.raises(AssertionError):
        assert_rel_close(y, y_ref, torch.float32, "floor vs LoRA")


def test_case_data_is_random_shared_and_seeded():
    case = layer_case("t", 5, 24, 40, 3, "dense", dtype="float32")
    a = providers.make_case_data(case, torch.device("cpu"), 2, seed=1)
    b = providers.make_case_data(case, torch.device("cpu"), 2, seed=1)
    c = providers.make_case_data(case, torch.device("cpu"), 2, seed=2)
    assert torch.equal(a.x, b.x) and torch.equal(a.sets[1].B, b.sets[1].B) and not torch.equal(a.x, c.x)
    assert not torch.equal(a.sets[0].W, a.sets[1].W)
    for t in (a.x, a.dy, a.sets[0].W, a.sets[0].A, a.sets[0].B):
        assert (t != 0).all()
    assert a.x.requires_grad and not a.x_nograd.requires_grad and torch.equal(a.x, a.x_nograd)


# ------------------------------------------------------------------------------------ presets, models

def test_gpu_presets_match_the_spec():
    layer = presets.PRESETS["layer"].cases(cpu=False)
    got = {(c.M, c.K, c.N, c.r, c.weight, c.dropout, c.dtype) for c in layer}
    want = {(M, K, N, 16, w, p, "bfloat16") for (M, K, N, p) in [(8192, 4096, 4096, 0.0), (8192, 4096, 14336, 0.0),
                                                                  (8192, 14336, 4096, 0.0), (2048, 4096, 4096, 0.0),
                                                                  (8192, 4096, 14336, 0.05)]
            for w in ("dense", "nf4")}
    assert got == want and len(layer) == len(want)
    for c in layer:
        assert c.plan[0][0] == "floor" and c.plan[-1][0] == "floor_repeat"
        assert c.modes_of("fused") == ("full", "forward", "backward") == c.modes_of("floor")
        assert ("peft" in c.providers()) == (c.weight == "dense")
        assert ("peft_bnb" in c.providers()) == (c.weight == "nf4")
    assert {c.r for c in presets.PRESETS["rank"].cases(False)} == {8, 16, 32, 64, 128}
    assert {c.M for c in presets.PRESETS["tokens"].cases(False)} == {256, 512, 1024, 2048, 4096, 8192, 16384}
    dec = presets.PRESETS["decode"].cases(False)
    assert {(c.M, c.K, c.N, c.weight) for c in dec} == {(m, 4096, 14336, w) for m in (1, 2, 4, 8, 16)
                                                         for w in ("dense", "nf4")}
    assert all(c.n_sets == 0 and c.primary_mode() == "decode" for c in dec)
    (nf4,) = presets.PRESETS["nf4"].cases(False)
    assert (nf4.N, nf4.K, nf4.floor, nf4.kind) == (14336, 4096, "copy", "dequant")
    # The CPU quick versions have the same structure (same providers and modes per case).
    for p in presets.PRESETS.values():
        gpu, cpu = p.cases(False), p.cases(True)
        assert {c.plan for c in gpu} == {c.plan for c in cpu}
        assert all(c.dtype == "float32" for c in cpu)


def test_case_validation_and_filtering():
    with pytest.raises(ValueError, match="decode needs M <= 16"):
        decode_case("t", 17, 8, 8, 1, "dense")
    with pytest.raises(ValueError, match="unknown provider"):
        Case("t", "x", "layer", 1, 2, 3, plan=(("nope", ("full",)),))
    c = presets.PRESETS["layer"].cases(False)[0]
    f = c.filtered(["fused"], ["forward"])
    assert f.plan == (("floor", ("forward",)), ("fused", ("forward",)))
    assert c.filtered(["peft_bnb"], None) is None  # a dense case has no peft_bnb: nothing but the floor would run
    with pytest.raises(ValueError, match="unknown preset"):
        presets.select_cases(["layers"], cpu=True)


def test_layer_cost_model():
    case = layer_case("t", 8, 16, 32, 4, "dense", dtype="bfloat16")
    M, K, N, r = 8, 16, 32, 4
    assert harness.layer_cost(case, "floor", "full")[0] == 4 * M * N * K
    assert harness.layer_cost(case, "full_ft", "full")[0] == 6 * M * N * K
    lora_f = 2 * M * K * r + 2 * M * r * N + 4 * M * N * r + 4 * M * r * K
    assert harness.layer_cost(case, "fused", "full")[0] == 4 * M * N * K + lora_f
    f_fwd, b_fwd = harness.layer_cost(case, "floor", "forward")
    assert (f_fwd, b_fwd) == (2 * M * N * K, 2 * (M * K + N * K + M * N))
    assert harness.layer_cost(case, "floor", "decode") == (f_fwd, b_fwd)
    nf4 = layer_case("t", 8, 16, 32, 4, "nf4", dtype="bfloat16")
    from lora_ops.nf4 import nf4_bytes

    dense_b = harness.layer_cost(case, "fused", "forward")[1]
    assert harness.layer_cost(nf4, "fused", "forward")[1] == dense_b - 2 * N * K + nf4_bytes(N, K)
    assert harness.layer_cost(nf4, "floor", "forward")[1] == b_fwd  # the floor is always the dense layer


def test_quantiles_slug_and_profile_counting():
    import numpy as np

    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 7.5]
    assert harness.quantiles(xs, (0.5, 0.2, 0.8)) == pytest.approx(list(np.quantile(xs, [0.5, 0.2, 0.8])))
    assert harness.slugify("NVIDIA H200") == "h200"
    assert harness.slugify("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"

    class E:
        def __init__(self, name, dev):
            self.name, self.device_type = name, f"DeviceType.{dev}"

    events = [E("aten::mm", "CPU"), E("aten::t", "CPU"), E("lora_ops::lora_fwd", "CPU"),
              E("autograd::engine::evaluate_function: MmBackward0", "CPU"), E("cudaLaunchKernel", "CPU"),
              E("sm90_xmma_gemm_bf16", "CUDA"), E("_lora_fwd_kernel", "CUDA"), E("Memset (Device)", "CUDA")]
    assert harness.count_profile(events, cuda=True) == (2, 3)
    assert harness.count_profile(events[:5], cuda=False) == (None, 3)


def test_help_documents_the_options(capsys):
    from benchmarks.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for word in ("--preset", "--providers", "--modes", "--out", "--cpu", "layer", "rank", "tokens", "decode",
                 "nf4", "peft_bnb", "floor"):
        assert word in text, word
    with pytest.raises(SystemExit) as e:
        main(["--providers", "nope"])
    assert e.value.code == 2


def test_use_backend_overrides_and_restores(monkeypatch):
    from lora_ops import _backend

    monkeypatch.setenv("LORA_OPS_BACKEND", "auto")
    with _backend.use_backend("reference"):
        assert _backend.requested_backend() == "reference"
        with _backend.use_backend("triton"):
            assert _backend.requested_backend() == "triton"
        assert _backend.requested_backend() == "reference"
    assert _backend.requested_backend() == "auto"
    with pytest.raises(ValueError, match="must be one of"):
        with _backend.use_backend("fast"):
            pass


# ------------------------------------------------------------------------------------------- block preset

def _bnb_reason():
    from benchmarks import model

    return model.bnb_unavailable(torch.device("cpu"))


@pytest.fixture
def one_thread():
    # What the CLI's --cpu does (--threads 1): OpenMP threads waiting on a busy shared machine made this test
    # several times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_cpu_block_preset_rows(one_thread):
    """The block preset's CPU quick cases end to end: a timing of every provider (peft_bnb only where
    bitsandbytes runs on the CPU), finite and positive, ratios to this run's floor, the grouped providers
    recorded as grouped."""
    cases = presets.select_cases(["block"], cpu=True)
    assert [c.name for c in cases] == ["tiny block M=64 r16", "tiny block M=256 r16", "tiny qkv M=64 r16",
                                       "tiny qkv M=256 r16", "tiny gate_up M=64 r16", "tiny gate_up M=256 r16"]
    assert all(sorted(c.providers()) == sorted(presets.BLOCK_PROVIDERS) and c.dtype == "float32" for c in cases)
    assert [(c.part, c.floor, c.providers()[0]) for c in cases[1:3]] == [("block", "floor", "floor"),
                                                                         ("qkv", "floor_grouped", "floor_grouped")]
    rows, _ = harness.run_cases(cases, harness.Settings(**FAST), ["--preset", "block"], progress=False)
    rows = [r for r in rows if r["case"] != "ceilings"]
    bnb = _bnb_reason()
    want = [p for p in presets.BLOCK_PROVIDERS if not (p == "peft_bnb" and bnb)]
    for case in cases:
        t = {r["provider"]: r for r in rows if r["case"] == case.name and r["metric"] == "time_ms"}
        assert sorted(t) == sorted(want), [r["note"] for r in rows if r["status"] == "skipped"]
        for p, r in t.items():
            assert r["status"] == "ok" and r["mode"] == "full" and r["preset"] == "block"
            assert math.isfinite(r["value"]) and 0 < r["p20"] <= r["value"] <= r["p80"]
            assert r["ratio_to_floor"] == pytest.approx(r["value"] / t[case.floor]["value"], rel=1e-12)
            cfg = json.loads(r["config"])
            assert (cfg["M"], cfg["kind"], cfg["r"], cfg["hidden"], cfg["kv"], cfg["intermediate"], cfg["part"]) == \
                (case.M, "block", 16, 64, 16, 256, case.part)
            assert sorted(cfg["projections"]) == sorted(presets.BLOCK_PARTS[case.part])
            if p.startswith("fused"):
                groups = cfg["provider_info"]["groups"]
                assert set(groups.values()) == ({"grouped"} if p.endswith("_grouped") else {"ungrouped"}), (p, groups)
        for metric in ("tflops", "gbps"):
            vals = [r["value"] for r in rows if r["case"] == case.name and r["metric"] == metric]
            assert len(vals) == len(want) and all(math.isfinite(v) and v > 0 for v in vals)
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert [(r["provider"], r["note"]) for r in skipped] == [("peft_bnb", bnb)] * (len(cases) if bnb else 0)
    for case in cases:  # the grouped providers' interleaved rounds against the case's floor and their twins
        paired = {(r["provider"], r["metric"]): r for r in rows if r["case"] == case.name and r["mode"] == "paired"}
        assert sorted(paired) == [(p, m) for p in ("fused_grouped", "fused_qlora_grouped")
                                  for m in ("grouping_ratio", "paired_ratio")]
        for (p, metric), r in paired.items():
            assert r["status"] == "ok", r["note"]
            assert math.isfinite(r["value"]) and 0 < r["p20"] <= r["value"] <= r["p80"]
            cfg = json.loads(r["config"])
            against = case.floor if metric == "paired_ratio" else p.removesuffix("_grouped")
            assert (cfg["floor"], cfg["against"], cfg["rounds"], cfg["mode"]) == (case.floor, against, 3, "paired")
        assert not [r for r in rows if r["mode"] == "paired_graph"]  # the CPU quick mode has no device time
    md = report.markdown(rows)
    assert "| tiny block M=256 r16 | fused_grouped (reference path) |" in md
    assert "| tiny qkv M=64 r16 | floor_grouped | " in md and "| 1.000× (1.000×) |" in md
    assert "| fused_grouped | paired | | " in md and "interleaved with floor_grouped" in md
    assert "interleaved with fused |" in md and "interleaved with fused_qlora |" in md
    from benchmarks import readme
    section = "\n".join(readme.block_section(report._index(rows), "x"))
    assert section.count("Interleaved rounds") == 2 and "| q/k/v, 64 tokens | " in section
    assert section.count("Grouped ÷ ungrouped (the same") == 2 and "Device time alone" not in section


def test_block_pairs_time_the_provider_against_the_floor(monkeypatch):
    """measure_pairs: the ratio is provider ÷ floor (a provider made slower reads above 1, by about what it was
    slowed), from rounds that alternate the two; a pair past the run's deadline is left out."""
    import time as _time

    from benchmarks import block

    case = presets.block_case("t", "tiny", 8, "float32", part="qkv")
    data = block.make_block_data(case, torch.device("cpu"))
    order = []

    def slowed(name, extra_s):
        real = block.BUILDERS[name]

        def build(case, ws):
            built = real(case, ws)
            fwd = built.forward

            def forward(x):
                order.append(name)
                _time.sleep(extra_s)
                return fwd(x)
            built.forward = forward
            return built
        return build

    monkeypatch.setitem(block.BUILDERS, "floor_grouped", slowed("floor_grouped", 0.001))
    monkeypatch.setitem(block.BUILDERS, "fused_grouped", slowed("fused_grouped", 0.030))
    run = harness.Run(harness.Device(harness.Settings(cpu=True)), harness.Settings(cpu=True), {}, "test-run")
    done = [dict(case=case.name, mode="full", metric="time_ms", status="ok", provider=p)
            for p in ("floor_grouped", "fused_grouped")]
    rows = block.measure_pairs(run, case, data, done)
    assert [(r["provider"], r["mode"], r["metric"], r["status"]) for r in rows] == \
        [("fused_grouped", "paired", "paired_ratio", "ok")]
    assert rows[0]["value"] > 3  # ~30 ms against ~1 ms of sleep per call, plus a few ms of compute on each side
    timed = order[-2 * 2 * 3:]  # 3 rounds of 2 calls per provider, after the warm-up calls
    assert timed == (["floor_grouped"] * 2 + ["fused_grouped"] * 4 + ["floor_grouped"] * 4
                     + ["fused_grouped"] * 2)
    run.deadline = _time.monotonic() - 1
    assert block.measure_pairs(run, case, data, done) == []



def test_block_pairs_add_device_time_from_graph_replays(monkeypatch):
    """Where the device can capture CUDA graphs, measure_pairs also times each pair from graph replays in
    interleaved rounds (mode paired_graph), against the floor and against the ungrouped twin: the ratio is the
    provider's replay time ÷ the reference's, its rows carry the rounds and the reference, the case table and the
    README's block section show them, and a capture that fails leaves the eager pair standing with a skipped
    paired_graph row. The CPU quick mode takes none."""
    from benchmarks import block, readme

    case = presets.block_case("t", "tiny", 8, "float32", part="qkv")
    data = block.make_block_data(case, torch.device("cpu"))
    run = harness.Run(harness.Device(harness.Settings(cpu=True)), harness.Settings(cpu=True), {}, "test-run")
    done = [dict(case=case.name, mode="full", metric="time_ms", status="ok", provider=p)
            for p in ("floor_grouped", "fused", "fused_grouped")]
    assert run.dev.graphs is False
    assert {r["mode"] for r in block.measure_pairs(run, case, data, done)} == {"paired"}

    captured, calls = [], []
    order = iter(["floor_grouped", "fused_grouped", "fused", "fused_grouped"])  # each pair: reference, provider
    fake_ms = {"floor_grouped": 2.0, "fused_grouped": 2.5, "fused": 2.6}

    def graph_timer(fn, grads, replays):
        name = next(order)
        captured.append((name, replays))
        fn()  # the captured call runs once, as a capture would

        def timer():
            calls.append(name)
            return fake_ms[name] * (1 + 0.01 * len(calls))  # drifts: each round's ratio stays near its pair's
        return timer

    run.dev.graphs = True
    monkeypatch.setattr(run.dev, "graph_timer", graph_timer)
    rows = block.measure_pairs(run, case, data, done)
    assert [(r["mode"], r["metric"], r["status"]) for r in rows] == [
        ("paired", "paired_ratio", "ok"), ("paired_graph", "paired_graph_ratio", "ok"),
        ("paired", "grouping_ratio", "ok"), ("paired_graph", "grouping_graph_ratio", "ok")]
    assert [r for r, _ in captured] == ["floor_grouped", "fused_grouped", "fused", "fused_grouped"]
    assert {n for _, n in captured} == {block.GRAPH_REPLAYS}
    assert calls[:6] == ["floor_grouped", "fused_grouped", "fused_grouped", "floor_grouped",
                         "floor_grouped", "fused_grouped"]  # 3 rounds, the order alternating
    g, t = rows[1], rows[3]
    assert 1.2 < g["p20"] <= g["value"] <= g["p80"] < 1.3 and 0.9 < t["p20"] <= t["value"] <= t["p80"] < 1.0
    cfg = json.loads(g["config"])
    assert (cfg["mode"], cfg["floor"], cfg["against"], cfg["rounds"], cfg["cuda_graphs"]) == \
        ("paired_graph", case.floor, case.floor, 3, True)
    assert json.loads(t["config"])["against"] == "fused"
    md = "\n".join(report._case_table(case.name, report._index(rows)[case.preset][case.name]))
    assert "| fused_grouped | paired_graph | | 1.2" in md and "CUDA-graph replays interleaved with floor_grouped" in md
    assert "| fused_grouped | paired_graph | | 0.9" in md and "CUDA-graph replays interleaved with fused |" in md
    section = "\n".join(readme._paired_lines(report._index(rows)[case.preset], "group, M", "floor_grouped"))
    for title in ("Interleaved rounds", "Device time alone", "Grouped ÷ ungrouped (the same",
                  "Grouped ÷ ungrouped in device time alone"):
        assert section.count(title) == 1, title

    def failing(fn, grads, replays):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(run.dev, "graph_timer", failing)
    rows = block.measure_pairs(run, case, data, done)
    assert [(r["mode"], r["status"]) for r in rows] == [("paired", "ok"), ("paired_graph", "skipped")] * 2
    assert "CUDA-graph rounds against floor_grouped failed" in rows[1]["note"] and "capturing" in rows[1]["note"]
    eager_only = [r for r in rows if r["mode"] == "paired"]
    monkeypatch.setattr(run.dev, "graph_timer", graph_timer)
    order = iter(["floor_grouped", "fused_grouped"])  # the floor pair captures, then the twin pair's fails
    calls.clear()

    def twin_fails(fn, grads, replays):
        try:
            return graph_timer(fn, grads, replays)
        except StopIteration:
            raise RuntimeError("capture failed") from None
    monkeypatch.setattr(run.dev, "graph_timer", twin_fails)
    rows = block.measure_pairs(run, case, data, done)
    assert [(r["mode"], r["metric"]) for r in rows] == [
        ("paired", "paired_ratio"), ("paired_graph", "paired_graph_ratio"), ("paired", "grouping_ratio"),
        ("paired_graph", "skipped")]
    md = "\n".join(report._case_table(case.name, report._index(rows)[case.preset][case.name]))
    assert "CUDA-graph replays interleaved with floor_grouped" in md  # kept beside the skipped twin pair
    assert "fused_grouped paired_graph: CUDA-graph rounds against fused failed" in md
    assert len(eager_only) == 2


def test_interleaved_rounds_alternate_the_order():
    from benchmarks import block

    seen = []
    got = block.interleaved({"a": lambda: seen.append("a") or 1.0, "b": lambda: seen.append("b") or 2.0}, 4)
    assert seen == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert got == {"a": [1.0] * 4, "b": [2.0] * 4}

def _block_run(built, data):
    """One fwd+bwd of a built block provider: (outputs, input grads, {(projection, 'A'|'B'): grad})."""
    for x in data.x:
        x.grad = None
    ys = built.forward(data.x)
    torch.autograd.backward(ys, data.dy)
    dxs = [x.grad for x in data.x]
    grads = {}
    for name, p in built.module.named_parameters():
        if p.requires_grad:
            parts = name.split(".")
            proj = next(s for s in parts if s.endswith("_proj"))
            grads[(proj, "A" if "lora_A" in parts else "B")] = p.grad
    return [y.detach() for y in ys], dxs, grads


@pytest.mark.parametrize("weight,part", [("dense", "block"), ("nf4", "block"), ("dense", "qkv"), ("nf4", "gate_up")])
def test_block_providers_compute_the_same_block(weight, part):
    """Every provider of a block case computes its projections (the seven, or one group alone) of the same
    weights: outputs, the input gradients and every adapter gradient equal a float64 reference (NF4: of the
    dequantized weights), grouped and ungrouped alike; the floors equal the reference without adapters.
    peft_bnb's reference is of bitsandbytes' own dequantized weights: on the CPU its double-quantization codes can
    differ from lora_ops' (docs/DESIGN.md), here in one block of gate_proj."""
    import lora_ops
    from benchmarks import block

    case = presets.block_case("t", "tiny", 19, "float32", part=part)
    data = block.make_block_data(case, torch.device("cpu"), seed=3)
    names = [n for n, *_ in case.projections()]
    assert names == list(presets.BLOCK_PARTS[part]) and len(data.dy) == len(names)
    ws = data.sets[0]
    inputs = dict(zip([n for n, _ in case.inputs()], data.x))

    def dequantized(W, by):
        if weight == "dense":
            return W
        if by == "peft_bnb":
            import bitsandbytes.functional as bnbf

            w4 = providers.bnb_linear4bit(W, torch.float32).weight
            return bnbf.dequantize_4bit(w4.data, w4.quant_state)
        return lora_ops.quantize_nf4(W).dequantize()

    def reference(adapters, by=None):
        xs = {k: v.detach().double().requires_grad_(True) for k, v in inputs.items()}
        ab = {n: (ws[n].A.double().requires_grad_(True), ws[n].B.double().requires_grad_(True)) for n in names}
        ys = []
        for name, _, x, _, _ in case.projections():
            W = dequantized(ws[name].W, by)
            y = xs[x] @ W.double().T
            if adapters:
                y = y + case.scaling * (xs[x] @ ab[name][0].T) @ ab[name][1].T
            ys.append(y)
        torch.autograd.backward(ys, [d.double() for d in data.dy])
        grads = {(n, k): t.grad for n, (a, b) in ab.items() for k, t in (("A", a), ("B", b))}
        return ys, [xs[n].grad for n, _ in case.inputs()], grads

    lora = (["peft", "fused", "fused_grouped"] if weight == "dense"
            else ["peft_bnb", "fused_qlora", "fused_qlora_grouped"])
    if weight == "nf4" and _bnb_reason():
        lora.remove("peft_bnb")
    results = {}
    for p in lora:
        ys_ref, dx_ref, g_ref = reference(True, p)
        results[p] = got = _block_run(block.BUILDERS[p](case, ws), data)
        for i, (y, yr) in enumerate(zip(got[0], ys_ref)):
            assert_rel_close(y, yr, torch.float32, f"{p} y{i}")
        for i, (dx, dr) in enumerate(zip(got[1], dx_ref)):
            assert_rel_close(dx, dr, torch.float32, f"{p} dx{i}")
        assert sorted(got[2]) == sorted(g_ref)
        for k in g_ref:
            assert_rel_close(got[2][k], g_ref[k], torch.float32, f"{p} grad {k}")
    grouped, ungrouped = lora[-1], lora[-2]
    for y, yu in zip(results[grouped][0], results[ungrouped][0]):
        assert_rel_close(y, yu, torch.float32, "grouped vs ungrouped")
    ys_ref = reference(True)[0]
    if weight == "dense":  # the floors: the same projections without adapters (dense weights)
        ys0, dx0, _ = reference(False)
        for p in ("floor", "floor_grouped"):
            ys, dxs, grads = _block_run(block.BUILDERS[p](case, ws), data)
            assert not grads
            for y, yr in zip(ys, ys0):
                assert_rel_close(y, yr, torch.float32, f"{p} y")
            for dx, dr in zip(dxs, dx0):
                assert_rel_close(dx, dr, torch.float32, f"{p} dx")
            with pytest.raises(AssertionError):  # control: no adapter is not the LoRA block
                assert_rel_close(ys[0], ys_ref[0], torch.float32, "floor vs LoRA")


def test_block_grouped_provider_refuses_an_ungrouped_model(monkeypatch):
    """A grouped provider whose groups did not form fails its build (recorded as skipped), so an ungrouped model
    is never timed under a grouped name."""
    from benchmarks import block
    from lora_ops import inject

    case = presets.block_case("t", "tiny", 8, "float32")
    data = block.make_block_data(case, torch.device("cpu"))
    monkeypatch.setattr(inject, "_group_new", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="left the projections ungrouped"):
        block.build_fused_grouped(case, data.sets[0])
    block.build_fused(case, data.sets[0])  # the ungrouped twin does not care
    one = case.filtered(["fused_grouped"])
    rows, _ = harness.run_cases([one], harness.Settings(**FAST), progress=False)
    r = next(r for r in rows if r["provider"] == "fused_grouped")
    assert r["status"] == "skipped" and "left the projections ungrouped" in r["note"]


def test_block_preset_shapes_and_cost():
    gpu = presets.PRESETS["block"].cases(cpu=False)
    assert [(c.part, c.M, c.dtype, c.r, c.arch) for c in gpu] == [
        (part, M, "bfloat16", 16, "llama3-8b") for part in ("block", "qkv", "gate_up") for M in (2048, 8192)]
    assert [(n, K, N) for n, _, _, K, N in gpu[2].projections()] == [("q_proj", 4096, 4096), ("k_proj", 4096, 1024),
                                                                     ("v_proj", 4096, 1024)]
    assert gpu[2].inputs() == [("x_attn", 4096)] and gpu[4].inputs() == [("x_mlp", 4096)]
    assert [n for n, *_ in gpu[5].projections()] == ["gate_proj", "up_proj"] and gpu[5].floor == "floor_grouped"
    assert gpu[5].providers()[0] == "floor_grouped" and gpu[5].shape.endswith("projections=gate,up")
    with pytest.raises(ValueError, match="part='mlp'"):
        presets.block_case("block", "tiny", 8, "float32", part="mlp")
    assert gpu[0].projections() == [("q_proj", "self_attn", "x_attn", 4096, 4096),
                                    ("k_proj", "self_attn", "x_attn", 4096, 1024),
                                    ("v_proj", "self_attn", "x_attn", 4096, 1024),
                                    ("o_proj", "self_attn", "x_o", 4096, 4096),
                                    ("gate_proj", "mlp", "x_mlp", 4096, 14336),
                                    ("up_proj", "mlp", "x_mlp", 4096, 14336),
                                    ("down_proj", "mlp", "x_down", 14336, 4096)]
    from benchmarks import block

    c = gpu[1]
    M = c.M
    nk = sum(K * N for _, _, _, K, N in c.projections())
    assert harness.case_cost(c, "floor", "full")[0] == 4 * M * nk  # forward GEMM + dX GEMM of each
    assert harness.case_cost(c, "floor_grouped", "full") == harness.case_cost(c, "floor", "full")
    lora = harness.case_cost(c, "fused", "full")
    assert lora == harness.case_cost(c, "fused_grouped", "full") == harness.case_cost(c, "peft", "full")
    assert lora[0] > 4 * M * nk
    assert harness.case_cost(c, "fused_qlora", "full")[1] < lora[1]  # NF4 bytes for the bases
    assert block.block_cost(c, "peft_bnb", "full") == harness.case_cost(c, "fused_qlora_grouped", "full")
    with pytest.raises(ValueError, match="does not run the block preset"):
        presets.BlockCase("block", "x", "tiny", 8, plan=(("unfused", ("full",)),))
    with pytest.raises(ValueError, match="times full"):
        presets.BlockCase("block", "x", "tiny", 8, plan=(("fused", ("decode",)),))
    assert c.filtered(["peft_bnb"], None).providers() == ["floor", "peft_bnb", "floor_repeat"]
    assert c.filtered(None, ["decode"]) is None
    assert gpu[3].filtered(["fused_grouped"], None).providers() == ["floor_grouped", "fused_grouped", "floor_repeat"]


def test_block_cli_list_and_help(capsys):
    from benchmarks.cli import main

    assert main(["--cpu", "--preset", "block", "--providers", "fused_grouped", "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6 and all("floor: full; fused_grouped: full; floor_repeat: full" in l for l in out[:2])
    assert all("floor_grouped: full; fused_grouped: full; floor_repeat: full" in l for l in out[2:])
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for word in ("block", "fused_grouped", "fused_qlora_grouped", "floor_grouped", "--preset block"):
        assert word in text, word


# ----------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_gpu_small_case_measures_memory_and_kernels(cuda):
    case = layer_case("t", 257, 512, 768, 16, "dense", 0.0, ("forward",), "bfloat16")
    rows, env = harness.run_cases([case], harness.Settings(cpu=False, warmup_ms=5, rep_ms=20), progress=False)
    by = {(r["provider"], r["mode"], r["metric"]): r for r in rows}
    assert not [r for r in rows if r["status"] == "skipped"], [r["note"] for r in rows if r["status"] == "skipped"]
    w_mib = 512 * 768 * 2 / 2 ** 20
    y_mib = 257 * 768 * 2 / 2 ** 20
    assert by[("floor", "full", "peak_extra_mib")]["value"] >= w_mib + y_mib  # weights count, the output too
    assert by[("floor", "full", "kernel_launches")]["value"] >= 2  # forward GEMM + dX GEMM
    assert env["ceilings"]["gemm_tflops"] > 50 and env["ceilings"]["copy_gbps"] > 500
    assert harness.slugify(env["gpu"]) != "cpu"


@pytest.mark.gpu
def test_gpu_block_case_runs_every_provider(cuda):
    """A small block case (the tiny decoder's widths, bf16) on the GPU: every provider timed (peft_bnb where
    bitsandbytes has its CUDA build), memory and kernels measured, lora_ops on its kernels, groups formed."""
    from benchmarks import model

    case = presets.block_case("t", "tiny", 256, "bfloat16")
    rows, _ = harness.run_cases([case], harness.Settings(cpu=False, warmup_ms=5, rep_ms=20), progress=False)
    by = {(r["provider"], r["metric"]): r for r in rows if r["case"] == case.name}
    bnb = model.bnb_unavailable(cuda)
    for p in presets.BLOCK_PROVIDERS:
        if p == "peft_bnb" and bnb:
            assert "bitsandbytes" in by[(p, "skipped")]["note"]
            continue
        assert (p, "time_ms") in by, by.get((p, "skipped"), {}).get("note")
        assert by[(p, "peak_extra_mib")]["status"] == "ok" and by[(p, "peak_extra_mib")]["value"] > 0
        assert by[(p, "kernel_launches")]["value"] >= 4  # at least a forward and a dX GEMM per group / layer
        if p.startswith("fused"):
            info = json.loads(by[(p, "time_ms")]["config"])["provider_info"]
            assert info["lora_fwd"] != "reference", info
            assert set(info["groups"].values()) == ({"grouped"} if p.endswith("_grouped") else {"ungrouped"})
    for p in ("fused_grouped", "fused_qlora_grouped"):  # eager and CUDA-graph rounds: floor, ungrouped twin
        for metric in ("paired_ratio", "paired_graph_ratio", "grouping_ratio", "grouping_graph_ratio"):
            r = by[(p, metric)]
            assert r["status"] == "ok" and 0 < r["p20"] <= r["value"] <= r["p80"], r["note"]
