#!/usr/bin/env bash
# Create (or reuse) a virtual environment with everything the tests and the demo need, CPU only.
#   scripts/setup_venv.sh [VENV_DIR]      (default .venv; FRESH=1 deletes it first)
# torch==2.13.0 goes in first so that nothing later pulls a multi-GB CUDA build of torch. Any failing pip step
# stops the script with pip's own output.
set -euo pipefail
VENV=${1:-${VENV:-.venv}}
cd "$(dirname "$0")/.."
if [ "${FRESH:-0}" = 1 ]; then rm -rf "$VENV"; fi
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
PY="$VENV/bin/python"

# pip quietly: on failure all of pip's output and its exit status; on success only its ERROR lines (pip reports
# dependency conflicts that way and still exits 0), not the build backend's notices.
pip_q() {
  local log rc=0
  log=$(mktemp)
  "$PY" -m pip install -q "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    grep -v '^WARNING: Location' "$log" >&2 || true
    rm -f "$log"
    echo "setup_venv.sh: pip install $* failed (exit $rc)" >&2
    exit "$rc"
  fi
  grep '^ERROR' "$log" >&2 || true
  rm -f "$log"
}

pip_q --upgrade pip
pip_q torch==2.13.0
# Pinned to what the GPU machine runs where possible (triton 3.6, peft 0.21, transformers 5.17); triton 3.6's
# interpreter needs numpy < 2.4.
pip_q triton==3.6.0 'numpy<2.4' bitsandbytes==0.50.2 peft==0.21.0 transformers==5.17.0 \
    safetensors pytest hypothesis matplotlib tqdm
pip_q --no-build-isolation -e .
"$PY" -c "import torch, lora_ops; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('venv ready:', '$VENV', 'torch', torch.__version__, 'lora_ops', lora_ops.__version__)"
