#!/usr/bin/env bash
# Device-tool call for the decode kernel: run the standalone timing (build/decode_bench, built here by
# scripts/build_decode_bench.sh and carried: `carry: ["build"]`) and, where the hardware counters can be read,
# an Nsight Compute profile of one NF4 call at M=1 and M=16. No install needed. Logs under $OUT.
#   scripts/gpu_decode.sh [--ncu] [decode_bench arguments]
set -uo pipefail
OUT=${OUT:-/tmp/lora_ops_out}; mkdir -p "$OUT"
NCU=0
if [ "${1:-}" = "--ncu" ]; then NCU=1; shift; fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
timeout 180 build/decode_bench "$@" 2>&1 | tee "$OUT/decode_bench.log"
if [ "$NCU" = 1 ]; then
  for m in 1 16; do
    timeout 120 ncu --clock-control none -k regex:lora_decode_tc --launch-skip 12 --launch-count 1 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
      --section LaunchStats --section SchedulerStats \
      build/decode_bench --formats nf4 --ms "$m" --diag 0 > "$OUT/ncu_nf4_m$m.txt" 2>&1
    echo "ncu M=$m rc=$?"
    grep -E "Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued|Issued Warp|No Eligible|L2 Hit|Mem Busy|Max Bandwidth|Theoretical Occ|Block Limit|Waves" "$OUT/ncu_nf4_m$m.txt" | head -40
  done
fi
