"""``python -m benchmarks.readme``: the benchmark numbers users read, generated from the committed results CSVs.

The sources are every single-GPU results directory's CSV, ``benchmarks/results/<gpu>/results.csv`` (``--csv``
takes one or more paths instead). Each preset is drawn whole from the one CSV holding its newest run (run ids
start with a UTC timestamp), so the tables describe the newest code whichever GPU ran it and no preset's table
mixes two GPUs; each table links the plots and results.md of its own CSV's directory (``merged_rows``).

Two generated blocks:

* README.md's headline (between ``<!-- headline:begin -->`` and ``<!-- headline:end -->``): one small table of
  the headline cases, lora_ops against PEFT or PEFT+bitsandbytes measured in the same run, with the commit
  each row was measured at, and a GPU column when the rows come from more than one GPU.
* docs/BENCHMARKS.md's full tables (between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``): layer fwd+bwd
  ratios to the floor, peak memory, the rank and tokens sweeps, the block of one layer's seven projections
  (grouped and not), host cost, decode, NF4 dequantize and the model-level training step, each with the GPU,
  command, date and run id that produced it and its plot. A preset without rows says "not yet measured".

Nothing outside the markers changes; without markers a block is inserted before the file's first ``## ``
heading. ``--check`` writes nothing: it exits 1 with a unified diff when a block is not what the merged CSVs
give (tests/test_readme_headline.py runs it in CI), 0 when both agree.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import sys
from collections import Counter, OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import report

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
# Result directories that are not one GPU's: the CPU quick mode's (git ignores it, so a local demo run must not
# reach the README) and the multi-GPU check's (a different CSV format).
_NOT_SINGLE_GPU = re.compile(r"^(cpu|multigpu.*)$")


def default_csvs(results: Path = RESULTS) -> Tuple[Path, ...]:
    """Every single-GPU results directory's ``results.csv`` under ``results``, sorted by directory name."""
    return tuple(sorted((p for p in Path(results).glob("*/results.csv")
                         if not _NOT_SINGLE_GPU.match(p.parent.name)), key=lambda p: p.parent.name))


DEFAULT_CSVS = default_csvs()
# The H200 CSV alone, for code that reads one CSV; the generated blocks draw on DEFAULT_CSVS.
DEFAULT_CSV = RESULTS / "h200" / "results.csv"
DEFAULT_README = REPO / "README.md"
DEFAULT_DOC = REPO / "docs" / "BENCHMARKS.md"
BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
HEAD_BEGIN = "<!-- headline:begin -->"
HEAD_END = "<!-- headline:end -->"
MARKS = ("†", "‡", "§", "¶", "#")
NOT_YET = "not yet measured"

LAYER_COLUMNS = (("full_ft", "full FT"), ("unfused", "torch unfused"), ("peft", "PEFT"),
                 ("peft_bnb", "PEFT+bnb"), ("fused", "**lora_ops**"))
DECODE_COLUMNS = (("unfused", "torch unfused"), ("peft", "PEFT"), ("peft_bnb", "PEFT+bnb"), ("fused", "**lora_ops**"))
NF4_COLUMNS = (("bnb", "bitsandbytes"), ("unfused", "lora_ops reference"), ("fused", "**lora_ops** (Triton)"))
BLOCK_COLUMNS = (("floor_grouped", "floor, grouped GEMMs"), ("peft", "PEFT"), ("fused", "**lora_ops**"),
                 ("fused_grouped", "**lora_ops grouped**"), ("peft_bnb", "PEFT+bnb"),
                 ("fused_qlora", "**lora_ops QLoRA**"), ("fused_qlora_grouped", "**lora_ops QLoRA grouped**"))
BLOCK_GROUP_COLUMNS = (("floor", "separate GEMMs"),) + BLOCK_COLUMNS[1:]
BLOCK_PART_LABELS = {"qkv": "q/k/v", "gate_up": "gate/up"}
MODEL_COLUMNS = (("floor", "frozen-base floor"), ("peft_bnb", "PEFT+bnb QLoRA"), ("fused_qlora", "**lora_ops QLoRA**"),
                 ("fused_qlora_grouped", "**lora_ops QLoRA grouped**"), ("peft", "PEFT LoRA"),
                 ("fused", "**lora_ops LoRA**"), ("fused_grouped", "**lora_ops LoRA grouped**"), ("full_ft", "full FT"))


# ------------------------------------------------------------------------------------------------ helpers

