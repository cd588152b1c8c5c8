"""The model-level benchmark preset (benchmarks/model.py, ``python -m benchmarks --preset model``) on the CPU:
a tiny Llama-shaped decoder (hidden 64, 2 layers, vocab 128) in the quick mode's three cases (1 x 16 and 2 x 16
tokens with gradient checkpointing, 1 x 16 without) through every provider that runs here, the frozen-base floor
included; the rows it writes, gradient checkpointing (the same loss and gradients as without it, for lora_ops
models too), the grouped providers (group_projections=True: the same losses as their ungrouped twins, skipped
when the groups do not form), the report (both ratios, the grouping ratio), the targets, the plot and the command
line's options and errors."""
import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import lora_ops

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import harness, model, presets, report  # noqa: E402
from benchmarks.cli import main  # noqa: E402
from benchmarks.presets import ModelCase, select_cases  # noqa: E402
from helpers import kernels_only  # noqa: E402

FAST = dict(cpu=True, cpu_min_reps=2, cpu_max_reps=3, cpu_target_s=0.001, profile=False)
LORA = ("fused", "fused_qlora", "fused_grouped", "fused_qlora_grouped", "peft", "peft_bnb")
GROUPED = (("fused_grouped", "fused"), ("fused_qlora_grouped", "fused_qlora"))
PROVIDERS = ["floor", "peft_bnb", "fused_qlora", "fused_qlora_grouped", "peft", "fused", "fused_grouped", "full_ft"]
CPU_CASES = (("tiny L2 1x16 ckpt", 1, True), ("tiny L2 2x16 ckpt", 2, True), ("tiny L2 1x16 no-ckpt", 1, False))


def _png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _by(rows, case=None):
    return {(r["provider"], r["metric"]): r for r in rows if r["case"] != "ceilings" and case in (None, r["case"])}


@pytest.fixture(scope="module")
def cpu_run():
    cases = select_cases(["model"], cpu=True)
    rows, env = harness.run_cases(cases, harness.Settings(**FAST), ["--preset", "model"], progress=False)
    return cases, rows


def _ran():
    bnb_reason = model.bnb_unavailable(torch.device("cpu"))
    return [p for p in presets.MODEL_PROVIDERS if not (p == "peft_bnb" and bnb_reason)], bnb_reason


def test_cpu_quick_mode_cases():
    cases = select_cases(["model"], cpu=True)
    assert [(c.name, c.batch, c.checkpointing) for c in cases] == list(CPU_CASES)
    for c in cases:
        assert (c.arch, c.layers, c.seq, c.dtype, c.steps, c.warmup_steps) == ("tiny", 2, 16, "float32", 3, 1)
        assert c.dims == dict(hidden=64, intermediate=256, heads=4, kv_heads=1, vocab=128)
        assert c.providers() == PROVIDERS
        assert (c.floor, c.reference) == ("floor", "peft_bnb")


def test_cpu_model_preset_rows(cpu_run):
    cases, rows = cpu_run
    ran, bnb_reason = _ran()
    for case in cases:
        by = _by(rows, case.name)
        if bnb_reason:  # bitsandbytes without a working CPU backend: skipped, with the reason
            assert by[("peft_bnb", "skipped")]["note"].startswith("bitsandbytes")
        floor_tok = by[("floor", "tokens_per_s")]["value"]
        for p in ran:
            tk, t = by[(p, "tokens_per_s")], by[(p, "time_ms")]
            assert tk["status"] == "ok" and tk["value"] > 0 and tk["p20"] <= tk["value"] <= tk["p80"]
            assert tk["value"] == pytest.approx(case.tokens * 1e3 / t["value"], rel=1e-12)
            assert by[(p, "peak_extra_mib")]["status"] == "n/a"  # no device memory statistics on the CPU
            assert math.isfinite(by[(p, "loss_first")]["value"]) and math.isfinite(by[(p, "loss_last")]["value"])
            # ratio_to_floor is to the frozen-base floor of the same run
            assert tk["ratio_to_floor"] == pytest.approx(tk["value"] / floor_tok, rel=1e-12)
            assert t["ratio_to_floor"] == pytest.approx(t["value"] / by[("floor", "time_ms")]["value"], rel=1e-12)
            cfg = json.loads(t["config"])
            assert cfg["checkpointing"] is case.checkpointing and cfg["input_require_grads"] is True
            assert bool(cfg["gradient_checkpointing"]) is case.checkpointing
            if case.checkpointing:
                assert "use_reentrant': False" in cfg["gradient_checkpointing"]
        # The floor trains nothing: no parameter, no optimizer, the same loss before and after its steps.
        assert by[("floor", "trainable_params")]["value"] == 0
        assert by[("floor", "loss_first")]["value"] == by[("floor", "loss_last")]["value"]
        assert json.loads(by[("floor", "time_ms")]["config"])["optimizer"].startswith("none")
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
        for p in ("peft", "full_ft", "floor"):
            assert loss["fused"] == pytest.approx(loss[p], rel=1e-5), p
        if "peft_bnb" in ran:  # NF4 bases quantized by bitsandbytes and by lora_ops: the same bytes
            assert loss["fused_qlora"] == pytest.approx(loss["peft_bnb"], rel=1e-5)
            info = json.loads(by[("peft_bnb", "time_ms")]["config"])["provider_info"]
            assert info["lora_layer"] == ["peft.tuners.lora.bnb.Linear4bit"]  # PEFT's own 4-bit LoRA layer
        assert abs(loss["fused_qlora"] - loss["fused"]) > 0  # quantization changes the base: the NF4 path did run
    # The depth and the checkpointing setting are in every row: in the config, the shape and the case name.
    for r in (r for r in rows if r["case"] != "ceilings"):
        cfg = json.loads(r["config"])
        assert cfg["layers"] == 2 and "layers=2" in r["shape"] and "L2" in r["case"]
        assert f"checkpointing={'on' if cfg['checkpointing'] else 'off'}" in r["shape"]
        assert r["case"].endswith(" ckpt" if cfg["checkpointing"] else " no-ckpt")
        assert r["preset"] == "model" and r["mode"] in ("step", "paired")
        assert r["mode"] == "step" or (r["provider"] in dict(GROUPED) and r["metric"] == "grouping_ratio")


