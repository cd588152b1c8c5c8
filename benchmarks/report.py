"""Results: ratios to the floor, the long-format CSV (and merging it), the markdown tables, the PNG plots.

One row per (run, preset, case, provider, mode, metric). ``value`` is the median (p50) where a distribution
exists, with ``p20``/``p80`` beside it; ``ratio_to_floor`` = value / the floor's value of the same run, case,
mode and metric (time, eager time, peak memory). ``status`` is ok, skipped (``note`` gives the reason) or n/a
(the metric does not exist here, e.g. device memory on the CPU).

Model preset: the floor is the frozen-base training step (provider ``floor``); the tables and target lines also
show tokens/s and peak memory × peft_bnb. Both ratios are taken from the values of rows of the same run
(``model_ratio``), so rows recorded when ``ratio_to_floor`` of model rows was to peft_bnb read the same way.
"""
from __future__ import annotations

import csv
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .presets import MODEL_FLOOR, MODEL_PROVIDERS, MODEL_REFERENCE  # the model preset's providers and references

COLUMNS = ("run_id", "preset", "case", "shape", "provider", "mode", "metric", "value", "p20", "p80", "unit",
           "ratio_to_floor", "status", "note", "config", "env")
NUMERIC = ("value", "p20", "p80", "ratio_to_floor")
RATIO_METRICS = ("time_ms", "eager_ms", "graph_ms", "peak_extra_mib", "tokens_per_s", "host_us")
# The block preset's interleaved pairs (benchmarks/block.py measure_pairs), in the order the case tables list them.
PAIR_METRICS = ("paired_ratio", "grouping_ratio", "paired_graph_ratio", "grouping_graph_ratio")
MERGE_KEY = ("preset", "case", "provider", "mode")
HIDDEN_IN_SUMMARY = ("floor_repeat",)
FLOORS = ("floor", "copy")
PLOT_ORDER = ("floor_grouped", "full_ft", "unfused", "peft", "peft_bnb", "bnb", "fused", "fused_grouped",
              "fused_qlora", "fused_qlora_grouped")
# lora_ops' providers (the layer presets' fused, the block and model presets' QLoRA and grouped ones).
LORA_OPS_PROVIDERS = ("fused", "fused_grouped", "fused_qlora", "fused_qlora_grouped")
MODEL_PRESET = "model"
# The general model target: lora_ops QLoRA >= 1.3x peft_bnb tokens/s at no more peak memory.
MODEL_TARGET = ("fused_qlora", 1.3)
# The targets of the runs users make: lora_ops QLoRA's step at 16 Llama-8B-shaped layers with a 32000-token
# vocabulary, by (batch, seq, gradient checkpointing): (min tokens/s x peft_bnb, max step time / the floor's).
# Peak extra memory at most peft_bnb's, and with checkpointing at most MODEL_CKPT_MEMORY x the floor's. Other
# model cases are checked against MODEL_TARGET.
MODEL_TARGET_SHAPE = dict(layers=16, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000)
MODEL_STEP_TARGETS = {(1, 2048, True): (2.0, 1.35), (4, 2048, True): (1.6, 1.07), (1, 2048, False): (1.5, 1.2)}
MODEL_CKPT_MEMORY = 1.05
# The model preset's grouped providers (group_projections=True) and their ungrouped twins: issue 21 asks for the
# step with grouping vs without, as the ratio of the two of one run.
MODEL_GROUPED = (("fused_qlora_grouped", "fused_qlora"), ("fused_grouped", "fused"))


def ratio(value: float, floor: Optional[float]) -> float:
    """value / floor; NaN when either is missing, NaN, or the floor is not positive."""
    if floor is None or value is None:
        return math.nan
    value, floor = float(value), float(floor)
    if math.isnan(value) or math.isnan(floor) or floor <= 0.0:
        return math.nan
    return value / floor


def add_ratios(rows: List[Dict], floor_provider: str = "floor") -> List[Dict]:
    """Fill ``ratio_to_floor`` of the ratio metrics from the floor row of the same run/preset/case/mode/metric.

    Rows whose floor did not run (or was skipped) get NaN: a ratio is never taken against another run's floor.
    """
    key = lambda r: (r["run_id"], r["preset"], r["case"], r["mode"], r["metric"])  # noqa: E731
    floors = {key(r): r["value"] for r in rows if r["provider"] == floor_provider and r["status"] == "ok"}
    for r in rows:
        if r["metric"] in RATIO_METRICS and r["status"] == "ok":
            r["ratio_to_floor"] = ratio(r["value"], floors.get(key(r)))
    return rows


