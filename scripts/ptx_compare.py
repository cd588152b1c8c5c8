"""Whether two checkouts compile the NF4 kernels to the same sm_90 code, without a GPU.

    python scripts/ptx_compare.py OLD_ROOT NEW_ROOT        (e.g. two `git worktree add` checkouts)

Compiles ``triton_kernels.nf4_dequant._nf4_dequant_kernel`` and ``triton_kernels.lora_kernels._lora_gemm_kernel``
of each checkout for sm_90 (Triton's compiler with a GPUTarget; ptxas is not run) in the configurations the
launchers use for NF4 weights (plain and double-quantized absmax; the forward and the dX GEMM), in a subprocess per
checkout, and compares the PTX code sections (comments and debug sections removed: they hold file names and
line numbers). Prints one line per configuration and exits 1 when any differs. Configurations a checkout's kernels
lack (a constexpr the older one does not have) are compiled in the newer one only, to show that they compile.

A kernel change meant to leave the existing variants alone (a new constexpr, default False) can show here that
the compiled code of every existing variant is byte for byte the same, so that GPU measurements of the old
kernels still describe it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

_PROBE = r"""
import inspect, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, sys.argv[1])
import triton_kernels.lora_kernels as lk
import triton_kernels.nf4_dequant as dq
assert dq.__file__.startswith(sys.argv[1]), dq.__file__
I64 = {"n_elements", "n_bytes", "n_blocks", "win_blocks", "row_blocks", "col0_blocks"}
out = {}


def build(tag, fn, consts, ptrs, floats=(), opts=None, extra=None):
    consts = dict(consts)
    for name, value in (extra or {}).items():
        if name not in fn.arg_names:
            return
        consts[name] = value
    for name in fn.arg_names:  # constexprs with defaults this probe does not set: their defaults
        p = fn.params[fn.arg_names.index(name)]
        if p.is_constexpr and name not in consts and p.default is not inspect.Parameter.empty:
            consts[name] = p.default
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "*bf16") if n.endswith("_ptr") else
           "fp32" if n in floats else "i64" if n in I64 else "i32" for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")}
    ptx = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                         options=opts or {}).asm["ptx"]
    ptx = re.split(r"\n\s*\.section\s+\.debug", ptx)[0]
    ptx = re.sub(r"//[^\n]*|\.loc[^\n]*|\.file[^\n]*", "", ptx)
    out[tag] = re.sub(r"_nf4_dequant_kernel\w*|_lora_gemm_kernel\w*", "KERNEL", ptx)


dq_ptrs = {"packed_ptr": "*u8", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32",
           "codebook_ptr": "*fp32", "out_ptr": "*bf16"}
g_ptrs = {"w_ptr": "*u8", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset_ptr": "*fp32",
          "codebook_ptr": "*fp32", "seed_ptr": "*i64", "l_ptr": "*fp32"}
for nested in (True, False):
    consts = {"HALF_BS": 32, "NB": dq.BYTES_PER_PROGRAM // 32, "NESTED": nested, "NESTED_BS": 256, "VEC": 4}
    build(f"nf4_dequant nested={nested}", dq._nf4_dequant_kernel, consts,
          dict(dq_ptrs, absmax_ptr="*u8" if nested else "*fp32"), opts={"num_warps": 4, "enable_fp_fusion": False})
    for trans in (True, False):
        consts = dict(TRANS_W=trans, IS_NF4=True, NESTED=nested, BLOCKSIZE=64, HAS_BIAS=trans,
                      HAS_DROPOUT=not trans, WRITE_L=True, GROUPED=False, SEG_A=False, BLOCK_M=64, BLOCK_N=64,
                      BLOCK_K=64, BLOCK_R=16, GROUP_M=8)
        build(f"lora_gemm {'forward' if trans else 'dX'} nested={nested}", lk._lora_gemm_kernel, consts,
              dict(g_ptrs, absmax_ptr="*u8" if nested else "*fp32"), floats=("scaling", "drop_scale"),
              opts={"num_warps": 4, "num_stages": 3, "enable_fp_fusion": not nested})
consts = {"HALF_BS": 32, "NB": dq.BYTES_PER_PROGRAM // 32, "NESTED": True, "NESTED_BS": 256, "VEC": 4}
build("nf4_dequant NESTED_OFFSETS", dq._nf4_dequant_kernel, consts, dict(dq_ptrs, absmax_ptr="*u8"),
      opts={"num_warps": 4, "enable_fp_fusion": False}, extra={"NESTED_OFFSETS": True})
for trans in (True, False):
    consts = dict(TRANS_W=trans, IS_NF4=True, NESTED=True, BLOCKSIZE=64, HAS_BIAS=trans, HAS_DROPOUT=not trans,
                  WRITE_L=True, GROUPED=trans, SEG_A=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_R=16, GROUP_M=8)
    build(f"lora_gemm {'forward' if trans else 'dX'} NESTED_OFFSETS", lk._lora_gemm_kernel, consts,
          dict(g_ptrs, absmax_ptr="*u8"), floats=("scaling", "drop_scale"),
          opts={"num_warps": 4, "num_stages": 3, "enable_fp_fusion": False}, extra={"NESTED_OFFSETS": True})
print(json.dumps(out))
"""


def compile_root(root: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _PROBE, os.path.abspath(root)], capture_output=True, text=True,
                         env=env, cwd=os.path.abspath(root))
    if res.returncode != 0:
        raise SystemExit(f"compiling the kernels of {root} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__)
        return 2
    old, new = (compile_root(r) for r in argv)
    differ = 0
    for tag in sorted(set(old) | set(new)):
        digest = {k: hashlib.sha256(v[tag].encode()).hexdigest()[:12] for k, v in (("old", old), ("new", new))
                  if tag in v}
        if len(digest) == 1:
            print(f"{tag}: only in {next(iter(digest))} (compiles)")
        elif digest["old"] == digest["new"]:
            print(f"{tag}: identical ({digest['old']})")
        else:
            differ += 1
            print(f"{tag}: DIFFERENT ({digest['old']} / {digest['new']})")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