def test_checkpointing_keeps_the_training_steps(cpu_run):
    """1 x 16 with and without gradient checkpointing: the same token ids and weights, so the same first loss
    and, after the warm-up and timed AdamW steps, the same last loss for every provider (lora_ops included)."""
    cases, rows = cpu_run
    ran, _ = _ran()
    on, off = _by(rows, "tiny L2 1x16 ckpt"), _by(rows, "tiny L2 1x16 no-ckpt")
    for p in ran:
        for metric in ("loss_first", "loss_last"):
            assert on[(p, metric)]["value"] == pytest.approx(off[(p, metric)]["value"], rel=1e-6, abs=0), (p, metric)


def test_grouped_providers_rows_and_losses(cpu_run):
    """fused_grouped / fused_qlora_grouped ran in every case with q/k/v and gate/up of both layers grouped, and
    trained as their ungrouped twins did: the same base weights, adapters and token ids, so the same first and
    last loss (fp32; grouping only changes the order of the sums)."""
    cases, rows = cpu_run
    for case in cases:
        by = _by(rows, case.name)
        for grouped, twin in GROUPED:
            assert by[(grouped, "time_ms")]["status"] == "ok" and by[(grouped, "tokens_per_s")]["value"] > 0
            info = json.loads(by[(grouped, "time_ms")]["config"])["provider_info"]
            assert info["group_projections"] is True and info["groups"] == {"grouped": 2 * case.layers}
            assert "group_projections" not in json.loads(by[(twin, "time_ms")]["config"])["provider_info"]
            assert info["quantize"] == json.loads(by[(twin, "time_ms")]["config"])["provider_info"]["quantize"]
            for metric in ("loss_first", "loss_last", "trainable_params"):
                assert by[(grouped, metric)]["value"] == pytest.approx(by[(twin, metric)]["value"], rel=1e-6,
                                                                       abs=0), (grouped, metric)


def test_paired_grouping_ratio_rows(cpu_run):
    """Where a grouped provider and its twin both ran, the two models were timed again side by side in
    alternating order: one grouping_ratio row (mode paired) per grouped provider and case, the median of the
    per-round ratios between its p20 and p80, its config naming the twin and the rounds; the grouping line of the
    report shows it beside the ratio of the two separately timed medians."""
    cases, rows = cpu_run
    for case in cases:
        paired = [r for r in rows if r["case"] == case.name and r["mode"] == "paired"]
        assert sorted(r["provider"] for r in paired) == sorted(g for g, _ in GROUPED)
        for r in paired:
            assert r["status"] == "ok" and r["metric"] == "grouping_ratio" and r["unit"] == "x"
            assert 0 < r["p20"] <= r["value"] <= r["p80"] and math.isnan(r["ratio_to_floor"])
            cfg = json.loads(r["config"])
            assert cfg["twin"] == dict(GROUPED)[r["provider"]] and cfg["rounds"] == case.steps
    lines = report.model_grouping_lines(rows)
    assert lines and all("interleaved steps" in line for line in lines), lines


def test_paired_steps_need_both_providers_and_record_failures(monkeypatch):
    """No paired steps where the twin did not run; paired steps that fail (e.g. out of memory with both models
    alive) leave a skipped row of mode paired with the reason, and the providers' own rows stand."""
    (case,) = select_cases(["model"], cpu=True, providers=["fused", "fused_grouped"],
                           model_options=dict(layers=1, seq=4, steps=2, batch=1, checkpointing=False))
    monkeypatch.setattr(model, "bnb_unavailable", lambda device: "bitsandbytes: not here (test)")
    real = model.BUILDERS["fused_grouped"]
    calls = []

    def second_build_fails(case, device, seed=0):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(case, device, seed)

    monkeypatch.setitem(model.BUILDERS, "fused_grouped", second_build_fails)
    rows, _ = harness.run_cases([case], harness.Settings(**FAST), progress=False)
    paired = [r for r in rows if r["mode"] == "paired"]
    assert [(r["provider"], r["status"]) for r in paired] == [("fused_grouped", "skipped")]
    assert "OutOfMemoryError" in paired[0]["note"]
    assert _by(rows)[("fused_grouped", "time_ms")]["status"] == "ok"

    def oom(case, device, seed=0):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setitem(model.BUILDERS, "fused", oom)
    monkeypatch.setitem(model.BUILDERS, "fused_grouped", real)
    rows, _ = harness.run_cases([case], harness.Settings(**FAST), progress=False)
    assert not [r for r in rows if r["mode"] == "paired"]  # the twin did not run: no pair