# ------------------------------------------------------------------------------------------------ CSV

def _num(s: str) -> float:
    try:
        return float(s) if s not in ("", None) else math.nan
    except ValueError:
        return math.nan


def read_csv(path: Path) -> List[Dict]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path} is not a benchmarks CSV (missing columns {missing}); move it away or pick "
                             "another --out")
        rows = []
        for r in reader:
            row = {c: r[c] for c in COLUMNS}
            for c in NUMERIC:
                row[c] = _num(row[c])
            rows.append(row)
    return rows


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return "" if v is None else str(v)


def write_csv(path: Path, rows: Iterable[Dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in COLUMNS])
    tmp.replace(path)


def merge_rows(old: Sequence[Dict], new: Sequence[Dict]) -> List[Dict]:
    """Rows of ``old`` whose (preset, case, provider, mode) the new run measured are replaced by the new rows;
    all other old rows are kept, in their order, ahead of the new ones."""
    new_keys = {tuple(r[k] for k in MERGE_KEY) for r in new}
    return [r for r in old if tuple(r[k] for k in MERGE_KEY) not in new_keys] + list(new)


# -------------------------------------------------------------------------------------------- markdown

def _f(v: float, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}g}"


def _x(v: float) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.3f}×"


def _index(rows: Sequence[Dict]):
    """preset -> case -> provider -> mode -> metric -> row, in order of first appearance."""
    idx: "OrderedDict" = OrderedDict()
    for r in rows:
        (idx.setdefault(r["preset"], OrderedDict()).setdefault(r["case"], OrderedDict())
         .setdefault(r["provider"], OrderedDict()).setdefault(r["mode"], {}))[r["metric"]] = r
    return idx


def _cfg(r: Dict) -> Dict:
    try:
        return json.loads(r["config"]) if r.get("config") else {}
    except json.JSONDecodeError:
        return {}


def _env(r: Dict) -> Dict:
    try:
        return json.loads(r["env"]) if r.get("env") else {}
    except json.JSONDecodeError:
        return {}


def primary_mode(providers: Dict) -> str:
    floor_modes = next((providers[p] for p in FLOORS if p in providers), {})
    for m in ("full", "decode", "dequant"):
        if m in floor_modes:
            return m
    for p in providers.values():
        for m in p:
            return m
    return "full"


def _floor_of(providers: Dict) -> str:
    """A case's floor provider: the one its rows' config names (a block preset's per-group cases take
    floor_grouped), else the first of FLOORS present."""
    for modes in providers.values():
        for metrics in modes.values():
            for row in metrics.values():
                named = _cfg(row).get("floor")
                if named in providers:
                    return named
    return next((p for p in FLOORS if p in providers), "floor")


def markdown(rows: Sequence[Dict], title: str = "Benchmark results") -> str:
    """Per preset: the runs' environment, ceilings, one table per case; then a ``## Summary`` to paste."""
    lines = [f"# {title}", ""]
    runs = OrderedDict()
    for r in rows:
        runs.setdefault(r["run_id"], r)
    lines.append("Runs (environment of each):")
    lines.append("")
    for run_id, r in runs.items():
        e = _env(r)
        lines.append(f"- `{run_id}`: {e.get('gpu', '?')}; torch {e.get('torch', '?')} (CUDA {e.get('cuda')}), "
                     f"triton {e.get('triton', '?')}, peft {e.get('peft', '?')}, bitsandbytes "
                     f"{e.get('bitsandbytes', '?')}, lora_ops {e.get('lora_ops', '?')}; {e.get('date_utc', '?')}; "
                     f"commit {e.get('git_commit', '?')}; `{e.get('command', '?')}`; CUDA graphs: "
                     f"{'yes' if e.get('cuda_graphs') else 'only in graph_ms and paired_graph rows'}"
                     + (f"; launcher settings {', '.join(f'{k}={v}' for k, v in e['settings'].items())} (not the "
                        "defaults)" if e.get("settings") else ""))
    lines.append("")
    idx = _index(rows)
    for preset, cases in idx.items():
        lines.append(f"## Preset `{preset}`")
        lines.append("")
        if "ceilings" in cases:
            c = cases.pop("ceilings")["ceiling"]["-"]
            g, cp = c.get("gemm_tflops"), c.get("copy_gbps")
            if g and cp:
                lines.append(f"Ceilings measured at the start of run `{g['run_id']}`: {g['shape']} GEMM "
                             f"{_f(g['value'])} TFLOP/s; copy {_f(cp['value'])} GB/s (read + write).")
                lines.append("")
        if preset == MODEL_PRESET:
            for case, providers in cases.items():
                lines += _model_table(case, providers)
            continue
        impls = OrderedDict()
        for case, providers in cases.items():
            for p in LORA_OPS_PROVIDERS + ("unfused",):
                for mode, metrics in providers.get(p, {}).items():
                    cfg = _cfg(next(iter(metrics.values())))
                    info = cfg.get("provider_info") or {}
                    desc = ", ".join(f"{k} → {v}" for k, v in sorted(info.items()) if k != "backend")
                    if desc:
                        what = ("block" if cfg.get("kind") == "block"  # its providers' weights differ
                                else f"{cfg.get('weight', '?')} {cfg.get('kind', '')}")
                        impls.setdefault(f"{p} ({what}) ran: {desc}", None)
        for line in impls:
            lines.append(f"- {line}")
        if impls:
            lines.append("")
        for case, providers in cases.items():
            lines += _case_table(case, providers)
    lines += summary(rows)
    return "\n".join(lines) + "\n"


