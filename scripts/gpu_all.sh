#!/usr/bin/env bash
# The full H200 run in one device-tool call (issue 11): install, the decode GPU tests, then the
# benchmark presets in priority order, each with a time budget so the call stays inside its 10 minutes (cases
# past a budget are recorded as skipped). Results merge into benchmarks/results/<gpu>/ and come back as one tar;
# the decode timing test's threshold file comes back as $OUT/decode_threshold.json, the logs as
# $OUT/logs.tar.gz (the tool returns at most 8 files). Summary last.
#
#   LORA_OPS_GIT_COMMIT=<sha> scripts/gpu_all.sh [PRESETS (default "decode rank tokens layer model")]
#
# Carry `.whl` (bitsandbytes, see README "Notes").
set -uo pipefail
OUT=${OUT:-/tmp/lora_ops_out}; mkdir -p "$OUT"
PRESETS=${1:-"decode rank tokens layer model"}
t0=$(date +%s)
el() { echo "$(( $(date +%s) - t0 ))s"; }
source "$(dirname "$0")/gpu_install.sh"
export LORA_OPS_GIT_COMMIT=${LORA_OPS_GIT_COMMIT:-"unknown (set LORA_OPS_GIT_COMMIT when calling)"}
echo "install done $(el)"
timeout 150 python3 -m pytest tests/test_decode.py -m gpu -q -s -p no:cacheprovider > "$OUT/decode_tests.log" 2>&1
echo "decode tests rc=$? $(el): $(tail -1 "$OUT/decode_tests.log")"
for preset in $PRESETS; do
  case $preset in
    decode) args=(--budget-s 90) ;;
    model) args=(--layers 4 --budget-s 50) ;;
    *) args=(--providers floor,fused,peft,peft_bnb --budget-s 70) ;;
  esac
  timeout 170 python3 -m benchmarks --preset "$preset" "${args[@]}" --out benchmarks/results \
    > "$OUT/bench_$preset.log" 2>&1
  echo "preset $preset rc=$? $(el): $(tail -2 "$OUT/bench_$preset.log" | head -1)"
  tar czf "$OUT/results.tar.gz" benchmarks/results 2>/dev/null
done
echo; echo "==== commit $LORA_OPS_GIT_COMMIT, total $(el) ===="
grep -E "^(FAILED|ERROR)|target NF4|nf4 +M= ?1:|nf4 +M=16:|dense +M= ?1:" "$OUT/decode_tests.log" | head -12
for preset in $PRESETS; do
  echo "---- $preset ----"
  grep -A60 "^## Summary" "$OUT/bench_$preset.log" | grep -E "fused|floor \||peft_bnb|tokens/s|target" | head -30
done
# The device tool returns at most 8 files: the logs travel as one archive.
(cd "$OUT" && tar czf logs.tar.gz ./*.log && rm -f ./*.log)