def _rel(path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _g(v: float, digits: int = 3) -> str:
    """``digits`` significant digits, trailing zeros kept (2.60, 0.0435); from 1000 on, integers (2,011)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:#.{digits}g}".rstrip(".")


def _mib(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}"


def _x(v: float) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.2f}×"


def _commit(env: Dict) -> str:
    """The short commit of a run ("" when the env has none that looks like one)."""
    hits = re.findall(r"\b([0-9a-f]{7,40})(-dirty)?\b", str(env.get("git_commit", "")))
    if not hits:
        return ""
    sha, dirty = hits[-1]
    return sha[:7] + dirty


def _date(env: Dict, run_id: str) -> str:
    for text, fmt in ((env.get("date_utc", ""), None), (run_id.split("-")[0], "%Y%m%dT%H%M%SZ")):
        try:
            d = datetime.fromisoformat(text) if fmt is None else datetime.strptime(text, fmt)
            return d.strftime("%Y-%m-%d %H:%M UTC")
        except (TypeError, ValueError):
            continue
    return "date unknown"


def _run_time(run_id: str, env: Dict) -> Optional[datetime]:
    """When a run started, in UTC: its id's leading timestamp, else its env's date_utc; None when neither parses."""
    try:
        return datetime.strptime(str(run_id).split("-")[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        pass
    try:
        d = datetime.fromisoformat(str(env.get("date_utc", "")))
    except ValueError:
        return None
    return d.replace(tzinfo=timezone.utc) if d.tzinfo is None else d.astimezone(timezone.utc)


def _csv_paths(csv_paths: Union[Path, str, Sequence[Path]]) -> List[Path]:
    return [Path(csv_paths)] if isinstance(csv_paths, (str, Path)) else [Path(p) for p in csv_paths]


def _later(t: Optional[datetime], than: Optional[datetime]) -> bool:
    """Whether ``t`` is strictly later than ``than``; a known time is later than an unknown one, never the reverse."""
    return t is not None and (than is None or t > than)


def merged_rows(paths: Union[Path, Sequence[Path]]) -> Tuple[List[Dict], Dict[str, Path]]:
    """The rows the generated blocks draw on, and the CSV each preset was taken from.

    Per preset, the source is the CSV whose newest run of that preset (``_run_time``) is the latest; all that
    preset's rows (every run of it in that CSV) come from there and none from the others, so one preset's table
    never mixes GPUs, while different presets may come from different CSVs. Ties, and CSVs whose runs of the preset
    have no parsable time, go to the first CSV in ``paths``' order. Rows keep their CSV's order, CSVs in
    ``paths``' order. A path without rows (missing or empty) is an error: the sources must be what was asked for.
    """
    paths = _csv_paths(paths)
    per_csv = []
    for path in paths:
        rows = report.read_csv(path)
        if not rows:
            raise FileNotFoundError(f"{path} has no benchmark rows (missing or empty)")
        per_csv.append(rows)
    best: Dict[str, Tuple[int, Optional[datetime]]] = {}
    for i, rows in enumerate(per_csv):
        newest: Dict[str, Optional[datetime]] = {}
        for r in rows:
            t = _run_time(r["run_id"], report._env(r))
            if r["preset"] not in newest or _later(t, newest[r["preset"]]):
                newest[r["preset"]] = t
        for preset, t in newest.items():
            if preset not in best or _later(t, best[preset][1]):
                best[preset] = (i, t)
    # Ordered by CSV, then by the preset's first row there: generate() lists the sources in this order.
    source = {preset: paths[i] for preset, (i, _) in sorted(best.items(), key=lambda kv: kv[1][0])}
    merged = [r for i, rows in enumerate(per_csv) for r in rows if best[r["preset"]][0] == i]
    return merged, source


class Runs:
    """The runs one table draws on: the main one (its floor's) unmarked, the others marked †, ‡, ..."""

    def __init__(self, rows: Sequence[Dict], main: Optional[str]):
        self.env: Dict[str, Dict] = OrderedDict()
        for r in rows:
            self.env.setdefault(r["run_id"], report._env(r))
        ids = list(self.env)
        self.main = main if main in self.env else (ids[0] if ids else None)
        others = [i for i in ids if i != self.main]
        self.mark = {self.main: ""}
        self.mark.update({rid: MARKS[min(k, len(MARKS) - 1)] for k, rid in enumerate(others)})
        self.used = set()

    def tag(self, run_id: str) -> str:
        m = self.mark.get(run_id, "?")
        if m:
            self.used.add(run_id)
        return m

    def describe(self, rid: str) -> str:
        e = self.env[rid]
        commit = _commit(e)
        return (f"`{e.get('command', '?')}` on {e.get('gpu', '?')}, {_date(e, rid)} (run `{rid}`"
                + (f", commit {commit}" if commit else "") + ")")

    def lines(self) -> List[str]:
        if self.main is None:
            return []
        out = [f"- Measured by {self.describe(self.main)}."]
        for rid in self.env:
            if rid in self.used:
                out.append(f"- {self.mark[rid]} measured by {self.describe(rid)}; its ratios are to that run's own "
                           "floor.")
        return out


def _main_run(cases: Dict, floor: str, mode: str) -> Optional[str]:
    c = Counter(m[mode]["time_ms"]["run_id"] for provs in cases.values() for p, m in provs.items()
                if p == floor and mode in m and "time_ms" in m[mode])
    return c.most_common(1)[0][0] if c else None


def _runs(cases: Dict, mode: str, floor: str, metric: str = "time_ms") -> Runs:
    """The runs a table's ``metric`` cells come from; the main one is the run of most of the floor's times."""
    return Runs([m[mode][metric] for p in cases.values() for m in p.values() if mode in m and metric in m[mode]],
                _main_run(cases, floor, mode))


def _columns(cases: Dict, columns) -> List[Tuple[str, str]]:
    """The (provider, heading) pairs of ``columns`` that some case has rows of."""
    return [(p, h) for p, h in columns if any(p in provs for provs in cases.values())]


def _head(*headings: str) -> List[str]:
    """A Markdown table's heading row and its separator."""
    return ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]


def _time_cell(m: Dict, notes: List[str], runs: Runs, show) -> str:
    """A provider's cell: its numbered skip note, show(its time_ms) with the run's mark, or – without a row."""
    if "skipped" in m:
        return _skip_note(notes, m["skipped"]["note"])
    t = m.get("time_ms")
    return "–" if t is None else show(t) + runs.tag(t["run_id"])


def _time_table(cases: Dict, mode: str, floor: str, cols, runs: Runs, notes: List[str], label, floor_cell,
                cell, extra=None) -> List[str]:
    """The body rows of a time table: per case label(case, providers), the floor's cell floor_cell(its mode
    metrics, its time_ms), each column's _time_cell through cell(mode metrics) -> show(time_ms), then extra(providers)
    cells if given."""
    out = []
    for case, provs in cases.items():
        fm = provs.get(floor, {}).get(mode, {})
        fl = fm.get("time_ms")
        cells = [label(case, provs), (floor_cell(fm, fl) + runs.tag(fl["run_id"])) if fl else "–"]
        for p, _ in cols:
            m = provs.get(p, {}).get(mode, {})
            cells.append(_time_cell(m, notes, runs, cell(m)))
        cells += extra(provs) if extra else []
        out.append("| " + " | ".join(cells) + " |")
    return out


def _graph_us(m: Dict) -> str:
    """' · <µs>' of a decode cell's CUDA-graph timing, or '' where it has none."""
    g = m.get("graph_ms")
    return f" · {_g(g['value'] * 1e3)}" if g is not None and g["status"] == "ok" else ""


def _plot(csv_dir: str, name: str) -> str:
    return f"- Plot: [`{name}`]({csv_dir}/{name})."


def _absent(cols, cases: Dict, who: str = "fused", label: str = "lora_ops") -> List[str]:
    """A line saying our provider has no rows in this table yet (so a missing column is not mistaken for a win)."""
    if any(who in provs for provs in cases.values()):
        return []
    return [f"- {label}: {NOT_YET} in this preset."]


def _cases(idx: Dict, preset: str) -> "OrderedDict[str, Dict]":
    return OrderedDict((c, p) for c, p in idx.get(preset, {}).items() if c != "ceilings")


def _layer_label(providers: Dict, mode: str) -> str:
    for modes in providers.values():
        for metrics in modes.values():
            cfg = report._cfg(next(iter(metrics.values())))
            if cfg.get("M"):
                s = f"{cfg['M']} × {cfg['K']}→{cfg['N']} {cfg.get('weight', '?')}"
                if cfg.get("dropout"):
                    s += f", dropout {cfg['dropout']:g}"
                if cfg.get("r", 16) != 16:
                    s += f", r={cfg['r']}"
                return s
    return "?"


def _skip_note(notes: List[str], text: str) -> str:
    if text not in notes:
        notes.append(text)
    return f"skipped ({notes.index(text) + 1})"


def _notes(notes: List[str]) -> List[str]:
    return [f"- ({i}) skipped: {n[:200]}" for i, n in enumerate(notes, 1)]


# -------------------------------------------------------------------------------------------- the tables

def _not_yet(command: str) -> List[str]:
    return [f"{NOT_YET.capitalize()}. On the GPU: `{command}`.", ""]


# The presets of layer fwd+bwd cases shown as "time ÷ the floor" tables: (preset, title, plot file).
SWEEPS = (("layer", "Layer forward + backward: time ÷ the floor (lower is better)", "layer_ratio.png"),
          ("rank", "Rank sweep, 8192 × 4096→4096 forward + backward: time ÷ the floor", "rank_ratio.png"),
          ("tokens", "Tokens sweep, M × 4096→4096 forward + backward: time ÷ the floor", "tokens_ratio.png"))


def _ratio_table(cases: Dict, columns, first: str, label: Callable,
                 floor: str = "floor") -> Tuple[List[str], object, List, List[str]]:
    """The "time ÷ the floor" table of fwd+bwd cases (mode full): header, a row per case (``label(provs)``, the
    floor's ms, each provider's ratio, the floor timed again). ``floor``: the cases' floor provider. Returns
    (lines, runs, columns, notes)."""
    mode = "full"
    runs = _runs(cases, mode, floor)
    cols = _columns(cases, columns)
    out = _head(first, f"{floor} ms", *(h for _, h in cols), "floor again")
    notes: List[str] = []

    def again(provs):
        rep = provs.get("floor_repeat", {}).get(mode, {}).get("time_ms")
        return [_x(rep["ratio_to_floor"]) + runs.tag(rep["run_id"]) if rep else "–"]

    out += _time_table(cases, mode, floor, cols, runs, notes, lambda c, provs: label(provs),
                       lambda fm, fl: _g(fl["value"]), lambda m: lambda t: _x(t["ratio_to_floor"]), again)
    return out, runs, cols, notes


def layer_section(idx: Dict, csv_dir: str, preset: str = "layer", title: str = SWEEPS[0][1],
                  plot: str = SWEEPS[0][2]) -> List[str]:
    """A table of layer fwd+bwd cases of ``preset``: floor ms, each provider's ratio to it, the floor's repeat."""
    out = [f"### {title}", ""]
    cases = _cases(idx, preset)
    if not cases:
        return out + _not_yet(f"python -m benchmarks --preset {preset}")
    rows, runs, cols, notes = _ratio_table(cases, LAYER_COLUMNS, "M × K→N, weight",
                                           lambda provs: _layer_label(provs, "full"))
    out += rows
    out.append("")
    out += ["- The floor is the frozen bf16 layer (forward GEMM + dX GEMM); \"floor again\" is the floor timed a "
            "second time at the end of the case: a difference smaller than its distance from 1.00× is noise."]
    out += _absent(cols, cases) + _notes(notes) + runs.lines() + [_plot(csv_dir, plot), ""]
    return out


def memory_section(idx: Dict) -> List[str]:
    out = ["### Layer forward + backward: peak extra memory, MiB (× the floor)", ""]
    cases = _cases(idx, "layer")
    mode = "full"
    have = [c for c, provs in cases.items() for m in provs.values()
            if m.get(mode, {}).get("peak_extra_mib", {}).get("status") == "ok"]
    if not have:
        return out + _not_yet("python -m benchmarks --preset layer")
    runs = _runs(cases, mode, "floor", "peak_extra_mib")
    cols = _columns(cases, LAYER_COLUMNS)
    out += _head("M × K→N, weight", "floor", *(h for _, h in cols))
    for case, provs in cases.items():
        fl = provs.get("floor", {}).get(mode, {}).get("peak_extra_mib")
        cells = [_layer_label(provs, mode), (_mib(fl["value"]) + runs.tag(fl["run_id"])) if fl else "–"]
        for p, _ in cols:
            r = provs.get(p, {}).get(mode, {}).get("peak_extra_mib")
            if r is None or r["status"] != "ok":
                cells.append("–")
            else:
                cells.append(f"{_mib(r['value'])} ({_x(r['ratio_to_floor'])}){runs.tag(r['run_id'])}")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "- Baseline taken before the layer is built, so the weights count (a bf16 4096×14336 W: 112 MiB; "
            "its NF4 bytes: about 30 MiB)."]
    out += runs.lines() + [""]
    return out