@pytest.mark.parametrize("grouped, twin", GROUPED)
def test_grouped_training_trajectory_matches_ungrouped(grouped, twin, monkeypatch):
    """Several AdamW steps with non-zero adapters and a learning rate that moves them: every step's loss and the
    adapters after the last step are the ungrouped twin's (fp32), while the grouped model makes 4 lora_linear
    calls per layer instead of 7."""
    (case,) = select_cases(["model"], cpu=True, model_options=dict(layers=1, seq=8, batch=2, checkpointing=True))
    ids = model.token_ids(case, torch.device("cpu"))
    calls = {"n": 0}
    for mod in (lora_ops.modules, lora_ops.grouped):
        real = mod.lora_linear

        def spy(*a, _real=real, **k):
            calls["n"] += 1
            return _real(*a, **k)
        monkeypatch.setattr(mod, "lora_linear", spy)

    def train(provider):
        m, _ = model.BUILDERS[provider](case, torch.device("cpu"))
        model.check_model(case, m, provider)
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if p.requires_grad and "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses, n0 = [], calls["n"]
        for _ in range(4):
            opt.zero_grad(set_to_none=True)
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        per_step = (calls["n"] - n0) / 4
        return losses, {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}, per_step, m

    want, want_params, want_calls, _ = train(twin)
    got, got_params, got_calls, m = train(grouped)
    assert got == pytest.approx(want, rel=1e-5, abs=0)
    assert want[-1] < want[0] - 1e-3  # the steps did train
    assert set(got_params) == set(want_params)
    for n in got_params:
        # AdamW divides by sqrt(v), so ulp-level differences of near-zero gradients grow to ~1e-5 here; the
        # adapters move by up to 4 x lr = 4e-2, and a wrong gradient would move an element by ~lr.
        assert torch.allclose(got_params[n], want_params[n], rtol=0, atol=5e-5), n
    # forward + the checkpointed recomputation: 7 calls per layer each ungrouped, 4 grouped
    assert (want_calls, got_calls) == (2 * 7 * case.layers, 2 * 4 * case.layers)
    assert model.check_groups(case, m, grouped, "after the steps") == {"grouped": 2 * case.layers}


def _grouped_only(**options):
    (case,) = select_cases(["model"], cpu=True, providers=[p for p, _ in GROUPED],
                           model_options=dict(layers=1, seq=4, steps=1, batch=1, checkpointing=False, **options))
    # Only the grouped providers: the floor and peft_bnb add nothing to what these tests check.
    return dataclasses.replace(case, plan=tuple((p, ("step",)) for p, _ in GROUPED))


def test_grouped_provider_whose_groups_do_not_form_is_skipped(monkeypatch):
    """A grouped provider whose groups did not form fails its build and is recorded as skipped, never timed
    ungrouped under its grouped name; its ungrouped twin does not care."""
    from lora_ops import inject

    case = _grouped_only()
    monkeypatch.setattr(inject, "_group_new", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="left the projections ungrouped after apply_lora: 0 of 2 groups"):
        model.build_fused_grouped(case, torch.device("cpu"))
    model.check_model(case, model.build_fused(case, torch.device("cpu"))[0], "fused")
    rows, _ = harness.run_cases([case], harness.Settings(**FAST), progress=False)
    by = _by(rows)
    for grouped, _ in GROUPED:
        assert by[(grouped, "skipped")]["status"] == "skipped", grouped
        assert "left the projections ungrouped" in by[(grouped, "skipped")]["note"]
        assert (grouped, "time_ms") not in by and (grouped, "tokens_per_s") not in by
    (line,) = report.model_grouping_lines(rows)
    assert line.startswith(f"Grouping ({case.name}): ") and "fused_qlora_grouped skipped (" in line


def test_grouped_provider_whose_groups_turn_off_during_the_steps_is_skipped(monkeypatch):
    """Groups that formed but turned themselves off in a step (a member called with another input) make the
    provider skipped too: its timed steps were not all grouped."""
    case = _grouped_only()
    real = dict(model.BUILDERS)

    def turning_off(name):
        def build(case, device, seed=0):
            m, info = real[name](case, device, seed)

            def off(*_):
                for g in lora_ops.grouped.projection_groups(m).values():
                    g.disabled_reason = "simulated: a member saw another input"
            m.register_forward_pre_hook(off)
            return m, info
        return build

    for grouped, _ in GROUPED:
        monkeypatch.setitem(model.BUILDERS, grouped, turning_off(grouped))
    rows, _ = harness.run_cases([case], harness.Settings(**FAST), progress=False)
    by = _by(rows)
    for grouped, _ in GROUPED:
        note = by[(grouped, "skipped")]["note"]
        assert "left the projections ungrouped during the steps: 0 of 2 groups" in note and "'off': 2" in note


def _model_case(checkpointing):
    (case,) = select_cases(["model"], cpu=True, model_options=dict(batch=2, checkpointing=checkpointing))
    return case


