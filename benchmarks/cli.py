"""``python -m benchmarks``: parse the command line, run the presets, write and print the results."""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from .presets import (ARCHS, DECODE_MAX_M, MODEL_DEFAULTS, MODEL_MINIMUM, MODEL_OPTIONS, MODEL_RUNS, MODES, PRESETS,
                      PROVIDER_ALIASES, PROVIDERS, select_cases)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

MODE_HELP = {
    "forward": "training forward (x requires grad, autograd records)",
    "backward": "y.backward(dy, retain_graph=True) after one untimed forward",
    "full": "forward + backward: the number the targets are set in",
    "decode": f"forward under torch.no_grad(), eval mode, M <= {DECODE_MAX_M}",
    "dequant": "NF4 -> dense dequantization (nf4 preset)",
    "step": "model preset: one training step (forward + causal-LM loss + backward + AdamW step)",
}


def _epilog() -> str:
    lines = ["presets (each runs in under ten minutes; estimates for one H200):"]
    for p in PRESETS.values():
        lines.append(f"  {p.name:<8} {p.help} [{p.h200_estimate}]")
    lines.append("\nproviders (the floor and its re-timing always run, so every ratio has its floor; in the model\n"
                 "preset the floor and peft_bnb, the references of its ratios, always run):")
    width = max(map(len, PROVIDERS)) + 1
    for name, desc in PROVIDERS.items():
        lines.append(f"  {name:<{width}} {desc}")
    lines.append("  In the model preset: floor = the bf16 model with every parameter frozen and no adapter\n"
                 "  (forward + backward through every layer, no optimizer: the least a step costs), fused = lora_ops\n"
                 "  LoRA (apply_lora, dense bf16 bases, group_projections=False), fused_qlora = lora_ops QLoRA,\n"
                 "  fused_grouped / fused_qlora_grouped = the same with group_projections=True, apply_lora's\n"
                 "  default (q/k/v and gate/up of every layer\n"
                 "  one lora_linear call each; skipped when the groups do not form), peft = peft LoRA, peft_bnb =\n"
                 "  bitsandbytes Linear4bit (NF4, double quant) + peft LoRA, full_ft = every parameter trained\n"
                 "  (skipped when it does not fit); LoRA r=16, alpha=32 on q,k,v,o,gate,up,down, adapters in the\n"
                 "  model dtype; gradient checkpointing applied the same way to every provider of a case.\n"
                 "  Ratios: ratio_to_floor (CSV) = step time and peak memory / the floor's; the tables add tokens/s\n"
                 "  and peak memory x peft_bnb.\n"
                 "  In the block preset (the seven projections of one Llama-3-8B layer, fwd+bwd of the linear layers\n"
                 "  only, as one module whose q/k/v read one input and gate/up another): floor = the seven frozen\n"
                 "  bf16 linears, no adapter, input gradients flowing (every ratio's reference); floor_grouped =\n"
                 "  the floor with q/k/v and gate/up concatenated (the base GEMMs of a grouped call); fused /\n"
                 "  fused_qlora = lora_ops LoRA / QLoRA through apply_lora, *_grouped the same with\n"
                 "  group_projections=True; peft, peft_bnb as in the model preset; floor_repeat = the floor again.\n"
                 "  Aliases: " + ", ".join(f"{a} = {c}" for a, c in PROVIDER_ALIASES.items()))
    lines.append("\nmodes:")
    for name, desc in MODE_HELP.items():
        lines.append(f"  {name:<9} {desc}")
    lines.append(
        "\noutput: <out>/<gpu-slug>/results.csv (long format, merged with an existing CSV there: rows of the same\n"
        "preset/case/provider/mode are replaced, others kept), results.md (ends with '## Summary'), PNG plots.\n"
        "<gpu-slug> is e.g. 'h200' for an NVIDIA H200 and 'cpu' with --cpu.\n"
        "\nexamples:\n"
        "  python -m benchmarks --cpu                         # quick CPU run of the layer preset (~1 min)\n"
        "  python -m benchmarks --preset layer                # GPU\n"
        "  python -m benchmarks --preset decode nf4 --providers fused,peft_bnb --out /tmp/bench\n"
        "  python -m benchmarks --preset model --budget-s 420  # GPU: 16 layers, 1x2048, 4x2048 ckpt, 1x2048 no-ckpt\n"
        "  python -m benchmarks --preset block --budget-s 420  # GPU: a Llama-8B layer's projections, grouped or not\n"
        "  python -m benchmarks --cpu --preset block           # the same at tiny shapes on the CPU (~15 s)\n"
        "  python -m benchmarks --preset model --layers 4 --batch 4 --checkpointing off   # one smaller GPU case\n"
        "  python -m benchmarks --cpu --preset model           # tiny decoder on the CPU, the same three cases")
    return "\n".join(lines)