def decode_section(idx: Dict, csv_dir: str) -> List[str]:
    out = ["### Decode (no grad, weights rotated past L2): µs per call (× the floor) · CUDA-graph µs", ""]
    cases = _cases(idx, "decode")
    if not cases:
        return out + _not_yet("python -m benchmarks --preset decode")
    mode = "decode"
    runs = _runs(cases, mode, "floor")
    cols = _columns(cases, DECODE_COLUMNS)
    out += _head("M, K→N, weight", "floor µs", *(h for _, h in cols))
    notes: List[str] = []
    out += _time_table(cases, mode, "floor", cols, runs, notes,
                       lambda c, provs: _layer_label(provs, mode).replace(" × ", ", ", 1),
                       lambda fm, fl: _g(fl["value"] * 1e3) + _graph_us(fm),
                       lambda m: lambda t: f"{_g(t['value'] * 1e3)} ({_x(t['ratio_to_floor'])}){_graph_us(m)}")
    out.append("")
    out += ["- The floor is the bf16 layer without LoRA. First number: `triton.testing.do_bench` (L2 flushed before "
            "each call by a 256 MB memset, whose dirty lines the timed call then writes back); after the dot: "
            "`do_bench_cudagraph`, a CUDA graph of back-to-back calls rotating the weight copies (no flush, no host "
            "time), where a provider could be captured."]
    out += _absent(cols, cases) + _notes(notes) + runs.lines() + [_plot(csv_dir, "decode_ratio.png"), ""]
    return out


def _block_cfg(provs: Dict) -> Dict:
    for modes in provs.values():
        for metrics in modes.values():
            cfg = report._cfg(next(iter(metrics.values())))
            if cfg.get("M"):
                return cfg
    return {}


