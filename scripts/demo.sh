#!/usr/bin/env bash
# The main job on a fresh machine: set up the venv, run the NF4 demo (quantize, check against bitsandbytes,
# a QLoRA step), then the benchmark harness in its CPU quick mode, printing its progress, a summary table and
# where the CSV, the full report and the plots went.
#   scripts/demo.sh [--profile]      (--profile: also count kernels and ops per call with torch.profiler, which
#                                     prints two lines of its own per timed call)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PROFILE=0
for arg in "$@"; do
  case "$arg" in
    --profile) PROFILE=1 ;;
    *) echo "demo.sh: unknown argument $arg (only --profile)" >&2; exit 2 ;;
  esac
done
PY="$VENV/bin/python"

echo "== setting up $VENV"
bash scripts/setup_venv.sh "$VENV"

echo "== NF4 quantize, byte comparison with bitsandbytes, one QLoRA forward/backward"
"$PY" examples/nf4_demo.py

echo "== benchmark harness, CPU quick mode (a minute or two)"
out=benchmarks/results
log=$(mktemp)
trap 'rm -f "$log"' EXIT
flags=(--cpu --out "$out")
if [ "$PROFILE" = 0 ]; then flags+=(--no-profile); fi
# bitsandbytes' CPU backend logs "Failed to load CPU gemm_4bit_forward from kernels-community" when the optional
# `kernels` package (which would fetch a CPU kernel from the Hugging Face hub) is absent, and then uses its own
# CPU code. It concerns only the PEFT+bitsandbytes comparison rows, so that one line is dropped here.
"$PY" -m benchmarks "${flags[@]}" 2>&1 1>"$log" \
  | { grep --line-buffered -v "Failed to load CPU gemm_4bit_forward" || true; } >&2
# The run's stdout is its full report; the demo shows the summary table and where everything went.
awk '/^## Summary/{on=1} on' "$log" | grep -v '^done in'
grep '^done in' "$log" || true
echo "Full report: $out/cpu/results.md (every case, every metric); plots: $out/cpu/*.png"
