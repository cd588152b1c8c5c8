"""GPU probe: device time of the dS kernel (dS = s * dY @ B, with dB = s * dY^T @ S by atomics) per tile config,
at the backward shapes of the block preset, to see whether larger row tiles (fewer atomics) pay.

    python scripts/probe_ds.py
"""
import torch
import triton
from triton.testing import do_bench

from lora_ops.triton_kernels.lora_kernels import _lora_bwd_ds_kernel

CONFIGS = [(128, 64, 8, 4), (64, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 3), (256, 32, 8, 3),
           (256, 64, 8, 3), (256, 64, 8, 2)]


def main():
    for m, n, r in ((8192, 14336, 16), (8192, 28672, 32), (8192, 6144, 48), (2048, 28672, 32), (8192, 4096, 16)):
        dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16)
        s = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
        ds = torch.empty(m, r, device="cuda", dtype=torch.bfloat16)
        acc = torch.zeros(n * r + n, device="cuda", dtype=torch.float32)
        block_r = max(16, triton.next_power_of_2(r))
        roof = dy.numel() * 2 / 4.8e12 * 1e6
        print(f"M={m} N={n} r={r}: dY read at 4.8 TB/s {roof:.1f} us")
        for do_db in (True, False):
            for bm, bn, w, st in CONFIGS:
                def run():
                    grid = (triton.cdiv(m, bm), triton.cdiv(r, block_r), 1)
                    _lora_bwd_ds_kernel[grid](dy, b, s, ds, acc, acc[n * r:], dy.stride(0), dy.stride(1),
                                              b.stride(0), b.stride(1), s.stride(0), s.stride(1), 0, ds.stride(0),
                                              ds.stride(1), m, n, r, n, 2.0, triton.next_power_of_2(m),
                                              DO_DB=do_db, DO_DBIAS=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=block_r,
                                              num_warps=w, num_stages=st)
                try:
                    us = do_bench(run, warmup=5, rep=30) * 1e3
                    print(f"   DO_DB={int(do_db)} BLOCK_M={bm:3d} BLOCK_N={bn:3d} warps={w} stages={st}: {us:8.1f} us")
                except Exception as e:  # noqa: BLE001 (a config that does not compile: say so, go on)
                    print(f"   DO_DB={int(do_db)} {bm}x{bn}: {type(e).__name__} {str(e)[:80]}")


if __name__ == "__main__":
    main()