def _block_label(provs: Dict) -> str:
    cfg = _block_cfg(provs)
    if not cfg:
        return "?"
    part = cfg.get("part", "block")
    return ((f"{BLOCK_PART_LABELS[part]}, " if part != "block" else "") + f"{cfg['M']} tokens"
            + (f", r={cfg['r']}" if cfg.get("r", 16) != 16 else ""))


_PAIRED_KINDS = (
    ("paired", "paired_ratio", "Interleaved rounds (the provider's loop of eager fwd+bwd calls ÷ `{floor}`'s, "
     "alternating in one process; median [p20, p80] of the rounds' ratios):"),
    ("paired_graph", "paired_graph_ratio", "Device time alone (each fwd+bwd captured in a CUDA graph, its replays "
     "÷ `{floor}`'s, alternating in the same rounds; median [p20, p80] of the rounds' ratios):"),
    ("paired", "grouping_ratio", "Grouped ÷ ungrouped (the same lora_ops provider with `group_projections` off, "
     "eager loops alternating in one process; median [p20, p80] of the rounds' ratios; < 1: grouping is faster):"),
    ("paired_graph", "grouping_graph_ratio", "Grouped ÷ ungrouped in device time alone (CUDA-graph replays "
     "alternating; median [p20, p80] of the rounds' ratios; < 1: grouping is faster):"))


def _paired_lines(cases: Dict, first: str, floor: str) -> List[str]:
    """The grouped providers' interleaved rounds (block.measure_pairs) against ``floor`` and against their
    ungrouped twins, eager and, where the run has them, CUDA-graph replays: a table each, one line per case that
    has them, median [p20, p80] of the per-round ratios."""
    out = []
    for mode, metric, title in _PAIRED_KINDS:
        rows = []
        for case, provs in cases.items():
            cells, rounds = [_block_label(provs)], None
            for p in ("fused_grouped", "fused_qlora_grouped"):
                r = provs.get(p, {}).get(mode, {}).get(metric)
                if r is None or r["status"] != "ok":
                    cells.append("–")
                    continue
                rounds = report._cfg(r).get("rounds")
                cells.append(f"{_x(r['value'])} [{_x(r['p20'])}, {_x(r['p80'])}]")
            if rounds is not None:
                rows.append("| " + " | ".join(cells + [str(rounds)]) + " |")
        if rows:
            out += (["", title.format(floor=floor), ""]
                    + _head(first, "**lora_ops LoRA grouped**", "**lora_ops QLoRA grouped**", "rounds") + rows)
    return out


def block_section(idx: Dict, csv_dir: str) -> List[str]:
    """The block preset: per token count, the floor's ms and each provider's time ÷ it, then peak memory."""
    out = ["### Block: one Llama-3-8B layer's seven projections, forward + backward: time ÷ the floor (lower is "
           "better)", ""]
    every = _cases(idx, "block")
    cases = OrderedDict((c, p) for c, p in every.items() if _block_cfg(p).get("part", "block") == "block")
    groups = OrderedDict((c, p) for c, p in every.items() if c not in cases)
    if not cases:
        return out + _not_yet("python -m benchmarks --preset block --budget-s 420")
    mode = "full"
    rows, runs, cols, notes = _ratio_table(cases, BLOCK_COLUMNS, "M", _block_label)
    out += rows + _paired_lines(cases, "M", "floor")
    mem = [c for c, provs in cases.items() for m in provs.values()
           if m.get(mode, {}).get("peak_extra_mib", {}).get("status") == "ok"]
    if mem:
        out += ["", "Peak extra memory, MiB (× the floor; baseline before the provider's weights are built):", ""]
        out += _head("M", "floor", *(h for _, h in cols))
        for case, provs in cases.items():
            cells = [_block_label(provs)]
            for p in ["floor"] + [p for p, _ in cols]:
                r = provs.get(p, {}).get(mode, {}).get("peak_extra_mib")
                ok = r is not None and r["status"] == "ok"
                cells.append(("–" if not ok else _mib(r["value"]) if p == "floor"
                              else f"{_mib(r['value'])} ({_x(r['ratio_to_floor'])})"))
            out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out += ["- q 4096→4096, k and v 4096→1024, o 4096→4096, gate and up 4096→14336, down 14336→4096, r=16: "
            "forward + backward of the linear layers only (q/k/v read one input, gate/up another, o and down "
            "their own; one upstream gradient per output; gradients flow to the inputs). The floor is the seven "
            "frozen bf16 linears without adapters; 'floor, grouped GEMMs' the same with q/k/v and gate/up "
            "each one concatenated linear; grouped = `apply_lora(..., group_projections=True)` "
            "(`docs/GROUPED.md`)."]
    out += _absent(cols, cases) + _notes(notes) + runs.lines() + [_plot(csv_dir, "block_ratio.png"), ""]
    if groups:
        out += ["#### One group alone: time ÷ the group's concatenated GEMM (`floor_grouped`)", ""]
        rows, runs, cols, notes = _ratio_table(groups, BLOCK_GROUP_COLUMNS, "group, M", _block_label,
                                               floor="floor_grouped")
        out += rows + _paired_lines(groups, "group, M", "floor_grouped") + [""]
        out += ["- q/k/v (4096→4096, 1024, 1024) or gate/up (4096→14336 twice) alone, on one input: the floor is "
                "the group's weights concatenated into one frozen bf16 linear, outputs split; 'separate GEMMs' "
                "the same projections as separate frozen linears."]
        out += _absent(cols, groups) + _notes(notes) + runs.lines() + [""]
    return out


def nf4_section(idx: Dict, csv_dir: str) -> List[str]:
    out = ["### NF4 dequantize: ms per call (× a copy of as many bytes)", ""]
    cases = _cases(idx, "nf4")
    if not cases:
        return out + _not_yet("python -m benchmarks --preset nf4")
    mode = "dequant"
    runs = _runs(cases, mode, "copy")
    cols = _columns(cases, NF4_COLUMNS)
    out += _head("weight", "copy ms", *(h for _, h in cols))

    def label(case, provs):
        cfg = report._cfg(next(iter(next(iter(next(iter(provs.values())).values())).values())))
        return f"{cfg['N']} × {cfg['K']} NF4 → {cfg.get('dtype', '?')}" if cfg.get("N") else case

    notes: List[str] = []
    out += _time_table(cases, mode, "copy", cols, runs, notes, label, lambda fm, fl: _g(fl["value"]),
                       lambda m: lambda t: f"{_g(t['value'])} ({_x(t['ratio_to_floor'])})")
    out.append("")
    out += _absent(cols, cases) + _notes(notes) + runs.lines() + [_plot(csv_dir, "nf4_ratio.png"), ""]
    return out