def provider_label(provider: str, row: Dict) -> str:
    """``provider`` as a table shows it: lora_ops' providers are marked "(reference path)" where their run
    dispatched to the PyTorch reference (the CPU quick mode), so a CPU row is not read as a kernel timing."""
    if provider in LORA_OPS_PROVIDERS:
        info = _cfg(row).get("provider_info") or {}
        if info.get("lora_fwd") == "reference":
            return f"{provider} (reference path)"
    return provider


def _case_table(case: str, providers: Dict) -> List[str]:
    floor = _floor_of(providers)
    floor_run = None
    for metrics in providers.get(floor, {}).values():
        floor_run = next(iter(metrics.values()))["run_id"]
        break
    first = next(iter(next(iter(providers.values())).values()))
    cfg = _cfg(next(iter(first.values())))
    head = f"### {case}"
    extra = []
    if cfg.get("n_sets", 1) > 1:
        extra.append(f"{cfg['n_sets']} weight sets rotated")
    if extra:
        head += f" ({'; '.join(extra)})"
    out = [head, "",
           "| provider | mode | ms p50 [p20, p80] | × floor | eager ms (× floor) | TFLOP/s (% ceil) | GB/s (% ceil) "
           "| peak extra MiB (× floor) | workspace MiB | kernels | ops |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    skipped, other_run = [], False
    for provider, modes in providers.items():
        for mode, m in modes.items():
            pairs = [m[k] for k in PAIR_METRICS if k in m]
            if "skipped" in m:
                skipped.append(f"{provider} {mode}: {m['skipped']['note']}")
                if not pairs:  # a pair mode keeps the pairs that were timed beside the one that was not
                    continue
            t = m.get("time_ms")
            h = m.get("host_us")
            if t is None and pairs:
                for pr in pairs:  # block.measure_pairs: against the floor, then against the ungrouped twin
                    how = "CUDA-graph replays interleaved" if mode == "paired_graph" else "interleaved"
                    ref = _cfg(pr).get("against") or _cfg(pr).get("floor", floor)
                    out.append(f"| {provider} | {mode} | | {_x(pr['value'])} [{_x(pr['p20'])}, {_x(pr['p80'])}] "
                               f"{how} with {ref} | | | | | | | |")
                continue
            if t is None and h is not None:
                out.append(f"| {provider} | host | host {_f(h['value'])} us per call [{_f(h['p20'])}, {_f(h['p80'])}] "
                           f"| {_x(h['ratio_to_floor'])} | | | | | | | |")
                continue
            if t is None:
                continue
            mark = ""
            if floor_run is not None and t["run_id"] != floor_run:
                mark, other_run = " †", True
            get = lambda k: m[k]["value"] if k in m else math.nan  # noqa: E731
            rat = lambda k: m[k]["ratio_to_floor"] if k in m else math.nan  # noqa: E731
            out.append(
                f"| {provider_label(provider, t)}{mark} | {mode} | {_f(t['value'])} [{_f(t['p20'])}, {_f(t['p80'])}] | "
                f"{_x(t['ratio_to_floor'])} | {_f(get('eager_ms'))} ({_x(rat('eager_ms'))}) | "
                f"{_f(get('tflops'))} ({_f(get('tflops_pct_ceiling'), 3)}%) | {_f(get('gbps'))} "
                f"({_f(get('gbps_pct_ceiling'), 3)}%) | {_f(get('peak_extra_mib'))} ({_x(rat('peak_extra_mib'))}) | "
                f"{_f(get('workspace_mib'))} | {_f(get('kernel_launches'))} | {_f(get('op_calls'))} |")
    out.append("")
    if other_run:
        out += ["† timed in another run than this table's floor; its ratios are to the floor of its own run.", ""]
    for s in skipped:
        out.append(f"- skipped: {s}")
    if skipped:
        out.append("")
    return out


def _step(providers: Dict, provider: str) -> Dict:
    return providers.get(provider, {}).get("step", {})


def model_ratio(providers: Dict, provider: str, metric: str, ref: str) -> float:
    """A model case's ``metric`` of ``provider`` / that of ``ref``, both measured (status ok) in the same run;
    NaN otherwise. ``providers`` is one case of ``_index``: provider -> mode -> metric -> row. The report takes
    both ratios of model rows (to the floor and to peft_bnb) from the values, so rows recorded when
    ``ratio_to_floor`` was taken against peft_bnb read the same way."""
    a, b = _step(providers, provider).get(metric), _step(providers, ref).get(metric)
    if a is None or b is None or a["status"] != "ok" or b["status"] != "ok" or a["run_id"] != b["run_id"]:
        return math.nan
    return ratio(a["value"], b["value"])


def model_checkpointing(cfg: Dict) -> Optional[bool]:
    """Whether a model row's run had gradient checkpointing; None for rows that do not say."""
    if "checkpointing" in cfg:
        return bool(cfg["checkpointing"])
    return None


def _model_table(case: str, providers: Dict) -> List[str]:
    """One model case: every provider's training step; tokens/s and peak memory × peft_bnb, step time and peak
    memory ÷ the floor (the frozen-base step), both of the same run."""
    first = next(iter(next(iter(providers.values())).values()))
    cfg = _cfg(next(iter(first.values())))
    head = f"### {case}"
    if cfg:
        ckpt = model_checkpointing(cfg)
        ck = "" if ckpt is None else ("gradient checkpointing, " if ckpt else "no gradient checkpointing, ")
        head += (f" ({cfg.get('layers', '?')} layers, {cfg.get('batch', '?')}x{cfg.get('seq', '?')} tokens per step, "
                 f"{ck}{cfg.get('dtype', '?')}, r={cfg.get('r', '?')}; {cfg.get('steps', '?')} timed steps after "
                 f"{cfg.get('warmup_steps', '?')} warm-up)")
    ref, fl = MODEL_REFERENCE, MODEL_FLOOR
    out = [head, "",
           f"| provider | tokens/s p50 [p20, p80] | × {ref} | step ms p50 [p20, p80] | ÷ {fl} | peak extra MiB "
           f"| × {ref} | × {fl} | model MiB | trainable params | loss first → last |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    skipped = []
    for provider, modes in providers.items():
        m = modes.get("step", {})
        if "skipped" in m:
            skipped.append(f"{provider}: {m['skipped']['note']}")
            continue
        tk, t = m.get("tokens_per_s"), m.get("time_ms")
        if tk is None or t is None:
            continue
        get = lambda k: m[k]["value"] if k in m else math.nan  # noqa: E731
        rat = lambda k, r: model_ratio(providers, provider, k, r)  # noqa: E731
        out.append(f"| {provider} | {_f(tk['value'])} [{_f(tk['p20'])}, {_f(tk['p80'])}] "
                   f"| {_x(rat('tokens_per_s', ref))} | {_f(t['value'])} [{_f(t['p20'])}, {_f(t['p80'])}] "
                   f"| {_x(rat('time_ms', fl))} | {_f(get('peak_extra_mib'))} | {_x(rat('peak_extra_mib', ref))} "
                   f"| {_x(rat('peak_extra_mib', fl))} | {_f(get('model_mib'))} | {_f(get('trainable_params'), 6)} "
                   f"| {_f(get('loss_first'))} → {_f(get('loss_last'))} |")
    out.append("")
    for s in skipped:
        out.append(f"- skipped: {s}")
    if skipped:
        out.append("")
    return out


def model_step_target(cfg: Dict) -> Optional[Tuple[float, float]]:
    """The (min tokens/s × peft_bnb, max step ÷ floor) of MODEL_STEP_TARGETS for a model case's config, None when
    the case is not one of those runs (then MODEL_TARGET applies)."""
    if any(cfg.get(k) != v for k, v in MODEL_TARGET_SHAPE.items()):
        return None
    return MODEL_STEP_TARGETS.get((cfg.get("batch"), cfg.get("seq"), model_checkpointing(cfg)))


def _judge(checks: Sequence[Tuple[float, bool]]) -> str:
    """'met', 'not met' (some measured check fails) or 'unknown' (none fails, some not measured);
    checks are (value, value passes)."""
    if any(not math.isnan(v) and not ok for v, ok in checks):
        return "not met"
    return "unknown" if any(math.isnan(v) for v, _ in checks) else "met"


def model_target_lines(rows: Sequence[Dict]) -> List[str]:
    """Per model case, whether fused_qlora reached its target: MODEL_STEP_TARGETS for the 16-layer runs they name
    (tokens/s × peft_bnb, step ÷ the floor's, peak memory), MODEL_TARGET for the others; all ratios within one
    run."""
    who, factor = MODEL_TARGET
    ref, fl = MODEL_REFERENCE, MODEL_FLOOR
    out = []
    cases = _index(rows).get(MODEL_PRESET, {})
    for case, providers in cases.items():
        if case == "ceilings":
            continue
        mine, refm, floor = _step(providers, who), _step(providers, ref), _step(providers, fl)
        cfg = _cfg(next(iter(mine.values()))) if mine else {}
        target = model_step_target(cfg)
        if target is None:
            head = f"Target ({case}): {who} ≥ {factor:.2f}× {ref} tokens/s at no more peak memory: "
            needed = ((who, mine), (ref, refm))
        else:
            ckpt = model_checkpointing(cfg)
            head = (f"Target ({case}): {who} ≥ {target[0]:.2f}× {ref} tokens/s and step ≤ {target[1]:.2f}× the "
                    f"{fl}'s, peak extra memory ≤ {ref}'s" + (f" and ≤ {MODEL_CKPT_MEMORY:.2f}× the {fl}'s"
                                                              if ckpt else "") + ": ")
            needed = ((who, mine), (ref, refm), (fl, floor))
        if any("tokens_per_s" not in m for _, m in needed):
            why = [f"{p} skipped ({m['skipped']['note'][:120]})" for p, m in needed if "skipped" in m]
            out.append(head + "cannot be checked: " + ("; ".join(why) or "not measured") + ".")
            continue
        tr = model_ratio(providers, who, "tokens_per_s", ref)
        mr = model_ratio(providers, who, "peak_extra_mib", ref)
        ft = model_ratio(providers, who, "time_ms", fl)
        if target is None:
            speed_ok = not math.isnan(tr) and tr >= factor
            if math.isnan(mr):
                verdict = ("speed met" if speed_ok else "speed not met") + ", memory not measured (no CUDA statistics)"
            else:
                verdict = "met" if speed_ok and mr <= 1.0 else "not met"
            floor_part = "" if math.isnan(ft) else f"; step {_x(ft)} the {fl}'s"
            out.append(head + f"{_x(tr)} tokens/s, {_x(mr)} peak memory{floor_part}: **{verdict}**.")
            continue
        mf = model_ratio(providers, who, "peak_extra_mib", fl)
        speed = _judge([(tr, tr >= target[0]), (ft, ft <= target[1])])
        mem_checks = [(mr, mr <= 1.0)] + ([(mf, mf <= MODEL_CKPT_MEMORY)] if ckpt else [])
        memory = _judge(mem_checks)
        if speed == memory == "met":
            verdict = "met"
        elif "unknown" not in (speed, memory):
            verdict = "not met"
        else:
            no_stats = mine.get("peak_extra_mib", {}).get("status") == "n/a"
            unknown = {"speed": "not checkable (a reference step was not measured)",
                       "memory": "not measured (no CUDA statistics)" if no_stats
                       else "not checkable (a reference's memory was not measured)"}
            verdict = ", ".join(f"{k} {unknown[k] if v == 'unknown' else v}"
                                for k, v in (("speed", speed), ("memory", memory)))
        mem = f"peak memory {_x(mr)} {ref}'s" + (f", {_x(mf)} the {fl}'s" if ckpt else "")
        out.append(head + f"{_x(tr)} tokens/s, step {_x(ft)} the {fl}'s, {mem}: **{verdict}**.")
    return out


def model_grouping_lines(rows: Sequence[Dict]) -> List[str]:
    """Per model case that has rows of a grouped provider: its step time ÷ its ungrouped twin's (and peak memory
    where measured), both of the same run; or why there is no ratio. Cases without grouped rows get no line."""
    out = []
    for case, providers in _index(rows).get(MODEL_PRESET, {}).items():
        if case == "ceilings":
            continue
        parts = []
        for grouped, twin in MODEL_GROUPED:
            g, t = _step(providers, grouped), _step(providers, twin)
            if not g:
                continue
            if "skipped" in g:
                parts.append(f"{grouped} skipped ({g['skipped']['note'][:120]})")
                continue
            if "skipped" in t or "time_ms" not in t:
                why = f"{twin} skipped" if "skipped" in t else f"{twin} not measured"
                parts.append(f"{grouped} not compared ({why})")
                continue
            rt = model_ratio(providers, grouped, "time_ms", twin)
            if math.isnan(rt):
                parts.append(f"{grouped} not compared ({twin} not measured in the same run)")
                continue
            mem = model_ratio(providers, grouped, "peak_extra_mib", twin)
            part = f"{grouped} {_x(rt)} {twin}'s" + ("" if math.isnan(mem) else f", peak memory {_x(mem)}")
            paired = providers.get(grouped, {}).get("paired", {}).get("grouping_ratio")
            if paired is not None and paired["status"] == "ok":
                part += (f", interleaved steps {_x(paired['value'])} [{_x(paired['p20'])}, "
                         f"{_x(paired['p80'])}]")
            parts.append(part)
        if parts:
            out.append(f"Grouping ({case}): step with group_projections=True ÷ without, same run (< 1: grouping is "
                       "faster): " + "; ".join(parts) + ".")
    return out


def summary(rows: Sequence[Dict]) -> List[str]:
    """The lines to paste: per case, its primary mode (full fwd+bwd, decode or dequant), every provider; then the
    model preset's training steps (ratios to peft_bnb and to the frozen-base floor), its targets and, where grouped
    providers ran, the step with grouping ÷ without."""
    out = ["## Summary", ""]
    layer_rows = any(r["preset"] != MODEL_PRESET and r["case"] != "ceilings" for r in rows)
    if layer_rows:
        out += ["| case | provider | ms p50 | × floor (eager ×) | peak extra MiB |", "|---|---|---|---|---|"]
    noise = []
    model_cases = _index(rows).get(MODEL_PRESET, {})
    for preset, cases in _index(rows).items():
        if preset == MODEL_PRESET:
            continue
        for case, providers in cases.items():
            if case == "ceilings":
                continue
            mode = primary_mode(providers)
            floor = _floor_of(providers)
            for provider, modes in providers.items():
                m = modes.get(mode, {})
                if provider in HIDDEN_IN_SUMMARY:
                    t = m.get("time_ms")
                    if t is not None:
                        noise.append(f"{case}: {_x(t['ratio_to_floor'])}")
                    continue
                if "skipped" in m:
                    out.append(f"| {case} | {provider} | skipped | {m['skipped']['note'][:60]} | |")
                    continue
                t = m.get("time_ms")
                h = m.get("host_us")
                if t is None and h is not None:  # the host preset: microseconds of host time per call
                    rh = h["ratio_to_floor"] if provider != floor else 1.0
                    out.append(f"| {case} | {provider} | host {_f(h['value'])} us | {_x(rh)} | – |")
                    continue
                if t is None:
                    continue
                e = m.get("eager_ms")
                rt = t["ratio_to_floor"] if provider != floor else 1.0
                eager = f" ({_x(e['ratio_to_floor'])})" if e is not None else ""
                gr = m.get("graph_ms")
                if gr is not None and gr["status"] == "ok":
                    eager += f" [graph {_f(gr['value'])} ms, {_x(gr['ratio_to_floor'])}]"
                pk = m.get("peak_extra_mib")
                out.append(f"| {case} | {provider_label(provider, t)} | {_f(t['value'])} | {_x(rt)}{eager} | "
                           f"{_f(pk['value']) if pk else '–'} |")
    if layer_rows:
        out.append("")
    if noise:
        out.append("Noise (the floor timed again at the end of each case, × the first floor): " + "; ".join(noise)
                   + ". A difference smaller than this is noise.")
        out.append("")
    model_cases = OrderedDict((c, p) for c, p in model_cases.items() if c != "ceilings")
    if model_cases:
        ref, fl = MODEL_REFERENCE, MODEL_FLOOR
        out += [f"Model training step (tokens/s and peak memory × {ref}, step time and peak memory ÷ the {fl}: the "
                "frozen-base step; both of the same run):", ""]
        out += model_target_lines(rows)
        out += model_grouping_lines(rows)
        out += ["", f"| case | provider | tokens/s | × {ref} | step ms | ÷ {fl} | peak extra MiB (× {ref}, × {fl}) "
                "|", "|---|---|---|---|---|---|---|"]
        for case, providers in model_cases.items():
            for provider, modes in providers.items():
                m = modes.get("step", {})
                if "skipped" in m:
                    out.append(f"| {case} | {provider} | skipped | {m['skipped']['note'][:60]} | | | |")
                    continue
                tk, t, pk = m.get("tokens_per_s"), m.get("time_ms"), m.get("peak_extra_mib")
                if tk is None or t is None:
                    continue
                rat = lambda k, r: _x(model_ratio(providers, provider, k, r))  # noqa: E731
                out.append(f"| {case} | {provider} | {_f(tk['value'])} | {rat('tokens_per_s', ref)} | "
                           f"{_f(t['value'])} | {rat('time_ms', fl)} | {_f(pk['value']) if pk else '–'} "
                           f"({rat('peak_extra_mib', ref)}, {rat('peak_extra_mib', fl)}) |")
        out.append("")
    return out


# ----------------------------------------------------------------------------------------------- plots

def plot_all(rows: Sequence[Dict], out_dir: Path) -> List[Path]:
    """``<preset>_ratio.png`` for each preset (time ratio to the floor, primary mode, per case and provider);
    for the tokens preset also ``tokens_time.png`` and, where memory was measured, ``tokens_memory.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for preset, cases in _index(rows).items():
        cases = OrderedDict((c, p) for c, p in cases.items() if c != "ceilings")
        if not cases:
            continue
        if preset == MODEL_PRESET:
            path = _plot_model(cases, out_dir, plt)
            if path is not None:
                written.append(path)
            continue
        providers = []
        for p in cases.values():
            for name in p:
                if name not in FLOORS and name not in HIDDEN_IN_SUMMARY and name not in providers:
                    providers.append(name)
        if not providers:
            continue
        providers.sort(key=lambda n: PLOT_ORDER.index(n) if n in PLOT_ORDER else len(PLOT_ORDER))
        names = list(cases)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names) + 2), 4.5))
        width = 0.8 / len(providers)
        for j, prov in enumerate(providers):
            vals = []
            for c in names:
                mode = primary_mode(cases[c])
                t = cases[c].get(prov, {}).get(mode, {}).get("time_ms")
                vals.append(t["ratio_to_floor"] if t else math.nan)
            xs = [i + (j - (len(providers) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, [0 if math.isnan(v) else v for v in vals], width, label=prov)
        ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("time / floor (same run)")
        ax.set_title(f"{preset}: ratio to the floor (lower is better)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{preset}_ratio.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        if preset == "tokens":
            written += _plot_vs_tokens(cases, out_dir, plt)
    return written


def _plot_vs_tokens(cases: Dict, out_dir: Path, plt) -> List[Path]:
    series: Dict[str, Dict[str, List]] = OrderedDict()
    for case, providers in cases.items():
        mode = primary_mode(providers)
        for prov, modes in providers.items():
            if prov in HIDDEN_IN_SUMMARY or mode not in modes:
                continue
            m = modes[mode]
            t = m.get("time_ms")
            if t is None:
                continue
            cfg = _cfg(t)
            label = f"{prov} ({cfg.get('weight', '?')})"
            s = series.setdefault(label, {"M": [], "ms": [], "mib": []})
            s["M"].append(cfg.get("M", math.nan))
            s["ms"].append(t["value"])
            pk = m.get("peak_extra_mib")
            s["mib"].append(pk["value"] if pk and pk["status"] == "ok" else math.nan)
    written = []
    for key, fname, ylabel in (("ms", "tokens_time.png", "ms per fwd+bwd (p50)"),
                               ("mib", "tokens_memory.png", "peak extra MiB")):
        if not any(not math.isnan(v) for s in series.values() for v in s[key]):
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, s in series.items():
            pts = sorted((m, v) for m, v in zip(s["M"], s[key]) if not math.isnan(v))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                        ls="--" if "floor" in label else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"tokens: {ylabel} vs M")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _plot_model(cases: Dict, out_dir: Path, plt) -> Optional[Path]:
    """``model_throughput.png``: per model case and provider, tokens/s (bars labelled × peft_bnb), step time ÷ the
    floor's (with fused_qlora's target bound where MODEL_STEP_TARGETS sets one) and peak extra GiB (labelled ×
    peft_bnb), every ratio within one run. Panels without a measured value (memory on the CPU) are left out."""
    names = list(cases)
    providers = []
    for p in cases.values():
        for name in p:
            if name not in providers:
                providers.append(name)
    order = MODEL_PROVIDERS
    providers.sort(key=lambda n: order.index(n) if n in order else len(order))

    def series(metric, ref, scale=1.0, as_ratio=False):
        out = {}
        for prov in providers:
            vals, rats = [], []
            for c in names:
                r = cases[c].get(prov, {}).get("step", {}).get(metric)
                ok = r is not None and r["status"] == "ok" and not math.isnan(r["value"])
                rt = model_ratio(cases[c], prov, metric, ref) if ok else math.nan
                vals.append(rt if as_ratio else (r["value"] * scale if ok else math.nan))
                rats.append(math.nan if as_ratio else rt)
            out[prov] = (vals, rats)
        return out

    panels = [("tokens/s (higher is better)", f"labels × {MODEL_REFERENCE}", series("tokens_per_s", MODEL_REFERENCE)),
              (f"step time ÷ the {MODEL_FLOOR}'s (lower is better)", f"{MODEL_FLOOR}: frozen base; ─ target",
               {p: v for p, v in series("time_ms", MODEL_FLOOR, as_ratio=True).items() if p != MODEL_FLOOR}),
              ("peak extra GiB (lower is better)", f"labels × {MODEL_REFERENCE}",
               series("peak_extra_mib", MODEL_REFERENCE, 1.0 / 1024))]
    panels = [p for p in panels if any(not math.isnan(v) for vals, _ in p[2].values() for v in vals)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 2.2 * len(names) + 3) * len(panels) / 1.4, 4.8),
                             squeeze=False)
    for ax, (label, subtitle, data) in zip(axes[0], panels):
        provs = list(data)
        width = 0.8 / max(1, len(provs))
        for j, prov in enumerate(provs):
            vals, rats = data[prov]
            xs = [i + (j - (len(provs) - 1) / 2) * width for i in range(len(names))]
            bars = ax.bar(xs, [0 if math.isnan(v) else v for v in vals], width, label=prov,
                          color=f"C{providers.index(prov)}")
            for b, v, rt in zip(bars, vals, rats):
                if not math.isnan(v) and not math.isnan(rt):
                    ax.annotate(f"{rt:.2f}×", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                                va="bottom", fontsize=7)
            if label.startswith("step time") and prov == MODEL_TARGET[0]:
                for x, c in zip(xs, names):
                    first = next(iter(_step(cases[c], prov).values()), None)
                    target = model_step_target(_cfg(first)) if first else None
                    if target is not None:
                        ax.plot([x - width / 2, x + width / 2], [target[1]] * 2, color="k", lw=2)
        if label.startswith("step time"):
            ax.axhline(1.0, color="k", lw=1, ls="--")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=15, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(f"model: {label.split(' (')[0]}; {subtitle}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / "model_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(new_rows: Sequence[Dict], out_dir: Path) -> Dict[str, object]:
    """Merge ``new_rows`` into ``out_dir/results.csv``; rewrite results.md and the plots from the merged rows."""
    out_dir = Path(out_dir)
    csv_path = out_dir / "results.csv"
    merged = merge_rows(read_csv(csv_path), new_rows)
    write_csv(csv_path, merged)
    md_path = out_dir / "results.md"
    md_path.write_text(markdown(merged, f"Benchmark results ({out_dir.name})"))
    plots = plot_all(merged, out_dir)
    return {"csv": csv_path, "markdown": md_path, "plots": plots, "rows": len(merged)}
