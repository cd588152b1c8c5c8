#!/usr/bin/env bash
# One device-tool call: install (carried wheels + this project, no network), optionally write the NF4 golden
# vectors, run the GPU tests, time benchmark presets, print a short table last. Full logs go under $OUT.
#
#   scripts/gpu_check.sh [--golden] [--tests "PYTEST ARGS (default: tests -m gpu)"] [--no-tests] [--bench "layer decode ..."]
#
# Carry `.whl` (bitsandbytes==0.50.2 for cp312 manylinux x86_64; see docs/DESIGN.md "Running on a GPU machine") with the call.
set -uo pipefail
OUT=${OUT:-/tmp/lora_ops_out}
mkdir -p "$OUT"
GOLDEN=0; TESTS="tests -m gpu"; RUN_TESTS=1; BENCH=""
while [ $# -gt 0 ]; do
  case "$1" in
    --golden) GOLDEN=1 ;;
    --tests) TESTS="$2"; shift ;;
    --no-tests) RUN_TESTS=0 ;;
    --bench) BENCH="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
t0=$(date +%s)
# A configuration whose C++ launch list differs from the Python launchers' raises in the tests instead of warning.
export LORA_OPS_LAUNCH_STRICT=${LORA_OPS_LAUNCH_STRICT:-1}
source "$(dirname "$0")/gpu_install.sh"
t_install=$(( $(date +%s) - t0 ))
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton, lora_ops, importlib
def v(m):
    try: return importlib.import_module(m).__version__
    except Exception as e: return f"unavailable ({type(e).__name__})"
print("gpu", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| bitsandbytes", v("bitsandbytes"), "| peft", v("peft"), "| transformers", v("transformers"))
try:
    import lora_ops._ext as e; print("lora_ops._C: loaded from", e.origin() if hasattr(e, "origin") else "ok")
except Exception as ex:
    print("lora_ops._C unavailable:", ex)
PY
summary=()
if [ "$GOLDEN" = 1 ]; then
  python3 scripts/make_golden.py --out "$OUT" --fast 2>&1 | tee "$OUT/golden.log" | tail -40
  summary+=("golden: $(tail -1 "$OUT/golden.log")")
fi
if [ "$RUN_TESTS" = 1 ]; then
  # shellcheck disable=SC2086
  python3 -m pytest $TESTS -q -s -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)|max rel|GB/s|ms " "$OUT/gpu_tests.log" | head -60
  summary+=("pytest $TESTS (rc=$rc): $(tail -1 "$OUT/gpu_tests.log")")
fi
for preset in $BENCH; do
  python3 -m benchmarks --preset "$preset" --out benchmarks/results > "$OUT/bench_$preset.log" 2>&1
  rc=$?
  summary+=("bench $preset (rc=$rc): $(tail -1 "$OUT/bench_$preset.log")")
done
if [ -n "$BENCH" ]; then
  tar czf "$OUT/results.tar.gz" benchmarks/results 2>/dev/null
fi
echo
echo "==== summary (install ${t_install}s, total $(( $(date +%s) - t0 ))s) ===="
for s in "${summary[@]}"; do echo "$s"; done
for preset in $BENCH; do
  echo "---- $preset ----"; grep -A80 "^## Summary" "$OUT/bench_$preset.log" | head -80
done