def _loss_and_grads(builder, case, ids):
    torch.manual_seed(5)
    m, info = builder(case, torch.device("cpu"))
    model.check_model(case, m, builder.__name__.replace("build_", ""))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # non-zero B, so every adapter gets a gradient and the LoRA term enters the loss
        for n, p in m.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    calls = []
    layer = m.model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda mod, inp, out: calls.append(1))
    embeds = []
    m.get_input_embeddings().register_forward_hook(lambda mod, inp, out: embeds.append(out))
    m.train()
    loss = m(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    return loss.detach(), grads, len(calls), embeds[0], info


@pytest.mark.parametrize("provider", ["fused", "fused_qlora", "floor"])
def test_lora_ops_model_with_checkpointing_matches_without(provider):
    """apply_lora keeps the transformers module structure, so gradient_checkpointing_enable works on a lora_ops
    model: the decoder layers recompute their forward in the backward (q_proj runs twice), and the loss and the
    adapters' gradients are those without checkpointing. The floor's backward reaches the embeddings' output."""
    builder = model.BUILDERS[provider]
    on, off = _model_case(True), _model_case(False)
    ids = model.token_ids(on, torch.device("cpu"))
    loss_on, g_on, calls_on, emb_on, info_on = _loss_and_grads(builder, on, ids)
    loss_off, g_off, calls_off, emb_off, info_off = _loss_and_grads(builder, off, ids)
    assert (calls_on, calls_off) == (2, 1)  # recomputed in the backward only with checkpointing
    assert info_on["gradient_checkpointing"] and info_off["gradient_checkpointing"] is False
    assert torch.equal(loss_on, loss_off)
    assert set(g_on) == set(g_off) and (len(g_on) == 2 * 7 * on.layers or provider == "floor")
    for n in g_on:
        assert torch.allclose(g_on[n], g_off[n], rtol=1e-6, atol=1e-9), n
        assert g_on[n].abs().max() > 0, n
    for emb in (emb_on, emb_off):  # every provider's backward runs down to the input embeddings' output
        assert emb.requires_grad and emb.grad is not None and emb.grad.abs().max() > 0


@pytest.mark.skipif(not lora_ops._backend.triton_interpreter(),
                    reason="runs lora_ops' Triton kernels on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, "
                           "set by tests/conftest.py without a GPU)")
def test_lora_ops_triton_kernels_with_checkpointing_match_without(monkeypatch):
    """The same on lora_ops' Triton path (the kernels the GPU runs; here in Triton's interpreter): with the
    reference implementations made to raise, the checkpointed QLoRA model recomputes its layers through the
    kernels and gets the loss and gradients it gets without checkpointing."""
    monkeypatch.setenv("LORA_OPS_BACKEND", "triton")
    on, off = _model_case(True), _model_case(False)
    ids = model.token_ids(on, torch.device("cpu"))
    with kernels_only(monkeypatch, ("lora_fwd", "lora_bwd_dx", "lora_bwd_da")):
        loss_on, g_on, calls_on, _, _ = _loss_and_grads(model.build_fused_qlora, on, ids)
        loss_off, g_off, calls_off, _, _ = _loss_and_grads(model.build_fused_qlora, off, ids)
    assert (calls_on, calls_off) == (2, 1)
    assert torch.equal(loss_on, loss_off) and set(g_on) == set(g_off) and len(g_on) == 2 * 7 * on.layers
    for n in g_on:
        assert torch.allclose(g_on[n], g_off[n], rtol=1e-6, atol=1e-9), n


def test_check_model_refuses_a_model_that_is_not_the_case():
    on, off = _model_case(True), _model_case(False)
    m, _ = model.build_fused(off, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="gradient checkpointing is off, the case .* has it on"):
        model.check_model(on, m, "fused")
    m.lm_head.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="trainable parameters, expected"):
        model.check_model(off, m, "fused")
    floor, _ = model.build_floor(off, torch.device("cpu"))
    floor.lm_head.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="floor: .* expected none"):
        model.check_model(off, floor, "floor")


def test_model_report_and_plot(cpu_run, tmp_path):
    cases, rows = cpu_run
    written = report.write_outputs(rows, tmp_path)
    assert _png(tmp_path / "model_throughput.png")
    md = (tmp_path / "results.md").read_text()
    assert "### tiny L2 1x16 ckpt (2 layers, 1x16 tokens per step, gradient checkpointing, float32" in md
    assert "### tiny L2 1x16 no-ckpt (2 layers, 1x16 tokens per step, no gradient checkpointing" in md
    assert "| provider | tokens/s p50 [p20, p80] | × peft_bnb | step ms p50 [p20, p80] | ÷ floor |" in md
    tail = md[md.index("## Summary"):]
    for name, _, _ in CPU_CASES:  # the tiny cases are not issue 20's runs: issue 11's target, the floor beside it
        line = next(l for l in tail.splitlines() if l.startswith(f"Target ({name}): "))
        assert "fused_qlora ≥ 1.30× peft_bnb tokens/s at no more peak memory" in line and "the floor's" in line
        assert "memory not measured (no CUDA statistics)" in line
        assert f"| {name} | floor |" in tail and f"| {name} | fused_qlora |" in tail
    for name, _, _ in CPU_CASES:  # one grouping line per case: both grouped providers against their twins
        line = next(l for l in tail.splitlines() if l.startswith(f"Grouping ({name}): "))
        assert "fused_qlora_grouped " in line and " fused_qlora's, interleaved steps " in line, line
        assert "; fused_grouped " in line and " fused's, interleaved steps " in line, line
        assert "peak memory" not in line  # not measured on the CPU
        assert f"| {name} | fused_qlora_grouped |" in tail and f"| {name} | fused_grouped |" in tail
    assert "| case | provider | ms p50 |" not in tail  # no layer table when only the model preset ran
    assert written["rows"] == len(rows)


# ------------------------------------------------------------------------------ targets from synthetic rows

