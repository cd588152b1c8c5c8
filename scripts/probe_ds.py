"""GPU probe: device time of the dS kernel (dS = s * dY @ B, with dB = s * dY^T @ S by atomics) per tile config
and per number of N splits (fp32 dS partials, one slot per split, as the launchers make below
LORA_OPS_SPLIT_MAX_M rows), at the backward shapes of the block preset: whether larger row tiles (fewer atomics)
or more programs in flight (splits) pay.

    python scripts/probe_ds.py [--splits 1,2,4,8] [--shapes 8192x14336x16,8192x28672x32] [--no-db]
"""
import argparse

import torch
import triton
from triton.testing import do_bench

from lora_ops.triton_kernels.lora_kernels import _lora_bwd_ds_kernel

CONFIGS = [(128, 64, 8, 4), (64, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 3), (256, 32, 8, 3),
           (256, 64, 8, 3), (256, 64, 8, 2)]
SHAPES = "8192x14336x16,8192x28672x32,8192x6144x48,2048x28672x32,8192x4096x16"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--splits", default="1", help="comma-separated numbers of N splits")
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated MxNxR")
    ap.add_argument("--no-db", action="store_true", help="skip the DO_DB=0 rows")
    args = ap.parse_args()
    for shape in args.shapes.split(","):
        m, n, r = (int(v) for v in shape.split("x"))
        dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16)
        s = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
        acc = torch.zeros(n * r + n, device="cuda", dtype=torch.float32)
        block_r = max(16, triton.next_power_of_2(r))
        roof = dy.numel() * 2 / 4.8e12 * 1e6
        print(f"M={m} N={n} r={r}: dY read at 4.8 TB/s {roof:.1f} us")
        for do_db in (True,) if args.no_db else (True, False):
            for splits in (int(v) for v in args.splits.split(",")):
                per = triton.cdiv(triton.cdiv(n, splits), 64) * 64
                splits = triton.cdiv(n, per)
                ds = torch.empty(splits, m, r, device="cuda", dtype=torch.float32 if splits > 1 else torch.bfloat16)
                for bm, bn, w, st in CONFIGS:
                    def run():
                        grid = (triton.cdiv(m, bm), triton.cdiv(r, block_r), splits)
                        _lora_bwd_ds_kernel[grid](dy, b, s, ds, acc, acc[n * r:], dy.stride(0), dy.stride(1),
                                                  b.stride(0), b.stride(1), s.stride(0), s.stride(1),
                                                  ds.stride(0) if splits > 1 else 0, ds.stride(1), ds.stride(2),
                                                  m, n, r, per, 2.0, triton.next_power_of_2(m),
                                                  DO_DB=do_db, DO_DBIAS=False, BLOCK_M=bm, BLOCK_N=bn,
                                                  BLOCK_R=block_r, num_warps=w, num_stages=st)
                    try:
                        us = do_bench(run, warmup=5, rep=30) * 1e3
                        print(f"   DO_DB={int(do_db)} splits={splits:2d} BLOCK_M={bm:3d} BLOCK_N={bn:3d} warps={w} "
                              f"stages={st}: {us:8.1f} us")
                    except Exception as e:  # noqa: BLE001 (a config that does not compile: say so, go on)
                        print(f"   DO_DB={int(do_db)} splits={splits} {bm}x{bn}: {type(e).__name__} {str(e)[:80]}")


if __name__ == "__main__":
    main()
