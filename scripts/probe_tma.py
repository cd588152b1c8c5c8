"""GPU probe: device time of the persistent TMA GEMM per tile config, next to cuBLAS's product of the same
operands (torch.mm): forward y = S·Bᵀ + x·Wᵀ and dX = dS·A + dY·W, the LoRA term at rank r seeding the
accumulator, at the shapes where the grouped and single layers lose most to the floor. Whether another tile, raster
group, warp count or stage count than lora.py's _TMA_CONFIGS closes part of the gap to cuBLAS.

    python scripts/probe_tma.py [--shapes 8192x4096x6144x48,8192x4096x14336x16] [--configs 128x256x64x8x8x3,...]

A shape is MxKxNxR[xS] (x (M, K), W (N, K), rank R; with S > 1 the LoRA term's L arrives as S fp32 slices that
the kernel sums, as the S / dS passes hand them with LORA_OPS_SPLIT_PRESUM=0 at up to 2048 rows); a config
BMxBNxBKxGROUP_MxWARPSxSTAGES. Each line: do_bench median µs (L2 flushed before each call), the ratio to cuBLAS,
and the output's error against an fp32 product.
``LORA_OPS_TMA_FLATTEN=1`` times the flattened tile loop instead.
"""
import argparse
import time

import torch
from triton.testing import do_bench

from lora_ops.triton_kernels import lora as L

SHAPES = "8192x4096x6144x48,8192x4096x14336x16,2048x4096x6144x48,8192x14336x4096x16"
CONFIGS = ("128x256x64x8x8x3,128x256x64x4x8x3,128x256x64x16x8x3,256x128x64x8x8x3,128x128x64x8x4x4,"
           "128x128x64x8x8x4,128x256x32x8x8x4,64x256x64x8x4x4")


def _config(text):
    bm, bn, bk, group, warps, stages = (int(v) for v in text.split("x"))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group), warps, stages


def _us(fn, cuda=True):
    if cuda:
        return do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
    fn()  # the interpreter (a smoke run of this script on the CPU): one timed call
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated MxKxNxR")
    ap.add_argument("--configs", default=CONFIGS, help="comma-separated BMxBNxBKxGROUP_MxWARPSxSTAGES")
    ap.add_argument("--device", default="cuda", help="cpu: under TRITON_INTERPRET=1, with --dtype float16")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    dt, dev = getattr(torch, args.dtype), args.device
    cuda = torch.device(dev).type == "cuda"
    configs = [_config(c) for c in args.configs.split(",")]
    for shape in args.shapes.split(","):
        m, k, n, r, *rest = (int(v) for v in shape.split("x"))
        splits = rest[0] if rest else 1
        x = torch.randn(m, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5
        dy = torch.randn(m, n, device=dev, dtype=dt)
        a = torch.randn(r, k, device=dev, dtype=dt) / k ** 0.5
        b = torch.randn(n, r, device=dev, dtype=dt)
        s = torch.randn(m, r, device=dev, dtype=dt)
        lt = s if splits == 1 else torch.randn(splits, m, r, device=dev, dtype=torch.float32) / splits
        if splits > 1:
            s = lt.sum(0).to(dt)  # what the kernel sums and rounds
        y = torch.empty(m, n, device=dev, dtype=dt)
        dx = torch.empty(m, k, device=dev, dtype=dt)
        no_drop = L._Dropout(0.0, None, x)
        cases = {  # direction: (cuBLAS's product, the TMA GEMM's call)
            "forward": (lambda: torch.mm(x, w.t(), out=y),
                        lambda: L._tma_gemm(x, w, y, lt, b, b.stride(1), b.stride(0), None, no_drop, 1.0, True, r, n,
                                            0)),
            "dX": (lambda: torch.mm(dy, w, out=dx),
                   lambda: L._tma_gemm(dy, w, dx, lt, a, a.stride(0), a.stride(1), None, no_drop, 1.0, False, r, k,
                                       0)),
        }
        want = {"forward": (x.float() @ w.float().t() + s.float() @ b.float().t(), y),
                "dX": (dy.float() @ w.float() + s.float() @ a.float(), dx)}
        print(f"M={m} K={k} N={n} r={r} L slices={splits}")
        for direction, (cublas, tma) in cases.items():
            base = _us(cublas, cuda)
            print(f"  {direction}: cuBLAS {base:8.1f} us")
            saved = L._TMA_CONFIGS
            for blocks, warps, stages in configs:
                L._TMA_CONFIGS = ((0, blocks, warps, stages),)
                name = "x".join(str(v) for v in (*blocks.values(), warps, stages))
                try:
                    us = _us(tma, cuda)
                    ref, out = want[direction]
                    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()  # a config must also be right
                    print(f"    {name:20s} {us:8.1f} us  {us / base:6.3f}x cuBLAS  (max error {err:.1e} of max |out|)")
                except Exception as e:  # noqa: BLE001 (a config that does not compile or fit: say so, go on)
                    print(f"    {name:20s} {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                finally:
                    L._TMA_CONFIGS = saved


if __name__ == "__main__":
    main()