def _rows(case, cfg, providers, skip=None, run_id="r1"):
    """Synthetic CUDA-like rows of one model case: providers = {name: (tokens/s, peak GiB)}; skip = {name: note}."""
    env = json.dumps(dict(gpu="NVIDIA H200", command="python -m benchmarks --preset model",
                          date_utc="2026-12-01T10:00:00+00:00", git_commit="abcdef1"))
    c = json.dumps(cfg)
    base = dict(run_id=run_id, preset="model", case=case, shape="s", mode="step", unit="", p20=math.nan,
                p80=math.nan, ratio_to_floor=math.nan, note="", config=c, env=env)
    rows = []
    for p, (tok, gib) in providers.items():
        for metric, v in (("tokens_per_s", tok), ("time_ms", cfg["batch"] * cfg["seq"] * 1e3 / tok),
                          ("peak_extra_mib", gib * 1024)):
            rows.append(dict(base, provider=p, metric=metric, value=v, p20=v, p80=v, status="ok"))
    for p, note in (skip or {}).items():
        rows.append(dict(base, provider=p, metric="skipped", value=math.nan, status="skipped", note=note))
    return report.add_ratios(rows, "floor")


def _cfg(batch, ckpt, layers=16, vocab=32000):
    return dict(layers=layers, seq=2048, batch=batch, checkpointing=ckpt, dtype="bfloat16", r=16, steps=10,
                warmup_steps=3, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=vocab)


# floor 1000 tokens/s 20 GiB and peft_bnb 400 tokens/s 10 GiB; lora_ops QLoRA (tokens/s, GiB) decides the verdict.
@pytest.mark.parametrize("batch, ckpt, mine, verdict", [
    (1, True, (800.0, 9.0), "**met**"),  # 2.00x peft_bnb, step 1.25x floor, memory 0.9x bnb, 0.45x floor
    (1, True, (760.0, 9.0), "**not met**"),  # 1.90x peft_bnb < 2.0
    (1, True, (800.0, 10.5), "**not met**"),  # more memory than peft_bnb
    (4, True, (960.0, 9.0), "**met**"),  # 2.40x peft_bnb, step 1.04x floor (<= 1.07)
    (4, True, (900.0, 9.0), "**not met**"),  # step 1.11x the floor's > 1.07 although 2.25x peft_bnb
    (1, False, (840.0, 9.0), "**met**"),  # 2.10x peft_bnb, step 1.19x floor (<= 1.2)
])
def test_issue_20_target_lines(batch, ckpt, mine, verdict, tmp_path):
    name = f"llama3-8b-shape L16 {batch}x2048 {'ckpt' if ckpt else 'no-ckpt'}"
    rows = _rows(name, _cfg(batch, ckpt), {"floor": (1000.0, 20.0), "peft_bnb": (400.0, 10.0), "fused_qlora": mine})
    (line,) = report.model_target_lines(rows)
    tok_target, step_target = report.MODEL_STEP_TARGETS[(batch, 2048, ckpt)]
    assert line.startswith(f"Target ({name}): fused_qlora ≥ {tok_target:.2f}× peft_bnb tokens/s and step ≤ "
                           f"{step_target:.2f}× the floor's, peak extra memory ≤ peft_bnb's")
    assert ("≤ 1.05× the floor's" in line) is ckpt  # the memory bound against the floor is for checkpointing runs
    assert f"{mine[0] / 400:.3f}× tokens/s, step {1000 / mine[0]:.3f}× the floor's" in line
    assert f"peak memory {mine[1] / 10:.3f}× peft_bnb's" in line
    assert line.endswith(verdict + ".")
    md = report.markdown(rows)
    assert line in md
    summary = md[md.index("## Summary"):]
    assert (f"| {name} | fused_qlora | {mine[0]:.4g} | {mine[0] / 400:.3f}× | {batch * 2048e3 / mine[0]:.4g} | "
            f"{1000 / mine[0]:.3f}× | {mine[1] * 1024:.4g} ({mine[1] / 10:.3f}×, {mine[1] / 20:.3f}×) |") in summary
    assert [p.name for p in report.plot_all(rows, tmp_path)] == ["model_throughput.png"]


def test_target_lines_memory_floor_bound_and_missing_references():
    name = "llama3-8b-shape L16 1x2048 ckpt"
    # Less memory than peft_bnb but more than 1.05x the floor's: not met (with checkpointing only).
    rows = _rows(name, _cfg(1, True), {"floor": (1000.0, 8.0), "peft_bnb": (400.0, 10.0), "fused_qlora": (800.0, 9.0)})
    (line,) = report.model_target_lines(rows)
    assert "peak memory 0.900× peft_bnb's, 1.125× the floor's: **not met**." in line
    # The floor skipped: the issue-20 target cannot be checked, and says why.
    rows = _rows(name, _cfg(1, True), {"peft_bnb": (400.0, 10.0), "fused_qlora": (800.0, 9.0)},
                 skip={"floor": "CUDA out of memory (simulated)"})
    (line,) = report.model_target_lines(rows)
    assert "cannot be checked: floor skipped (CUDA out of memory (simulated))." in line
    # No CUDA statistics (CPU-like rows): the speed part is judged, memory not measured.
    rows = _rows(name, _cfg(1, True), {"floor": (1000.0, 8.0), "peft_bnb": (400.0, 10.0), "fused_qlora": (800.0, 9.0)})
    for r in rows:
        if r["metric"] == "peak_extra_mib":
            r.update(value=math.nan, status="n/a")
    (line,) = report.model_target_lines(rows)
    assert line.endswith("**speed met, memory not measured (no CUDA statistics)**.")
    # Ratios are never taken across runs: a fused_qlora row from another run than the floor's has none.
    rows = _rows(name, _cfg(1, True), {"floor": (1000.0, 8.0), "peft_bnb": (400.0, 10.0)}) + _rows(
        name, _cfg(1, True), {"fused_qlora": (800.0, 9.0)}, run_id="r2")
    (line,) = report.model_target_lines(rows)
    assert "– tokens/s, step – the floor's" in line and "not checkable" in line