def _has_floor(cases: Dict) -> bool:
    """Whether some model case has rows of the frozen-base floor (runs before the floor provider existed have
    none; their tables read as they did then: ratios to PEFT+bitsandbytes only)."""
    return any(report.MODEL_FLOOR in provs for provs in cases.values())


def _model_label(cfg: Dict) -> str:
    label = f"{cfg.get('layers', '?')} layers, {cfg.get('batch', '?')} × {cfg.get('seq', '?')}"
    ckpt = report.model_checkpointing(cfg)
    if ckpt is not None:  # rows that record the setting (and the vocabulary with it)
        label += f", vocab {cfg.get('vocab', '?')}, " + ("checkpointing" if ckpt else "no checkpointing")
    return label


def model_section(idx: Dict, rows: Sequence[Dict], csv_dir: str) -> List[str]:
    """Tokens/s (× PEFT+bitsandbytes, and the step ÷ the frozen-base floor's where the floor ran), peak memory
    (the same two ratios), the targets, how a step is run, the runs and the plot."""
    cases = _cases(idx, report.MODEL_PRESET)
    floor = _has_floor(cases)
    title = "### Model training step (Llama-3-8B-shaped decoder): tokens/s (× PEFT+bitsandbytes)"
    if floor:
        title += " · step time ÷ the frozen-base floor's"
    out = [title, ""]
    if not cases:
        return out + _not_yet("python -m benchmarks --preset model --budget-s 420")
    mode, ref, fl = "step", report.MODEL_REFERENCE, report.MODEL_FLOOR
    runs = Runs([next(iter(m[mode].values())) for p in cases.values() for m in p.values() if mode in m],
                _main_run(cases, ref, mode))
    cols = _columns(cases, MODEL_COLUMNS)
    out += _head("layers, batch × seq", *(h for _, h in cols))
    notes: List[str] = []
    mem_rows, dtypes, mem_any, ckpts = [], [], False, set()
    for case, provs in cases.items():
        cfg = report._cfg(next(iter(next(iter(next(iter(provs.values())).values())).values())))
        label = _model_label(cfg)
        dtypes.append(str(cfg.get("dtype", "?")))
        ckpts.add(report.model_checkpointing(cfg))
        cells, mem = [label], [label]
        for p, _ in cols:
            m = provs.get(p, {}).get(mode, {})
            if "skipped" in m:
                cells.append(_skip_note(notes, m["skipped"]["note"]))
                mem.append("–")
                continue
            tk, pk = m.get("tokens_per_s"), m.get("peak_extra_mib")
            to_floor = fl in provs and p != fl
            step = f" · {_x(report.model_ratio(provs, p, 'time_ms', fl))}" if to_floor else ""
            cells.append(f"{_g(tk['value'], 4)} ({_x(report.model_ratio(provs, p, 'tokens_per_s', ref))}){step}"
                         f"{runs.tag(tk['run_id'])}" if tk else "–")
            mem_ok = pk is not None and pk["status"] == "ok"
            mem_any = mem_any or mem_ok
            mf = f" · {_x(report.model_ratio(provs, p, 'peak_extra_mib', fl))}" if to_floor else ""
            mem.append(f"{_g(pk['value'] / 1024, 3)} ({_x(report.model_ratio(provs, p, 'peak_extra_mib', ref))}){mf}"
                       if mem_ok else "–")
        out.append("| " + " | ".join(cells) + " |")
        mem_rows.append("| " + " | ".join(mem) + " |")
    if mem_any:
        out += ["", "Peak extra memory, GiB (× PEFT+bitsandbytes" + ("; after the dot: × the frozen-base floor"
                                                                     if floor else "")
                + "; baseline before the model is built):", ""]
        out += _head("layers, batch × seq", *(h for _, h in cols)) + mem_rows + [""]
    else:
        out += ["", "Peak memory: not measured (no CUDA memory statistics in these runs).", ""]
    out += ["- " + line.replace("**", "") for line in report.model_target_lines(rows)]
    out += ["- " + line for line in report.model_grouping_lines(rows)]
    if ckpts == {None}:
        ckpt_text = "no gradient checkpointing"
    else:
        ckpt_text = ("gradient checkpointing as each row says (transformers' gradient_checkpointing_enable with "
                     "use_reentrant=False, applied the same way to every provider)")
    out += ["- One step: forward with causal-LM loss on random token ids, backward, AdamW over the trainable "
            "parameters (LoRA r=16 on q, k, v, o, gate, up, down; full FT: every parameter), "
            f"{'/'.join(dict.fromkeys(dtypes))}, {ckpt_text}; tokens/s = batch × seq / the median step time."]
    if any(p.endswith("_grouped") for p, _ in cols):
        out += ["- grouped = `apply_lora(..., group_projections=True)`: q/k/v and gate/up of every layer each one "
                "`lora_linear` call (`docs/GROUPED.md`); a grouped provider whose groups did not form is skipped."]
    if floor:
        out += ["- The frozen-base floor is the same model (dense, in its dtype) with no adapter and every parameter "
                "frozen: forward and backward through every layer to the input embeddings, no optimizer step. "
                "\"· x×\" after a provider's tokens/s is its step time ÷ the floor's, after its memory its peak ÷ "
                "the floor's."]
    out += _notes(notes) + runs.lines() + [_plot(csv_dir, "model_throughput.png"), ""]
    return out


HOST_COLUMNS = (("peft", "PEFT LoRA"), ("peft_bnb", "PEFT+bnb QLoRA"), ("fused", "**lora_ops**"))


