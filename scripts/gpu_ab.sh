#!/usr/bin/env bash
# One device-tool call that A/B-times launcher settings: install, then scripts/profile_layer.py (fwd+bwd replayed
# from a CUDA graph: device time only, fused vs the floor) once per environment variant, each in its own process
# (the settings are read at import). Prints one line per case and variant.
#
#   scripts/gpu_ab.sh "LORA_OPS_NF4_CHUNK_MIB=32" "LORA_OPS_NF4_CHUNK_MIB=1024" "LORA_OPS_NF4_CHUNK_MIB=32 LORA_OPS_TMA=1"
#   CASES="256x4096x4096 2048x4096x4096" scripts/gpu_ab.sh "LORA_OPS_SPLIT_MAX_M=0" "LORA_OPS_SPLIT_MAX_M=4096"
#   AB_CMD="python3 -m benchmarks --preset model --layers 16 --batch 1 --providers floor,fused_qlora --quiet" \
#     AB_GREP="^Target|fused_qlora" scripts/gpu_ab.sh "LORA_OPS_NF4_CHUNK_MIB=32" "LORA_OPS_NF4_CHUNK_MIB=1024"
#
# CASES: M x K x N list (default the chunked NF4 layers and 2048 x 4096->4096); PROFILE_ARGS (default
# "--both --no-tables"); AB_CMD: another command to run per variant instead (its output lines matching AB_GREP
# are printed; its --out, if any, should differ per variant). Everything goes to $OUT/ab.log: one file, as the
# device tool returns at most 8. Carry `.whl` (bitsandbytes, see docs/DESIGN.md "Running on a GPU machine").
set -uo pipefail
OUT=${OUT:-/tmp/lora_ops_out}; mkdir -p "$OUT"
CASES=${CASES:-"8192x4096x14336 8192x14336x4096 2048x4096x4096"}
PROFILE_ARGS=${PROFILE_ARGS:-"--both --no-tables"}
source "$(dirname "$0")/gpu_install.sh"
for variant in "$@"; do
  echo "---- $variant" | tee -a "$OUT/ab.log"
  if [ -n "${AB_CMD:-}" ]; then
    # shellcheck disable=SC2086
    env $variant bash -c "$AB_CMD" 2>&1 | tee -a "$OUT/ab.log" | grep -E "${AB_GREP:-.}|Error" | sed "s/^/[$variant] /"
  else
    # shellcheck disable=SC2086
    env $variant python3 scripts/profile_layer.py --cases $CASES $PROFILE_ARGS 2>&1 | tee -a "$OUT/ab.log" \
      | grep -E "^==== |Error" | sed "s/^/[$variant] /"
  fi
done