def test_grouping_lines_and_readme_columns():
    """One grouping line per case with grouped rows: step ÷ the ungrouped twin's and peak memory, same run; the
    issue-20 target line still judges fused_qlora against peft_bnb; the docs' model table gets the grouped
    columns beside their twins."""
    from benchmarks import readme

    name = "llama3-8b-shape L16 1x2048 ckpt"
    base = {"floor": (1000.0, 20.0), "peft_bnb": (400.0, 10.0), "fused_qlora": (800.0, 9.0), "fused": (900.0, 12.0)}
    plain = _rows(name, _cfg(1, True), base)
    assert report.model_grouping_lines(plain) == []  # nothing grouped ran: no line, the tables as before
    rows = _rows(name, _cfg(1, True), dict(base, fused_qlora_grouped=(1000.0, 9.0), fused_grouped=(800.0, 12.6)))
    (line,) = report.model_grouping_lines(rows)
    assert line == (f"Grouping ({name}): step with group_projections=True ÷ without, same run (< 1: grouping is "
                    "faster): fused_qlora_grouped 0.800× fused_qlora's, peak memory 1.000×; fused_grouped 1.125× "
                    "fused's, peak memory 1.050×.")
    assert report.model_target_lines(rows) == report.model_target_lines(plain)  # fused_qlora vs peft_bnb
    summary = report.markdown(rows)
    summary = summary[summary.index("## Summary"):]
    assert line in summary and f"| {name} | fused_qlora_grouped | 1000 | 2.500× |" in summary
    # A skipped grouped provider, a skipped twin, a twin from another run.
    rows = _rows(name, _cfg(1, True), {"floor": (1000.0, 20.0), "peft_bnb": (400.0, 10.0), "fused": (900.0, 12.0)},
                 skip={"fused_qlora": "CUDA out of memory (simulated)",
                       "fused_qlora_grouped": "fused_qlora_grouped: group_projections=True left the projections "
                                              "ungrouped after apply_lora"})
    rows += _rows(name, _cfg(1, True), {"fused_grouped": (800.0, 12.0)}, run_id="r2")
    (line,) = report.model_grouping_lines(rows)
    assert "fused_qlora_grouped skipped (fused_qlora_grouped: group_projections=True left" in line
    assert "fused_grouped not compared (fused not measured in the same run)." in line
    rows = _rows(name, _cfg(1, True), {"fused_grouped": (800.0, 12.0)}, skip={"fused": "OOM (simulated)"})
    assert report.model_grouping_lines(rows) == [f"Grouping ({name}): step with group_projections=True ÷ without, "
                                                 "same run (< 1: grouping is faster): fused_grouped not compared "
                                                 "(fused skipped)."]
    # The docs' model table: the grouped columns right after their twins, the grouping line among the notes.
    rows = _rows(name, _cfg(1, True), dict(base, fused_qlora_grouped=(1000.0, 9.0), fused_grouped=(800.0, 12.6)))
    text = "\n".join(readme.model_section(report._index(rows), rows, "results"))
    assert ("| layers, batch × seq | frozen-base floor | PEFT+bnb QLoRA | **lora_ops QLoRA** | **lora_ops QLoRA "
            "grouped** | **lora_ops LoRA** | **lora_ops LoRA grouped** |") in text
    assert "- Grouping (" in text and "group_projections=True" in text
    plain_text = "\n".join(readme.model_section(report._index(plain), plain, "results"))
    assert "grouped" not in plain_text


@pytest.mark.parametrize("cfg", [_cfg(1, True, layers=4), _cfg(1, True, vocab=128256), _cfg(2, True)],
                         ids=["4 layers", "vocab 128256", "batch 2"])
def test_other_cases_get_issue_11s_target(cfg):
    rows = _rows("m", cfg, {"floor": (1000.0, 20.0), "peft_bnb": (400.0, 10.0), "fused_qlora": (600.0, 9.0)})
    (line,) = report.model_target_lines(rows)
    assert line == ("Target (m): fused_qlora ≥ 1.30× peft_bnb tokens/s at no more peak memory: 1.500× tokens/s, "
                    "0.900× peak memory; step 1.667× the floor's: **met**.")


def test_rows_with_ratios_to_peft_bnb_read_the_same():
    """Rows written when ratio_to_floor of model rows was taken against peft_bnb (no floor provider, no
    checkpointing field) give the same tables: the report takes both ratios from the values."""
    cfg = dict(layers=4, seq=2048, batch=4, dtype="bfloat16", r=16, steps=10, warmup_steps=3)
    rows = _rows("m", cfg, {"peft_bnb": (1e4, 20.0), "fused_qlora": (1.35e4, 18.0)})
    report.add_ratios(rows, "peft_bnb")  # what those runs stored
    (line,) = report.model_target_lines(rows)
    assert line == ("Target (m): fused_qlora ≥ 1.30× peft_bnb tokens/s at no more peak memory: 1.350× tokens/s, "
                    "0.900× peak memory: **met**.")
    (line,) = report.model_target_lines(_rows("m", cfg, {"fused_qlora": (1.35e4, 18.0)},
                                              skip={"peft_bnb": "bitsandbytes 0.50.2 has no CUDA backend here"}))
    assert "cannot be checked: peft_bnb skipped (bitsandbytes 0.50.2 has no CUDA backend" in line


# ------------------------------------------------------------------------------------ running and the CLI

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given on a machine without CUDA")
def test_bnb_without_its_cuda_library_gives_the_reason():
    reason = model.bnb_unavailable(torch.device("cuda"))
    assert reason and "has no CUDA library loaded here" in reason and "carry the wheel" in reason