def host_section(idx: Dict, csv_dir: str) -> List[str]:
    """Host µs per eager fwd+bwd (host preset): the floor's, then each provider's (× the floor)."""
    out = ["### Host cost: µs per eager forward + backward (× the frozen layer's)", ""]
    cases = _cases(idx, "host")
    if not cases:
        return out + _not_yet("python -m benchmarks --preset host")
    mode, metric = "host", "host_us"
    runs = Runs([m[mode][metric] for p in cases.values() for m in p.values() if mode in m and metric in m[mode]],
                None)
    cols = _columns(cases, HOST_COLUMNS)
    out += _head("M × K→N, weight", "frozen layer µs", *(h for _, h in cols), "floor again")
    notes: List[str] = []
    for case, provs in cases.items():
        fl = provs.get("floor", {}).get(mode, {}).get(metric)
        cells = [_layer_label(provs, mode), _g(fl["value"]) + runs.tag(fl["run_id"]) if fl else "–"]
        for p, _ in cols:
            m = provs.get(p, {}).get(mode, {})
            h = m.get(metric)
            if "skipped" in m:
                cells.append(_skip_note(notes, m["skipped"]["note"]))
            else:
                cells.append("–" if h is None
                             else f"{_g(h['value'])} ({_x(h['ratio_to_floor'])}){runs.tag(h['run_id'])}")
        rep = provs.get("floor_repeat", {}).get(mode, {}).get(metric)
        cells.append(_x(rep["ratio_to_floor"]) if rep else "–")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out += ["- Wall time per call of loops of eager fwd+bwd calls with one synchronize per loop, median of the "
            "loops, at a shape whose GPU work is a few µs: what one training call of the layer costs the host."]
    out += _absent(cols, cases) + _notes(notes) + runs.lines() + [_plot(csv_dir, "host_ratio.png"), ""]
    return out


def _link(path: Path, doc_dir: Path) -> str:
    """``path`` as a Markdown link target from a document in ``doc_dir``."""
    return Path(os.path.relpath(Path(path).resolve(), Path(doc_dir).resolve())).as_posix()


# The presets in the order of their sections below.
SECTION_PRESETS = ("layer", "rank", "tokens", "block", "host", "decode", "nf4", report.MODEL_PRESET)


def _dir_link(csv_link: str) -> str:
    return csv_link.rsplit("/", 1)[0] if "/" in csv_link else "."


def _with_source(section: List[str], source: str) -> List[str]:
    """``section`` with a line naming its source CSV under its title, unless it has no rows."""
    if len(section) < 3 or section[2].startswith(NOT_YET.capitalize()):
        return section
    return section[:2] + [source, ""] + section[2:]


def generate(rows: Sequence[Dict], csv_path: Union[Path, Mapping[str, Path]] = DEFAULT_CSV,
             doc_dir: Path = DEFAULT_DOC.parent) -> str:
    """The full tables' block (markers included) for ``rows``, their links relative to a document in ``doc_dir``.
    ``csv_path``: the CSV every preset was read from, or preset -> its CSV as ``merged_rows`` gives; each table's
    plot and results.md links point at its own preset's CSV directory."""
    if isinstance(csv_path, (str, Path)):
        by_preset: Dict[str, Path] = {}
        fallback = Path(csv_path)
    else:
        by_preset = {k: Path(v) for k, v in csv_path.items()}
        fallback = next(iter(by_preset.values()), DEFAULT_CSV)
    # The sources in the mapping's order (merged_rows': the CSVs' order), each with its presets in section order.
    used: "OrderedDict[Path, List[str]]" = OrderedDict((p, []) for p in by_preset.values())
    present = set(r["preset"] for r in rows)
    for preset in sorted(present, key=lambda q: (SECTION_PRESETS + (q,)).index(q)):
        used.setdefault(by_preset.get(preset, fallback), []).append(preset)
    used = OrderedDict((p, ps) for p, ps in used.items() if ps)
    if not used:
        used[fallback] = []
    multi = len(used) > 1

    def link(preset: str) -> str:
        return _link(by_preset.get(preset, fallback), doc_dir)

    def csv_dir(preset: str) -> str:
        return _dir_link(link(preset))

    def source(preset: str) -> str:
        return f"From [`{_rel(by_preset.get(preset, fallback))}`]({link(preset)})."

    idx = report._index(rows)
    model_refs = ("model step: PEFT+bitsandbytes and the frozen-base floor"
                  if _has_floor(_cases(idx, report.MODEL_PRESET)) else "model step: PEFT+bitsandbytes")
    gpus = list(OrderedDict.fromkeys(report._env(r).get("gpu", "?") for r in rows))
    title = f"## Headline numbers ({', '.join(gpus)})" if gpus else "## Headline numbers"
    if multi:
        sources = " and ".join(f"[`{_rel(p)}`]({_link(p, doc_dir)}) ({', '.join(ps)})" for p, ps in used.items())
        origin = (f"from {sources}: each preset comes whole from the CSV that holds its newest run, so no table "
                  "mixes two GPUs (do not edit by hand: CI runs `python -m benchmarks.readme --check`, which fails "
                  "when this block and the CSVs disagree)")
        full = ", ".join(f"[`{_rel(p.parent / 'results.md')}`]({_dir_link(_link(p, doc_dir))}/results.md) "
                         f"({', '.join(ps)})" for p, ps in used.items())
    else:
        (only,) = used
        origin = (f"from [`{_rel(only)}`]({_link(only, doc_dir)}) (do not edit by hand: CI runs "
                  "`python -m benchmarks.readme --check`, which fails when this block and the CSV disagree)")
        full = f"[`results.md`]({_dir_link(_link(only, doc_dir))}/results.md)"
    lines = [BEGIN, title, "",
             f"Generated by `python -m benchmarks.readme` {origin}. "
             "Each run times all its providers in one process on the same tensors, and every ratio is to the "
             f"floor ({model_refs}) of its own run; a cell marked † comes from another run than "
             f"its row's floor. Full tables: {full}.", ""]
    sections = [("layer", layer_section(idx, csv_dir("layer"))), ("layer", memory_section(idx))]
    for preset, title, plot in SWEEPS[1:]:
        sections.append((preset, layer_section(idx, csv_dir(preset), preset, title, plot)))
    sections += [("block", block_section(idx, csv_dir("block"))), ("host", host_section(idx, csv_dir("host"))),
                 ("decode", decode_section(idx, csv_dir("decode"))), ("nf4", nf4_section(idx, csv_dir("nf4"))),
                 (report.MODEL_PRESET, model_section(idx, rows, csv_dir(report.MODEL_PRESET)))]
    for preset, section in sections:
        lines += _with_source(section, source(preset)) if multi else section
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines + [END])


# ------------------------------------------------------------------------------------- the README headline