def _csv_list(kind: str, allowed: Sequence[str], aliases: Optional[dict] = None):
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        items = list(dict.fromkeys((aliases or {}).get(t, t) for t in items))
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {kind} {bad or text!r}; choose from {', '.join(allowed)} "
                                             "(comma-separated)")
        return items
    return parse


def _number(kind, low: float, strict: bool):
    """argparse type: a finite number >= low (> low when strict); nan/inf and negatives fail at parse time,
    not minutes later inside do_bench."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(v) or v < low or (strict and v == low):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number {'>' if strict else '>='} {low:g}")
        return v
    return parse


def _on_off(text: str) -> bool:
    """argparse type of --checkpointing: on / off (also true/false, yes/no, 1/0)."""
    t = text.strip().lower()
    if t in ("on", "true", "yes", "1"):
        return True
    if t in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not on or off (e.g. --checkpointing off)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time LoRA/QLoRA layer providers against the frozen bf16 floor, all in one process "
                    "(method: the docstring of benchmarks/harness.py).",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=["layer"], choices=sorted(PRESETS) + ["all"], metavar="NAME",
                    help="one or more of %(choices)s (default: layer)")
    ap.add_argument("--providers", type=_csv_list("provider", list(PROVIDERS), PROVIDER_ALIASES), default=None,
                    help="comma-separated providers to time (default: each case's full list)")
    ap.add_argument("--modes", type=_csv_list("mode", list(MODES)), default=None,
                    help="comma-separated modes to time (default: each case's modes)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="results root; files go to OUT/<gpu-slug>/ (default: benchmarks/results)")
    ap.add_argument("--cpu", action="store_true",
                    help="quick mode: small shapes, CPU tensors (fp32), time.perf_counter medians instead of "
                         "do_bench, memory columns n/a; finishes in a minute or two. lora_ops runs its PyTorch "
                         "reference path on the CPU (the fused kernels need a CUDA GPU): its rows are labelled "
                         "'fused (reference path)'")
    ap.add_argument("--warmup-ms", type=_number(float, 0, False), default=25.0,
                    help="do_bench warm-up time (default 25)")
    ap.add_argument("--rep-ms", type=_number(float, 0, True), default=100.0,
                    help="do_bench repetition time (default 100)")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler kernel/op counts")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    ap.add_argument("--threads", type=_number(int, 1, False), default=None,
                    help="torch CPU threads, recorded with the results (default: 1 with --cpu, since OpenMP "
                         "threads waiting on a busy shared machine made the quick mode 3x slower and noisier; "
                         "torch's default otherwise)")
    ap.add_argument("--budget-s", type=_number(float, 0, True), default=None,
                    help="start no new case (model preset: no new provider) after this many seconds (the rest is "
                         "recorded as skipped); e.g. 540 to finish within ten minutes, 420 for the model preset alone "
                         "(its last provider may still run ~1 min past it)")
    gpu_d, cpu_d = MODEL_DEFAULTS[False], MODEL_DEFAULTS[True]

    def runs(cpu: bool) -> str:
        return ", ".join(f"{b}x{'ckpt' if c else 'no-ckpt'}" for b, c in MODEL_RUNS[cpu])

    model_help = {
        "layers": f"decoder layers of the model preset, the same for every provider (default {gpu_d['layers']}; "
                  f"--cpu: {cpu_d['layers']})",
        "seq": f"sequence length of the model preset's random token ids (default {gpu_d['seq']}; --cpu: "
               f"{cpu_d['seq']})",
        "batch": f"batch size of every model case (tokens per step = batch x seq); default: the cases' own, "
                 f"batch x checkpointing {runs(False)} (--cpu: {runs(True)}); with --batch, each checkpointing "
                 "setting once at that batch",
        "steps": f"timed training steps per provider in the model preset (tokens/s = their median; default "
                 f"{gpu_d['steps']}; --cpu: {cpu_d['steps']})",
        "warmup_steps": f"untimed training steps before them (optimizer state, autotuning; default "
                        f"{gpu_d['warmup_steps']}; --cpu: {cpu_d['warmup_steps']})",
        "vocab": f"vocabulary of the model preset (default {ARCHS['llama3-8b']['vocab']}; 128256 is Llama-3's; "
                 f"--cpu: {ARCHS['tiny']['vocab']}); the case name says it when it is not the default",
        "checkpointing": "on: only the model cases with gradient checkpointing (transformers' "
                         "gradient_checkpointing_enable, use_reentrant=False, the same for every provider); off: "
                         "only those without (default: both)",
    }
    for key in MODEL_OPTIONS:
        kind = _on_off if key == "checkpointing" else _number(int, MODEL_MINIMUM[key], False)
        ap.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None,
                        metavar="on|off" if key == "checkpointing" else None, help=model_help[key])
    ap.add_argument("--list", action="store_true", help="print the selected cases and their plans, run nothing")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    presets = list(PRESETS) if "all" in args.preset else list(dict.fromkeys(args.preset))
    try:
        cases = select_cases(presets, args.cpu, args.providers, args.modes,
                             {k: getattr(args, k) for k in MODEL_OPTIONS})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cases:
        print(f"nothing to run: presets {presets} have no case with providers={args.providers} and "
              f"modes={args.modes}", file=sys.stderr)
        return 2
    if args.list:
        for c in cases:
            plan = "; ".join(f"{p}: {','.join(m)}" for p, m in c.plan)
            print(f"{c.preset:<7} {c.name:<32} {plan}")
        return 0

    from . import report
    from .harness import Device, Settings, device_slug, run_cases

    settings = Settings(cpu=args.cpu, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, profile=not args.no_profile,
                        seed=args.seed)
    try:
        dev = Device(settings)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.cpu and not args.quiet:
        print("CPU quick mode: lora_ops' rows run its PyTorch reference path (the fused kernels need a CUDA GPU); "
              "they are labelled 'fused (reference path)'", file=sys.stderr)
    if args.threads is None and args.cpu:
        args.threads = 1
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads {args.threads} must be >= 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.time()
    out_dir = Path(args.out) / device_slug(dev)
    try:  # an unwritable --out must fail now, not after the first case has been timed
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot write results under --out {args.out}: {e}", file=sys.stderr)
        return 2
    previous = report.read_csv(out_dir / "results.csv")  # fails early on a foreign CSV, before any timing

    def save(rows_so_far):
        report.write_csv(out_dir / "results.csv", report.merge_rows(previous, rows_so_far))

    rows, env = run_cases(cases, settings, argv, progress=not args.quiet, on_case=save, budget_s=args.budget_s)
    written = report.write_outputs(rows, out_dir)
    print(report.markdown(rows, f"This run: {', '.join(presets)} on {env['gpu']}"))
    skipped = sum(1 for r in rows if r["status"] == "skipped")
    print(f"done in {time.time() - t0:.0f}s: {len(rows)} rows ({skipped} skipped) -> {written['csv']} "
          f"({written['rows']} rows after merging), {written['markdown']}, "
          f"{len(written['plots'])} plot(s)")
    from .readme import default_csvs

    # Looked up now, not from readme.DEFAULT_CSVS: a first run on a new GPU has just created its directory.
    if Path(written["csv"]).resolve() in {p.resolve() for p in default_csvs()}:
        print("README.md's headline and docs/BENCHMARKS.md are generated from the results CSVs, this one included "
              "(each preset from the CSV with its newest run): run `python -m benchmarks.readme` and commit both "
              "with it (CI checks that they agree)")
    return 0
