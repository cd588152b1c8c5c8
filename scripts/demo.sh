#!/usr/bin/env bash
# The main job on a fresh machine: set up the venv, run the NF4 demo (quantize, check against bitsandbytes,
# a QLoRA step), then the benchmark harness in its CPU quick mode.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
bash scripts/setup_venv.sh "$VENV"
"$VENV/bin/python" examples/nf4_demo.py
if [ -f benchmarks/__main__.py ]; then "$VENV/bin/python" -m benchmarks --cpu; fi
