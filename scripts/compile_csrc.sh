#!/usr/bin/env bash
# Compiles every csrc/*.cu for sm_90 with this machine's nvcc (ptxas runs, so register/encoding errors show),
# into a temporary directory that is removed afterwards. No GPU and no torch needed: the .cu files are
# torch-free by design, so they compile without a GPU or torch. Exits non-zero on the first failure.
#   scripts/compile_csrc.sh            (NVCC=/path/to/nvcc to pick another compiler)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "compile_csrc.sh: $NVCC not found; install the CUDA toolkit or set NVCC" >&2
  exit 1
fi
shopt -s nullglob
files=(csrc/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "compile_csrc.sh: no csrc/*.cu to compile" >&2
  exit 1
fi
# The flags setup.py and the JIT build use (one list, lora_ops/lora_build_flags.py, read without importing
# torch); they include -gencode=arch=compute_90,code=sm_90, which is what makes ptxas run here.
flags=$(python3 -c "import runpy; print(' '.join(runpy.run_path('lora_ops/lora_build_flags.py')['NVCC_FLAGS']))" \
        2>/dev/null || echo "-O3 -std=c++17 -gencode=arch=compute_90,code=sm_90")
case " $flags " in *" -gencode=arch=compute_90,code=sm_90 "*) ;; *) flags="$flags -gencode=arch=compute_90,code=sm_90" ;; esac
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "nvcc: $("$NVCC" --version | tail -1)"
for f in "${files[@]}"; do
  obj="$tmp/$(basename "$f" .cu).o"
  # shellcheck disable=SC2086
  "$NVCC" -c $flags -Icsrc -Xptxas -warn-spills -o "$obj" "$f"
  echo "compiled $f for sm_90 ($(wc -c < "$obj") bytes of object code)"
done
echo "compile_csrc.sh: ${#files[@]} file(s) OK"
