"""The model-level benchmark preset (benchmarks/model.py, ``python -m benchmarks --preset model``) on the CPU:
a tiny Llama-shaped decoder (hidden 64, 2 layers, vocab 128, 2 x 16 tokens) through every provider that runs
here, the rows it writes, the report/plot/target line, and the command line's errors."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import harness, model, presets, report  # noqa: E402
from benchmarks.cli import main  # noqa: E402
from benchmarks.presets import ModelCase, select_cases  # noqa: E402

FAST = dict(cpu=True, cpu_min_reps=2, cpu_max_reps=3, cpu_target_s=0.001, profile=False)
LORA = ("fused", "fused_qlora", "peft", "peft_bnb")


def _png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _by(rows):
    return {(r["provider"], r["metric"]): r for r in rows if r["case"] != "ceilings"}


@pytest.fixture(scope="module")
def cpu_run():
    (case,) = select_cases(["model"], cpu=True)
    rows, env = harness.run_cases([case], harness.Settings(**FAST), ["--preset", "model"], progress=False)
    return case, rows


def test_cpu_model_preset_rows(cpu_run):
    case, rows = cpu_run
    assert (case.arch, case.layers, case.seq, case.batch, case.dtype) == ("tiny", 2, 16, 2, "float32")
    assert case.dims == dict(hidden=64, intermediate=256, heads=4, kv_heads=1, vocab=128)
    by = _by(rows)
    bnb_reason = model.bnb_unavailable(torch.device("cpu"))
    ran = [p for p in presets.MODEL_PROVIDERS if not (p == "peft_bnb" and bnb_reason)]
    if bnb_reason:  # bitsandbytes without a working CPU backend: skipped, with the reason
        assert by[("peft_bnb", "skipped")]["note"].startswith("bitsandbytes")
    for p in ran:
        tk, t = by[(p, "tokens_per_s")], by[(p, "time_ms")]
        assert tk["status"] == "ok" and tk["value"] > 0 and tk["p20"] <= tk["value"] <= tk["p80"]
        assert tk["value"] == pytest.approx(case.tokens * 1e3 / t["value"], rel=1e-12)
        assert by[(p, "peak_extra_mib")]["status"] == "n/a"  # no device memory statistics on the CPU
        assert math.isfinite(by[(p, "loss_first")]["value"]) and math.isfinite(by[(p, "loss_last")]["value"])
        if "peft_bnb" in ran:  # ratios are to peft_bnb of the same run
            ref = by[("peft_bnb", "tokens_per_s")]["value"]
            assert tk["ratio_to_floor"] == pytest.approx(tk["value"] / ref, rel=1e-12)
    # The depth is in every row: in the config, the shape and the case name.
    for r in (r for r in rows if r["case"] != "ceilings"):
        assert json.loads(r["config"])["layers"] == 2 and "layers=2" in r["shape"] and "L2" in r["case"]
        assert r["preset"] == "model" and r["mode"] == "step"
    # Like with like: the same adapters everywhere, the same base weights (B = 0: the first loss is the base's).
    want = model.expected_lora_params(case)
    for p in ran:
        if p in LORA:
            assert by[(p, "trainable_params")]["value"] == want
    d = case.dims
    total = 2 * d["vocab"] * d["hidden"] + d["hidden"] + case.layers * (
        2 * d["hidden"] ** 2 + 2 * d["hidden"] * d["hidden"] // d["heads"] * d["kv_heads"]
        + 3 * d["hidden"] * d["intermediate"] + 2 * d["hidden"])
    assert by[("full_ft", "trainable_params")]["value"] == total
    loss = {p: by[(p, "loss_first")]["value"] for p in ran}
    assert loss["fused"] == pytest.approx(loss["peft"], rel=1e-5) == pytest.approx(loss["full_ft"], rel=1e-5)
    if "peft_bnb" in ran:  # NF4 bases quantized by bitsandbytes and by lora_ops: the same bytes
        assert loss["fused_qlora"] == pytest.approx(loss["peft_bnb"], rel=1e-5)
    assert abs(loss["fused_qlora"] - loss["fused"]) > 0  # quantization changes the base: the NF4 path did run
    info = json.loads(by[("peft_bnb" if "peft_bnb" in ran else "peft", "time_ms")]["config"])["provider_info"]
    if "peft_bnb" in ran:
        assert info["lora_layer"] == ["peft.tuners.lora.bnb.Linear4bit"]  # PEFT's own 4-bit LoRA layer


def test_model_report_and_plot(cpu_run, tmp_path):
    case, rows = cpu_run
    written = report.write_outputs(rows, tmp_path)
    assert _png(tmp_path / "model_throughput.png")
    md = (tmp_path / "results.md").read_text()
    assert f"### {case.name} (2 layers, 2x16 tokens per step" in md
    tail = md[md.index("## Summary"):]
    assert "Target (tiny L2 2x16): fused_qlora ≥ 1.30× peft_bnb tokens/s" in tail
    assert "| case | provider | ms p50 |" not in tail  # no layer table when only the model preset ran
    assert written["rows"] == len(rows)


def _model_rows(tq=1.35, mem=0.9, skip_ref=None):
    """Synthetic CUDA-like model rows: peft_bnb 10000 tokens/s, 20 GiB; fused_qlora tq x and mem x that."""
    cfg = json.dumps(dict(layers=4, seq=2048, batch=4, dtype="bfloat16", r=16, steps=10, warmup_steps=3))
    env = json.dumps(dict(gpu="NVIDIA H200", command="python -m benchmarks --preset model",
                          date_utc="2026-12-01T10:00:00+00:00", git_commit="abcdef1"))
    rows = []
    for p, tok, mib in (("peft_bnb", 1e4, 20480.0), ("fused_qlora", 1e4 * tq, 20480.0 * mem)):
        if p == "peft_bnb" and skip_ref:
            rows.append(dict(run_id="r1", preset="model", case="m", shape="s", provider=p, mode="step",
                             metric="skipped", value=math.nan, p20=math.nan, p80=math.nan, unit="",
                             ratio_to_floor=math.nan, status="skipped", note=skip_ref, config=cfg, env=env))
            continue
        for metric, v in (("tokens_per_s", tok), ("time_ms", 8192e3 / tok), ("peak_extra_mib", mib)):
            rows.append(dict(run_id="r1", preset="model", case="m", shape="s", provider=p, mode="step", metric=metric,
                             value=v, p20=v, p80=v, unit="", ratio_to_floor=math.nan, status="ok", note="",
                             config=cfg, env=env))
    return report.add_ratios(rows, "peft_bnb")


@pytest.mark.parametrize("tq, mem, verdict", [(1.35, 0.9, "**met**"), (1.2, 0.9, "**not met**"),
                                              (1.5, 1.05, "**not met**")])
def test_target_line(tq, mem, verdict, tmp_path):
    rows = _model_rows(tq, mem)
    (line,) = report.model_target_lines(rows)
    assert line.endswith(verdict + ".") and f"{tq:.3f}× tokens/s" in line
    assert line in report.markdown(rows)
    assert [p.name for p in report.plot_all(rows, tmp_path)] == ["model_throughput.png"]
    (line,) = report.model_target_lines(_model_rows(skip_ref="bitsandbytes 0.50.2 has no CUDA backend here"))
    assert "cannot be checked: peft_bnb skipped (bitsandbytes 0.50.2 has no CUDA backend" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given on a machine without CUDA")
def test_bnb_without_its_cuda_library_gives_the_reason():
    reason = model.bnb_unavailable(torch.device("cuda"))
    assert reason and "has no CUDA library loaded here" in reason and "carry the wheel" in reason


def test_failing_provider_and_missing_bnb_are_skipped(monkeypatch):
    (case,) = select_cases(["model"], cpu=True, providers=["fused", "peft"],
                           model_options=dict(layers=1, seq=4, steps=1))
    assert case.providers() == ["peft_bnb", "peft", "fused"] and case.layers == 1

    def oom(case, device, seed=0):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setitem(model.BUILDERS, "peft", oom)
    monkeypatch.setattr(model, "bnb_unavailable", lambda device: "bitsandbytes 0.50.2 has no CUDA backend here (test)")
    rows, _ = harness.run_cases([case], harness.Settings(**FAST), progress=False)
    by = _by(rows)
    assert "has no CUDA backend" in by[("peft_bnb", "skipped")]["note"]
    assert "OutOfMemoryError" in by[("peft", "skipped")]["note"]
    assert by[("fused", "tokens_per_s")]["value"] > 0
    assert math.isnan(by[("fused", "tokens_per_s")]["ratio_to_floor"])  # no reference in this run: no ratio
    rows, _ = harness.run_cases([case], harness.Settings(**FAST), progress=False, budget_s=0.0)
    assert all(r["status"] == "skipped" and "budget" in r["note"] for r in rows if r["case"] == case.name)


def test_cli_model_end_to_end_and_depths_merge(tmp_path, capsys):
    args = ["--cpu", "--preset", "model", "--providers", "lora_ops_qlora", "--seq", "8", "--batch", "2",
            "--steps", "2", "--warmup-steps", "1", "--out", str(tmp_path), "--quiet"]
    assert main(args + ["--layers", "1"]) == 0
    assert main(args + ["--layers", "2"]) == 0
    out = capsys.readouterr().out
    assert "Target (tiny L2 2x8): fused_qlora" in out
    rows = report.read_csv(tmp_path / "cpu" / "results.csv")
    depths = {(r["case"], json.loads(r["config"])["layers"]) for r in rows if r["preset"] == "model"
              and r["case"] != "ceilings"}
    assert depths == {("tiny L1 2x8", 1), ("tiny L2 2x8", 2)}  # both depths kept side by side
    provs = {r["provider"] for r in rows if r["metric"] in ("tokens_per_s", "skipped")}
    assert provs == {"peft_bnb", "fused_qlora"}  # the alias, and the reference that every ratio needs
    assert _png(tmp_path / "cpu" / "model_throughput.png")


@pytest.mark.parametrize("argv, message", [
    (["--preset", "model", "--layers", "0"], "argument --layers: '0' must be a finite number >= 1"),
    (["--preset", "model", "--seq", "1"], "argument --seq: '1' must be a finite number >= 2"),
    (["--preset", "model", "--batch", "two"], "argument --batch: 'two' is not an integer"),
    (["--preset", "model", "--steps", "1.5"], "argument --steps: '1.5' is not an integer"),
    (["--preset", "model", "--providers", "lora_ops,nope"], "unknown provider ['nope']"),
])
def test_bad_arguments_fail_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--cpu", "--list"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_model_options_need_the_model_preset(capsys):
    assert main(["--cpu", "--preset", "layer", "--layers", "2", "--list"]) == 2
    assert "--layers only apply to the model preset; add --preset model" in capsys.readouterr().err
    assert main(["--cpu", "--preset", "model", "--providers", "floor", "--list"]) == 2  # not a model provider
    assert main(["--cpu", "--preset", "model", "layer", "--providers", "full", "--layers", "3", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "tiny L3 2x16" in listed and "peft_bnb: step; full_ft: step" in listed and "full_ft: full" in listed


def test_model_case_validation_and_gpu_shape():
    plan = (("peft_bnb", ("step",)),)
    for bad in (dict(layers=0), dict(seq=1), dict(batch=0), dict(steps=0), dict(warmup_steps=0), dict(arch="gpt")):
        kw = dict(preset="model", name="x", arch="tiny", layers=1, seq=4, batch=1, plan=plan)
        kw.update(bad)
        with pytest.raises(ValueError, match=next(iter(bad))):
            ModelCase(**kw)
    with pytest.raises(ValueError, match="does not run the model preset"):
        ModelCase("model", "x", "tiny", 1, 4, 1, plan=(("floor", ("step",)),))
    with pytest.raises(ValueError, match="mode 'step' only"):
        ModelCase("model", "x", "tiny", 1, 4, 1, plan=(("fused", ("full",)),))
    with pytest.raises(ValueError, match="takes no option"):
        presets.PRESETS["layer"].cases(False, layers=2)
    (gpu,) = presets.PRESETS["model"].cases(False)
    assert (gpu.arch, gpu.layers, gpu.seq, gpu.batch, gpu.dtype, gpu.r) == ("llama3-8b", 4, 2048, 4, "bfloat16", 16)
    assert gpu.providers() == ["peft_bnb", "fused_qlora", "peft", "fused", "full_ft"]
    assert gpu.filtered(["fused_qlora"]).providers() == ["peft_bnb", "fused_qlora"]
    assert gpu.filtered(None, ["full"]) is None
    cfg = model.llama_config(gpu)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.num_hidden_layers, cfg.tie_word_embeddings) == (4096, 14336, 32, 8, 128256, 4, False)
    assert cfg.rms_norm_eps == 1e-5 and cfg.hidden_act == "silu"
    # r=16 on the seven projections of all 32 layers of Llama-3-8B: PEFT's well-known 41,943,040.
    assert model.expected_lora_params(presets.model_case("m", "llama3-8b", "bfloat16", 32, 2048, 4, 10, 3)) \
        == 41_943_040