def test_failing_provider_and_missing_bnb_are_skipped(monkeypatch):
    (case,) = select_cases(["model"], cpu=True, providers=["fused", "peft"],
                           model_options=dict(layers=1, seq=4, steps=1, batch=1, checkpointing=False))
    assert case.providers() == ["floor", "peft_bnb", "peft", "fused"] and case.layers == 1
    assert case.name == "tiny L1 1x4 no-ckpt"

    def oom(case, device, seed=0):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setitem(model.BUILDERS, "peft", oom)
    monkeypatch.setattr(model, "bnb_unavailable", lambda device: "bitsandbytes 0.50.2 has no CUDA backend here (test)")
    rows, _ = harness.run_cases([case], harness.Settings(**FAST), progress=False)
    by = _by(rows)
    assert "has no CUDA backend" in by[("peft_bnb", "skipped")]["note"]
    assert "OutOfMemoryError" in by[("peft", "skipped")]["note"]
    assert by[("fused", "tokens_per_s")]["value"] > 0 and by[("fused", "tokens_per_s")]["ratio_to_floor"] > 0
    monkeypatch.setitem(model.BUILDERS, "floor", oom)
    rows, _ = harness.run_cases([case], harness.Settings(**FAST), progress=False)
    by = _by(rows)
    assert "OutOfMemoryError" in by[("floor", "skipped")]["note"]
    assert math.isnan(by[("fused", "tokens_per_s")]["ratio_to_floor"])  # no floor in this run: no ratio
    rows, _ = harness.run_cases([case], harness.Settings(**FAST), progress=False, budget_s=0.0)
    assert all(r["status"] == "skipped" and "budget" in r["note"] for r in rows if r["case"] == case.name)


def test_cli_quick_mode_end_to_end(tmp_path, capsys):
    args = ["--cpu", "--preset", "model", "--seq", "8", "--steps", "2", "--warmup-steps", "1", "--out",
            str(tmp_path), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = report.read_csv(tmp_path / "cpu" / "results.csv")
    names = ["tiny L2 1x8 ckpt", "tiny L2 2x8 ckpt", "tiny L2 1x8 no-ckpt"]
    assert list(dict.fromkeys(r["case"] for r in rows if r["case"] != "ceilings")) == names
    for name in names:
        assert f"### {name} (" in out and f"Target ({name}): fused_qlora" in out
        provs = {r["provider"] for r in rows if r["case"] == name and r["metric"] in ("tokens_per_s", "skipped")}
        assert provs == set(presets.MODEL_PROVIDERS)
        floor = next(r for r in rows if r["case"] == name and r["provider"] == "floor" and r["metric"] == "time_ms")
        assert floor["status"] == "ok" and floor["ratio_to_floor"] == 1.0
    assert "| tiny L2 1x8 ckpt | floor |" in out and "÷ floor" in out
    assert _png(tmp_path / "cpu" / "model_throughput.png")


def test_cli_options_pick_the_cases_and_depths_merge(tmp_path, capsys):
    args = ["--cpu", "--preset", "model", "--providers", "lora_ops_qlora", "--seq", "8", "--batch", "2",
            "--checkpointing", "off", "--steps", "2", "--warmup-steps", "1", "--out", str(tmp_path), "--quiet"]
    assert main(args + ["--layers", "1"]) == 0
    assert main(args + ["--layers", "2", "--vocab", "96"]) == 0
    out = capsys.readouterr().out
    assert "Target (tiny L2 2x8 no-ckpt vocab96): fused_qlora" in out
    rows = report.read_csv(tmp_path / "cpu" / "results.csv")
    got = {(r["case"], json.loads(r["config"])["layers"], json.loads(r["config"])["vocab"]) for r in rows
           if r["preset"] == "model" and r["case"] != "ceilings"}
    assert got == {("tiny L1 2x8 no-ckpt", 1, 128), ("tiny L2 2x8 no-ckpt vocab96", 2, 96)}  # kept side by side
    provs = {r["provider"] for r in rows if r["metric"] in ("tokens_per_s", "skipped")}
    assert provs == {"floor", "peft_bnb", "fused_qlora"}  # the alias, and both references every ratio needs


@pytest.mark.parametrize("options, want", [
    ([], ["tiny L2 1x16 ckpt", "tiny L2 2x16 ckpt", "tiny L2 1x16 no-ckpt"]),
    (["--checkpointing", "on"], ["tiny L2 1x16 ckpt", "tiny L2 2x16 ckpt"]),
    (["--checkpointing", "off"], ["tiny L2 1x16 no-ckpt"]),
    (["--batch", "3"], ["tiny L2 3x16 ckpt", "tiny L2 3x16 no-ckpt"]),
    (["--batch", "3", "--checkpointing", "on", "--layers", "5", "--seq", "32"], ["tiny L5 3x32 ckpt"]),
    (["--vocab", "128"], ["tiny L2 1x16 ckpt", "tiny L2 2x16 ckpt", "tiny L2 1x16 no-ckpt"]),  # the default
    (["--vocab", "256", "--checkpointing", "off"], ["tiny L2 1x16 no-ckpt vocab256"]),
])
def test_model_options_list_the_cases(options, want, capsys):
    assert main(["--cpu", "--preset", "model", "--list"] + options) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("model ") and " floor: step; peft_bnb: step;" in line for line in lines)
    listed = [line[len("model"):line.index(" floor: step")].strip() for line in lines]
    assert listed == want