# The README's headline rows: (label, preset, case, mode, metric, baseline provider, lora_ops provider, kind).
# kind "rate": higher is better (ratio ours / theirs); "time": lower is better (ratio theirs / ours, a speed-up);
# "memory": lower is better (ratio ours / theirs).
# The training steps are apply_lora's defaults, which group q/k/v and gate/up (the *_grouped providers).
HEADLINE_ROWS = (
    ("QLoRA training step, 16 Llama-3-8B-shaped layers, 1 × 2048 tokens, checkpointing", "model",
     "llama3-8b-shape L16 1x2048 ckpt", "step", "tokens_per_s", "peft_bnb", "fused_qlora_grouped", "rate"),
    ("QLoRA training step, same model, 4 × 2048 tokens, checkpointing", "model",
     "llama3-8b-shape L16 4x2048 ckpt", "step", "tokens_per_s", "peft_bnb", "fused_qlora_grouped", "rate"),
    ("LoRA training step (bf16 base), same model, 1 × 2048 tokens, checkpointing", "model",
     "llama3-8b-shape L16 1x2048 ckpt", "step", "tokens_per_s", "peft", "fused_grouped", "rate"),
    # The layer preset's row, not the tokens preset's same case: PEFT+bitsandbytes is host-bound and its time at
    # this case has differed by 1.5x between the two presets of one run; the layer preset is the targets' source.
    ("QLoRA layer forward + backward, 8192 × 4096→4096", "layer", "8192x4096->4096 r16 nf4", "full", "time_ms",
     "peft_bnb", "fused", "time"),
    ("QLoRA layer forward + backward, 8192 × 4096→14336: peak extra memory", "layer", "8192x4096->14336 r16 nf4",
     "full", "peak_extra_mib", "peft_bnb", "fused", "memory"),
    ("QLoRA decode, 1 token, 4096→14336, no grad", "decode", "1x4096->14336 r16 nf4", "decode", "time_ms",
     "peft_bnb", "fused", "time"),
    ("QLoRA layer host cost per eager forward + backward, 64 × 1024→1024", "host", "64x1024->1024 r16 nf4", "host",
     "host_us", "peft_bnb", "fused", "time"),
)
HEADLINE_MAX_ROWS = 8
# The host preset's frozen-layer case: its host time per call says how fast the loaned machine's host was.
_HOST_PROBE = ("host", "64x1024->1024 r16 dense", "floor", "host_us")
_BASELINE_NAMES = {"peft": "PEFT", "peft_bnb": "PEFT+bitsandbytes"}


def _value_text(metric: str, value: float, other: float) -> str:
    """``value`` with its unit; times are in µs when either of the row's two values is below 1 ms."""
    if metric == "tokens_per_s":
        return f"{_g(value, 4)} tokens/s"
    if metric == "peak_extra_mib":
        return f"{_mib(value)} MiB"
    if metric == "host_us":
        return f"{_g(value)} µs"
    if metric == "time_ms":
        return f"{_g(value)} ms" if min(value, other) >= 1 else f"{_g(value * 1e3)} µs"
    return _g(value)


_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro"}


def gpu_short(gpu: str) -> str:
    """A GPU's short name for a table column: the vendor words dropped, then the words up to the first one with a
    digit, that one cut at its first "-" ("NVIDIA H100 80GB HBM3" -> "H100", "NVIDIA A100-SXM4-80GB" -> "A100",
    "NVIDIA GeForce RTX 4090" -> "RTX 4090"); the name as given when nothing is left."""
    words = [w for w in str(gpu).split() if w.lower() not in _VENDOR_WORDS]
    out = []
    for w in words:
        if any(ch.isdigit() for ch in w):
            out.append(w.split("-")[0] or w)
            break
        out.append(w)
    return " ".join(out) or str(gpu)


def _gpu_names(gpus: Sequence[str]) -> Dict[str, str]:
    """Each GPU's name in a GPU column: its short name, or the full names of all when two short names collide."""
    distinct = list(dict.fromkeys(gpus))
    short = {g: gpu_short(g) for g in distinct}
    return short if len(set(short.values())) == len(distinct) else {g: g for g in distinct}


def headline(rows: Sequence[Dict]) -> str:
    """README.md's headline block (markers included): one row per ``HEADLINE_ROWS`` entry whose two providers
    were measured (status ok) in the same run, with that run's commit; rows without data are left out. When the
    rows come from runs on more than one GPU, a GPU column names each row's."""
    idx = report._index(rows)
    lines = [HEAD_BEGIN]
    body, gpus, runs = [], [], []
    for label, preset, case, mode, metric, base, ours, kind in HEADLINE_ROWS:
        provs = idx.get(preset, {}).get(case, {})
        a = provs.get(base, {}).get(mode, {}).get(metric)
        b = provs.get(ours, {}).get(mode, {}).get(metric)
        if (a is None or b is None or a["status"] != "ok" or b["status"] != "ok" or a["run_id"] != b["run_id"]
                or not a["value"] or not b["value"]):
            continue
        env = report._env(b)
        gpus.append(env.get("gpu", "?"))
        runs.append((b["run_id"], _commit(env) or "?"))
        if kind == "rate":
            verdict = f"{b['value'] / a['value']:.2f}× the tokens/s"
        elif kind == "time":
            verdict = f"{a['value'] / b['value']:.2f}× faster"
        else:
            verdict = f"{b['value'] / a['value']:.2f}× the memory"
        body.append([label, f"{_BASELINE_NAMES.get(base, base)}: {_value_text(metric, a['value'], b['value'])}",
                     _value_text(metric, b['value'], a['value']), f"**{verdict}**", _commit(env) or "?"])
    body, gpus, runs = body[:HEADLINE_MAX_ROWS], gpus[:HEADLINE_MAX_ROWS], runs[:HEADLINE_MAX_ROWS]
    if not body:
        lines += [f"Benchmarks: {NOT_YET}. On the GPU: `python -m benchmarks --preset model layer decode host`."]
        return "\n".join(lines + [HEAD_END])
    names = _gpu_names(gpus)
    where = ("(generated from the committed results by `python -m benchmarks.readme`; every table, command and date: "
             "[docs/BENCHMARKS.md](docs/BENCHMARKS.md)):")
    heads = ["case", "baseline", "lora_ops", "lora_ops vs baseline", "commit"]
    if len(names) == 1:
        lines += [f"On one {gpus[0]}, bf16, LoRA rank 16; each row's two numbers come from one run at the commit "
                  f"shown {where}", ""]
    else:
        vendor = "NVIDIA GPU" if all(g.startswith("NVIDIA ") for g in names) else "GPU"
        key = ", ".join(f"{n}: {g}" for g, n in names.items() if n != g)
        lines += [f"On one {vendor} per run (the GPU column{'; ' + key if key else ''}), bf16, LoRA rank 16; each "
                  f"row's two numbers come from one run on that GPU at the commit shown {where}", ""]
        heads.insert(4, "GPU")
        for cells, g in zip(body, gpus):
            cells.insert(4, names[g])
    lines += _head(*heads) + ["| " + " | ".join(cells) + " |" for cells in body]
    lines += _host_note(rows, dict(runs), dict(zip((rid for rid, _ in runs), (names[g] for g in gpus)))
                        if len(names) > 1 else None)
    return "\n".join(lines + [HEAD_END])


