"""The lora_ops benchmark harness: ``python -m benchmarks --help``.

Providers (floor, floor_repeat, full_ft, unfused, peft, peft_bnb, fused; copy and bnb for NF4 dequantize) are
timed on the same tensors per case, in one process, and reported as ratios to the floor of the same run, with
achieved TFLOP/s and GB/s against ceilings measured at the start, peak extra memory, kernel launches and op
calls. Results: one long-format CSV, a markdown table and PNG plots under ``benchmarks/results/<gpu-slug>/``.
The method is described in benchmarks/harness.py. The ``model`` preset (benchmarks/model.py) times whole
training steps of a Llama-3-8B-shaped decoder instead, as tokens/s and peak memory with ratios to PEFT +
bitsandbytes. ``python -m benchmarks.readme`` regenerates README.md's headline table and docs/BENCHMARKS.md's
tables from the H200 CSV.
"""
from .harness import Settings, run_cases
from .presets import PRESETS, PROVIDERS, Case, select_cases
from .report import COLUMNS, add_ratios, markdown, merge_rows, read_csv, write_csv

__all__ = ["Settings", "run_cases", "PRESETS", "PROVIDERS", "Case", "select_cases", "COLUMNS", "add_ratios",
           "markdown", "merge_rows", "read_csv", "write_csv", "main"]


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)