def test_gpu_preset_cases():
    cases = presets.PRESETS["model"].cases(False)
    assert [c.name for c in cases] == ["llama3-8b-shape L16 1x2048 ckpt", "llama3-8b-shape L16 4x2048 ckpt",
                                       "llama3-8b-shape L16 1x2048 no-ckpt"]
    for c in cases:
        assert (c.arch, c.layers, c.seq, c.dtype, c.r, c.lora_alpha) == ("llama3-8b", 16, 2048, "bfloat16", 16, 32)
        assert (c.warmup_steps, c.steps) == (3, 10)  # all three cases fit in one ten-minute run
        assert c.providers() == PROVIDERS
        cfg = model.llama_config(c)
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.vocab_size, cfg.num_hidden_layers, cfg.tie_word_embeddings) == (4096, 14336, 32, 8, 32000, 16,
                                                                                     False)
        assert cfg.rms_norm_eps == 1e-5 and cfg.hidden_act == "silu"
        assert report.model_step_target(c.config()) == report.MODEL_STEP_TARGETS[(c.batch, 2048, c.checkpointing)]
    (big,) = presets.PRESETS["model"].cases(False, vocab=128256, checkpointing=False, batch=4, layers=32)
    assert big.name == "llama3-8b-shape L32 4x2048 no-ckpt vocab128256" and model.llama_config(big).vocab_size == 128256
    assert report.model_step_target(big.config()) is None
    gpu = cases[0]
    assert gpu.filtered(["fused_qlora"]).providers() == ["floor", "peft_bnb", "fused_qlora"]
    assert gpu.filtered(["peft_bnb"]).providers() == ["floor", "peft_bnb"]
    assert gpu.filtered(["fused_grouped", "fused"]).providers() == ["floor", "peft_bnb", "fused", "fused_grouped"]
    assert gpu.filtered(["unfused"]) is None and gpu.filtered(None, ["full"]) is None
    # r=16 on the seven projections of all 32 layers of Llama-3-8B: PEFT's well-known 41,943,040.
    assert model.expected_lora_params(presets.model_case("m", "llama3-8b", "bfloat16", 32, 2048, 4, 10, 3)) \
        == 41_943_040


def test_preset_help_states_the_h200_estimate_as_a_guess(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "[a guess, not measured: about" in text and "--budget-s 420" in text
    for option in ("--vocab", "--checkpointing on|off", "--layers"):
        assert option in text


@pytest.mark.parametrize("argv, message", [
    (["--preset", "model", "--layers", "0"], "argument --layers: '0' must be a finite number >= 1"),
    (["--preset", "model", "--seq", "1"], "argument --seq: '1' must be a finite number >= 2"),
    (["--preset", "model", "--batch", "two"], "argument --batch: 'two' is not an integer"),
    (["--preset", "model", "--steps", "1.5"], "argument --steps: '1.5' is not an integer"),
    (["--preset", "model", "--vocab", "1"], "argument --vocab: '1' must be a finite number >= 2"),
    (["--preset", "model", "--checkpointing", "maybe"], "argument --checkpointing: 'maybe' is not on or off"),
    (["--preset", "model", "--providers", "lora_ops,nope"], "unknown provider ['nope']"),
])
def test_bad_arguments_fail_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--cpu", "--list"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_model_options_need_the_model_preset(capsys):
    assert main(["--cpu", "--preset", "layer", "--layers", "2", "--list"]) == 2
    assert "--layers only apply to the model preset; add --preset model" in capsys.readouterr().err
    assert main(["--cpu", "--preset", "layer", "--checkpointing", "off", "--list"]) == 2
    assert "--checkpointing only apply to the model preset" in capsys.readouterr().err
    assert main(["--cpu", "--preset", "model", "--providers", "unfused", "--list"]) == 2  # not a model provider
    assert main(["--cpu", "--preset", "model", "layer", "--providers", "full", "--layers", "3", "--list"]) == 0
    listed = capsys.readouterr().out
    assert "tiny L3 2x16 ckpt" in listed and "floor: step; peft_bnb: step; full_ft: step" in listed
    assert "full_ft: full" in listed


def test_model_case_validation():
    plan = (("peft_bnb", ("step",)),)
    for bad in (dict(layers=0), dict(seq=1), dict(batch=0), dict(steps=0), dict(warmup_steps=0), dict(arch="gpt"),
                dict(vocab=1), dict(checkpointing="yes"), dict(dtype="int8")):
        kw = dict(preset="model", name="x", arch="tiny", layers=1, seq=4, batch=1, plan=plan)
        kw.update(bad)
        with pytest.raises(ValueError, match=next(iter(bad))):
            ModelCase(**kw)
    with pytest.raises(ValueError, match="does not run the model preset"):
        ModelCase("model", "x", "tiny", 1, 4, 1, plan=(("unfused", ("step",)),))
    with pytest.raises(ValueError, match="mode 'step' only"):
        ModelCase("model", "x", "tiny", 1, 4, 1, plan=(("fused", ("full",)),))
    with pytest.raises(ValueError, match="reference provider 'copy'"):
        ModelCase("model", "x", "tiny", 1, 4, 1, floor="copy", plan=plan)
    with pytest.raises(ValueError, match="takes no option"):
        presets.PRESETS["layer"].cases(False, layers=2)
    assert ModelCase("model", "x", "tiny", 1, 4, 1, vocab=0, plan=plan).dims["vocab"] == 128  # 0: the arch's own
    assert presets.model_runs(False) == [(1, True), (4, True), (1, False)]
    assert presets.model_runs(False, batch=4) == [(4, True), (4, False)]
    assert presets.model_runs(True, checkpointing=False) == [(1, False)]