def _host_note(rows: Sequence[Dict], runs: Dict[str, str], gpu_of: Optional[Dict[str, str]] = None) -> List[str]:
    """A sentence giving, for each headline run that timed the host preset, the frozen layer's host time per call:
    the loaned machines' hosts differ by several times, and host-bound rows (small token counts, PEFT) move
    with them. ``gpu_of`` (run id -> GPU name), when the headline spans several GPUs, names each run's GPU."""
    preset, case, provider, metric = _HOST_PROBE
    seen = {r["run_id"]: r["value"] for r in rows
            if (r["preset"], r["case"], r["provider"], r["metric"]) == (preset, case, provider, metric)
            and r["status"] == "ok" and r["run_id"] in runs and r["value"]}
    if not seen:
        return []
    each = ", ".join(f"{_g(v)} µs in the {gpu_of[rid] + ' ' if gpu_of else ''}run at {runs[rid]}"
                     for rid, v in seen.items())
    return ["", "Rows bound by host time (small token counts, and PEFT+bitsandbytes) move with the host of the "
                f"machine each run was lent: a frozen `nn.Linear`'s eager forward + backward ({case}) cost the host "
                f"{each}."]


def splice(readme: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    """``readme`` with its marked block replaced by ``block`` (or, without markers, ``block`` inserted before
    the first ``## `` heading, else appended)."""
    b, e = readme.find(begin), readme.find(end)
    if (b < 0) != (e < 0) or (b >= 0 and e < b):
        raise ValueError(f"README has an unmatched {begin if b >= 0 else end} marker; fix or remove it")
    if b >= 0:
        return readme[:b] + block + readme[e + len(end):]
    m = re.search(r"^## ", readme, flags=re.M)
    if m is None:
        return readme.rstrip("\n") + "\n\n" + block + "\n"
    return readme[:m.start()] + block + "\n\n" + readme[m.start():]


CsvPaths = Union[Path, Sequence[Path]]


def expected_readme(readme_path: Path = DEFAULT_README, csv_path: CsvPaths = DEFAULT_CSVS) -> Tuple[str, str]:
    """(README as it is, README with the headline block the merged CSVs give)."""
    current = Path(readme_path).read_text()
    rows, _ = merged_rows(csv_path)
    return current, splice(current, headline(rows), HEAD_BEGIN, HEAD_END)


def expected_doc(doc_path: Path = DEFAULT_DOC, csv_path: CsvPaths = DEFAULT_CSVS) -> Tuple[str, str]:
    """(docs/BENCHMARKS.md as it is, with the full tables the merged CSVs give)."""
    current = Path(doc_path).read_text()
    rows, source = merged_rows(csv_path)
    return current, splice(current, generate(rows, source, Path(doc_path).parent))


def _names(csv_path: CsvPaths) -> str:
    return ", ".join(_rel(p) for p in _csv_paths(csv_path))


def _diff(path: Path, current: str, want: str, csv_path: CsvPaths) -> str:
    return "".join(difflib.unified_diff(current.splitlines(True), want.splitlines(True), f"{_rel(path)} (now)",
                                        f"{_rel(path)} (from {_names(csv_path)})"))


def check(readme_path: Path = DEFAULT_README, csv_path: CsvPaths = DEFAULT_CSVS,
          doc_path: Optional[Path] = DEFAULT_DOC) -> Tuple[bool, str]:
    """(the README's headline and, unless ``doc_path`` is None, the doc's tables are what the merged CSVs give; a
    unified diff, or what to run, when they are not)."""
    problems = []
    targets = [(readme_path, HEAD_BEGIN, HEAD_END, expected_readme)]
    if doc_path is not None:
        targets.append((doc_path, BEGIN, END, expected_doc))
    for path, begin, end, expected in targets:
        current, want = expected(path, csv_path)
        if begin not in current:
            problems.append(f"{path} has no {begin} ... {end} block; run `python -m benchmarks.readme` to add it\n")
        elif current != want:
            problems.append(_diff(path, current, want, csv_path))
    return not problems, "".join(problems)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.readme",
                                 description="Rewrite README.md's headline table (between " + HEAD_BEGIN + " and "
                                             + HEAD_END + ") and docs/BENCHMARKS.md's full tables (between " + BEGIN
                                             + " and " + END + ") from the committed benchmark CSVs, each "
                                             "preset from the CSV holding its newest run.")
    ap.add_argument("--csv", type=Path, nargs="+", default=list(DEFAULT_CSVS),
                    help="results CSVs, ties going to the first (default: every single-GPU results directory's, "
                         f"sorted: {_names(DEFAULT_CSVS) or 'none found'})")
    ap.add_argument("--readme", type=Path, default=DEFAULT_README, help="README to rewrite (default README.md)")
    ap.add_argument("--doc", type=Path, default=DEFAULT_DOC,
                    help=f"document of the full tables to rewrite (default {_rel(DEFAULT_DOC)})")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 with a diff when a block differs from what the CSVs give")
    args = ap.parse_args(argv)
    if not args.csv:
        print(f"error: no results CSV under {_rel(RESULTS)}; pass --csv", file=sys.stderr)
        return 2
    csvs = _names(args.csv)
    try:
        if args.check:
            ok, diff = check(args.readme, args.csv, args.doc)
            if not ok:
                sys.stdout.write(diff if diff.endswith("\n") else diff + "\n")
                print(f"the generated benchmark blocks differ from {csvs}; run "
                      f"`python -m benchmarks.readme` and commit {_rel(args.readme)} and {_rel(args.doc)}",
                      file=sys.stderr)
                return 1
            print(f"{_rel(args.readme)} headline and {_rel(args.doc)} tables match {csvs}")
            return 0
        pairs = [(args.readme, expected_readme(args.readme, args.csv)), (args.doc, expected_doc(args.doc, args.csv))]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, (current, want) in pairs:
        if current == want:
            print(f"{_rel(path)} already matches {csvs}")
        else:
            Path(path).write_text(want)
            print(f"rewrote the generated block of {_rel(path)} from {csvs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
