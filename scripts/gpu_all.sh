#!/usr/bin/env bash
# The H200 runs in one device-tool call each: install, the decode GPU tests (when decode is among the presets),
# then the benchmark presets in priority order, each with a time budget so the call stays inside its 10 minutes
# (cases past a budget are recorded as skipped). Results merge into benchmarks/results/<gpu>/ and come back as one
# tar; the decode timing test's threshold file comes back as $OUT/decode_threshold.json, the logs as
# $OUT/logs.tar.gz (the tool returns at most 8 files). Summary last.
#
#   LORA_OPS_GIT_COMMIT=<sha> scripts/gpu_all.sh [PRESETS (default "decode rank tokens layer")]
#   LORA_OPS_GIT_COMMIT=<sha> scripts/gpu_all.sh model     # the model preset alone: its own 10-minute call
#   LORA_OPS_GIT_COMMIT=<sha> scripts/gpu_all.sh "host layer tokens rank"   # the host-path issue's presets
#   LORA_OPS_GIT_COMMIT=<sha> scripts/gpu_all.sh "block model"              # grouped projections
#
# The model preset (16 Llama-8B-shaped layers; 1x2048 and 4x2048 with gradient checkpointing, 1x2048 without;
# six providers) takes most of a call by itself, so it is not in the default list: it gets the time left in the
# call minus a reserve for its last provider and the outputs (MODEL_RESERVE_S, default 90 s) as --budget-s.
#
# Carry `.whl` (bitsandbytes, see docs/DESIGN.md "Running on a GPU machine").
set -uo pipefail
OUT=${OUT:-/tmp/lora_ops_out}; mkdir -p "$OUT"
PRESETS=${1:-"decode rank tokens layer"}
CALL_S=${CALL_S:-590}  # the device command's limit (600 s) less a margin for the summary and the archives
MODEL_RESERVE_S=${MODEL_RESERVE_S:-90}
t0=$(date +%s)
el() { echo "$(( $(date +%s) - t0 ))s"; }
left() { echo "$(( CALL_S - $(date +%s) + t0 ))"; }
source "$(dirname "$0")/gpu_install.sh"
export LORA_OPS_GIT_COMMIT=${LORA_OPS_GIT_COMMIT:-"unknown (set LORA_OPS_GIT_COMMIT when calling)"}
echo "install done $(el)"
if [[ " $PRESETS " == *" decode "* ]]; then
  timeout 150 python3 -m pytest tests/test_decode.py -m gpu -q -s -p no:cacheprovider > "$OUT/decode_tests.log" 2>&1
  echo "decode tests rc=$? $(el): $(tail -1 "$OUT/decode_tests.log")"
fi
for preset in $PRESETS; do
  limit=170
  case $preset in
    decode) args=(--budget-s 90) ;;
    # The block and q/k/v, gate/up alone, all providers: ~60 s for the block. No torch.profiler pass: its CUPTI
    # state stays attached after each session and slows every later launch in the process, most in the host-bound
    # q/k/v 2048 case (docs/PERF_NOTES.md item 34), so the kernels / ops columns of these rows stay empty.
    block) args=(--budget-s 240 --no-profile); limit=330 ;;
    model)
      budget=$(( $(left) - MODEL_RESERVE_S ))
      if [ "$budget" -lt 60 ]; then
        echo "preset model skipped: ${budget}s of budget left in this call; run scripts/gpu_all.sh model alone"
        continue
      fi
      args=(--budget-s "$budget"); limit=$(( $(left) - 10 )) ;;
    *) args=(--providers floor,fused,peft,peft_bnb --budget-s 70) ;;
  esac
  timeout "$limit" python3 -m benchmarks --preset "$preset" "${args[@]}" --out benchmarks/results \
    > "$OUT/bench_$preset.log" 2>&1
  echo "preset $preset rc=$? $(el): $(tail -2 "$OUT/bench_$preset.log" | head -1)"
  tar czf "$OUT/results.tar.gz" benchmarks/results 2>/dev/null
done
echo; echo "==== commit $LORA_OPS_GIT_COMMIT, total $(el) ===="
if [ -f "$OUT/decode_tests.log" ]; then
  grep -E "^(FAILED|ERROR)|target NF4|nf4 +M= ?1:|nf4 +M=16:|dense +M= ?1:" "$OUT/decode_tests.log" | head -12
fi
for preset in $PRESETS; do
  [ -f "$OUT/bench_$preset.log" ] || continue
  echo "---- $preset ----"
  if [ "$preset" = model ]; then  # its summary: the target lines and the table with both ratios
    grep -A40 "^## Summary" "$OUT/bench_$preset.log" | grep -E "^Target|^\| " | head -30
  else
    grep -A60 "^## Summary" "$OUT/bench_$preset.log" | grep -E "fused|floor \||peft_bnb|tokens/s|target" | head -30
  fi
done
# The device tool returns at most 8 files: the logs travel as one archive.
(cd "$OUT" && tar czf logs.tar.gz ./*.log && rm -f ./*.log)
