#!/usr/bin/env bash
# Builds scripts/decode_bench.cu (the standalone decode-kernel timing, see its header) into build/decode_bench
# with the decode kernel's diagnostics compiled in. Runs here (nvcc, no GPU needed); carry build/ to the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
flags=$(python3 -c "import runpy; print(' '.join(runpy.run_path('lora_ops/lora_build_flags.py')['NVCC_FLAGS']))")
# shellcheck disable=SC2086
nvcc $flags -DLORA_OPS_DECODE_DIAG=1 -Icsrc -Xptxas -warn-spills csrc/lora_decode.cu scripts/decode_bench.cu \
  -o build/decode_bench "$@"
echo "built build/decode_bench"
