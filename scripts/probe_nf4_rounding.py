"""GPU probe: where our NF4 quantize and bitsandbytes' CUDA quantize disagree on large random weights, which
formula of the scaled value (IEEE reciprocal, approximate reciprocal, division) reproduces bitsandbytes?
Prints one line per mismatching element. Run on the GPU machine with bitsandbytes' CUDA build importable."""
import struct
import sys

import torch
import triton
import triton.language as tl

import bitsandbytes.functional as F
import lora_ops
from lora_ops import nf4


@triton.jit
def _variants(w_ptr, a_ptr, out_ptr, n):
    i = tl.arange(0, 16)
    m = i < n
    w = tl.load(w_ptr + i, mask=m, other=1.0)
    a = tl.load(a_ptr + i, mask=m, other=1.0)
    rcp_approx = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [a], dtype=tl.float32,
                                           is_pure=True, pack=1)
    rcp_rn = tl.inline_asm_elementwise("rcp.rn.f32 $0, $1;", "=r,r", [a], dtype=tl.float32, is_pure=True, pack=1)
    div_full = tl.inline_asm_elementwise("div.full.f32 $0, $1, $2;", "=r,r,r", [w, a], dtype=tl.float32,
                                         is_pure=True, pack=1)
    div_rn = tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=r,r,r", [w, a], dtype=tl.float32,
                                       is_pure=True, pack=1)
    mul_approx = tl.inline_asm_elementwise("mul.ftz.f32 $0, $1, $2;", "=r,r,r", [w, rcp_approx],
                                           dtype=tl.float32, is_pure=True, pack=1)
    mul_rn = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [w, rcp_rn], dtype=tl.float32,
                                       is_pure=True, pack=1)
    tl.store(out_ptr + i * 4 + 0, mul_rn, mask=m)
    tl.store(out_ptr + i * 4 + 1, mul_approx, mask=m)
    tl.store(out_ptr + i * 4 + 2, div_full, mask=m)
    tl.store(out_ptr + i * 4 + 3, div_rn, mask=m)


def hexf(x):
    return struct.pack(">f", x).hex()


def main():
    dev = torch.device("cuda")
    bounds = torch.tensor(nf4.NF4_BOUNDS, device=dev)
    total = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for seed in range(3):
            g = torch.Generator(device=dev).manual_seed(seed)
            w = (torch.randn(4096, 14336, generator=g, device=dev) * 0.02).to(dtype)
            ours = lora_ops.quantize_nf4(w, 64, double_quant=False).data.view(-1)
            bq, st = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
            bq = bq.view(-1)
            bad = (ours != bq).nonzero().flatten()
            print(f"{dtype} seed {seed}: {bad.numel()} of {bq.numel()} bytes differ")
            flat = w.reshape(-1).float()
            for b in bad[:16].tolist():
                for half, shift in ((0, 4), (1, 0)):
                    e = 2 * b + half
                    co, cb = (int(ours[b]) >> shift) & 15, (int(bq[b]) >> shift) & 15
                    if co == cb:
                        continue
                    a = st.absmax[e // 64].float()
                    out = torch.empty(4, device=dev)
                    _variants[(1,)](flat[e:e + 1].contiguous(), a.reshape(1).contiguous(), out, 1)
                    v = out.tolist()
                    codes = [int((torch.tensor(x, device=dev) > bounds).sum()) for x in v]
                    print(f"  elem {e}: w={flat[e].item()!r} absmax={a.item()!r} ours={co} bnb={cb} | "
                          f"mul_rn {hexf(v[0])}->{codes[0]}  mul_rcp_approx {hexf(v[1])}->{codes[1]}  "
                          f"div_full {hexf(v[2])}->{codes[2]}  div_rn {hexf(v[3])}->{codes[3]}  "
                          f"bound {hexf(nf4.NF4_BOUNDS[min(co, cb)])}")
                    total += 1
    print(f"probe done: {total} mismatching elements examined")
    return 0


if __name__ == "__main__":
    sys.exit(main())
