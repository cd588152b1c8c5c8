#!/usr/bin/env bash
# The test command: sets up its own venv (scripts/setup_venv.sh), compiles csrc/*.cu for sm_90 when nvcc
# exists, then runs the CPU test suite (GPU tests skip without CUDA; Triton runs in its interpreter).
#   scripts/test.sh [PYTEST ARGS]         (VENV=dir to choose the venv, default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
bash scripts/setup_venv.sh "$VENV"
if command -v nvcc >/dev/null 2>&1 && [ -f scripts/compile_csrc.sh ]; then bash scripts/compile_csrc.sh; fi
# pytest exits 5 when it collects nothing: with set -e that fails this script, as it should.
"$VENV/bin/python" -m pytest tests -q "$@"
