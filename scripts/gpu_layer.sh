#!/usr/bin/env bash
# One device-tool call for the speed work: install, check the fused kernels on real shapes (TMA GEMM first; if
# it fails, unflattened, then off), time the `layer` preset (floor, fused, PEFT, PEFT+bnb), profile host time,
# print the summary table last. Results merge into benchmarks/results/<gpu>/ and come back as one tar under $OUT.
#
#   [MODEL_LAYERS=N MODEL_BUDGET=S] scripts/gpu_layer.sh [BUDGET_S (default 250)]
set -uo pipefail
OUT=${OUT:-/tmp/lora_ops_out}; mkdir -p "$OUT"
BUDGET=${1:-250}
source "$(dirname "$0")/gpu_install.sh"
# Pass LORA_OPS_GIT_COMMIT=<sha> from the calling machine: the device copy's .git can be stale.
export LORA_OPS_GIT_COMMIT=${LORA_OPS_GIT_COMMIT:-"unknown (set LORA_OPS_GIT_COMMIT when calling)"}
check() { python3 -m pytest tests/test_lora_gpu.py -k "real_shapes or launch_cache" -x -q -s -p no:cacheprovider >> "$OUT/gpu_tests.log" 2>&1; }
mode="TMA flattened"
if ! check; then
  mode="TMA unflattened"; export LORA_OPS_TMA_FLATTEN=0
  if ! check; then mode="TMA off (pointer GEMMs)"; export LORA_OPS_TMA=0; check || mode="$mode; CHECK FAILED"; fi
fi
grep -E "max rel|FAILED|Error" "$OUT/gpu_tests.log" | tail -30
python3 -m benchmarks --preset layer --providers floor,fused,peft,peft_bnb --out benchmarks/results \
  --budget-s "$BUDGET" > "$OUT/bench_layer.log" 2>&1; rc=$?
tar czf "$OUT/results.tar.gz" benchmarks/results 2>/dev/null
python3 scripts/host_profile.py --cases 2048x4096x4096 8192x4096x4096 --top 5 > "$OUT/host_profile.txt" 2>&1
if [ -n "${MODEL_LAYERS:-}" ]; then  # the model-level step (issue 11), same install
  python3 -m benchmarks --preset model --layers "$MODEL_LAYERS" --out benchmarks/results --budget-s "${MODEL_BUDGET:-150}" \
    > "$OUT/bench_model.log" 2>&1; echo "model preset rc=$?"
  tar czf "$OUT/results.tar.gz" benchmarks/results 2>/dev/null
fi
echo; echo "==== kernels: $mode | bench rc=$rc | commit $LORA_OPS_GIT_COMMIT ===="
grep -E "eager wall|^  (floor|fused|custom|launchers)" "$OUT/host_profile.txt"
grep -A60 "^## Summary" "$OUT/bench_layer.log" | head -60
[ -f "$OUT/bench_model.log" ] && tail -25 "$OUT/bench_model.log"
