"""GPU probe: can the dA pass run on the SMs that the dX GEMM's last wave leaves idle, for the GEMM's whole run?

The persistent TMA GEMM runs one program per SM over ``tiles`` output tiles, so it takes ceil(tiles / programs)
waves. At the block's shapes (1024 tiles at 8192 rows, 256 at 2048) 132 programs and 128 programs take the same
number of waves: four SMs can be given to other work for the GEMM's whole run at (in principle) no cost to it.
The dA pass (dA = dS^T @ x, memory-bound: it reads x whole) is the backward's work that needs nothing the dX GEMM
makes. Device time per variant (each captured in a CUDA graph, ``--calls`` replays per timing, interleaved rounds,
median), the dX GEMM at the dX shape (M, N) @ (N, K) + dS (M, R) @ A (R, K):

- ``gemm``: the dX GEMM as the launcher runs it (one program per SM);
- ``gemm_P``: the same with ``P`` programs (the fewest that keep its wave count);
- ``da``: the dA pass as the launcher runs it (its M splits for two waves of the whole GPU);
- ``seq``: gemm then da on one stream (what the backward does);
- ``side_P``: gemm_P, and da on a second stream forked after it and joined after both (in the graph: two
  branches, which the driver may start in either order);
- ``side``: the same with the full-width GEMM (only its last wave's idle SMs are free).

    python scripts/probe_side.py [--shapes 8192x6144x4096x48,2048x6144x4096x48] [--rounds 7]

Shapes are M x N x K x R of the dX GEMM (q/k/v's: N = 4096 + 1024 + 1024 summed, K = 4096, R = 3 x 16).
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import triton

from lora_ops.triton_kernels import lora as L

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is not installed with the package
    sys.path.insert(0, str(REPO))
from benchmarks.block import interleaved  # noqa: E402
from benchmarks.harness import Device, Settings  # noqa: E402


def _gemm(dy, w, dx, ds, a, programs):
    """The dX GEMM through the launcher's _tma_gemm on ``programs`` persistent programs."""
    drop = L._Dropout(0.0, None, dy)
    L._tma_gemm(dy, w, dx, ds, a, a.stride(0), a.stride(1), None, drop, 1.0, False, a.shape[0], dx.shape[1], 0,
                programs=programs)


def _da(x, ds, out):
    """The dA pass as lora_backward launches it (M splits, fp32 partials), its partials summed by torch."""
    m, k = x.shape
    r = ds.shape[1]
    block_r = L._block_r(r)
    splits, rows = L._splits(m, triton.cdiv(k, 64) * triton.cdiv(r, block_r), x.device)
    parts = L._split_partials(splits, (r, k), x.dtype, x.device)
    drop = L._Dropout(0.0, None, x)
    L._DA_KERNEL(lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(r, block_r), splits),
                 x, ds, drop.seed, parts, x.stride(0), x.stride(1), ds.stride(0), ds.stride(1),
                 parts.stride(0) if splits > 1 else 0, parts.stride(1), parts.stride(2),
                 m, k, r, rows, drop.threshold, drop.scale, L._next_pow2(m), HAS_DROPOUT=False, BLOCK_R=block_r)
    out.copy_(parts.sum(0) if splits > 1 else parts[0])


def _forked(first, second, side):
    """first() on the current stream, second() on ``side`` forked after first's launch; joined after both."""
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    first()
    with torch.cuda.stream(side):
        second()
    main.wait_stream(side)


def probe(shape, args):
    m, n, k, r = (int(v) for v in shape.split("x"))
    dt, dev = getattr(torch, args.dtype), torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    dy = torch.randn(m, n, device=dev, dtype=dt, generator=g)
    w = (torch.randn(n, k, device=dev, generator=g) / n ** 0.5).to(dt)
    ds = torch.randn(m, r, device=dev, dtype=dt, generator=g)
    a = (torch.randn(r, k, device=dev, generator=g) / k ** 0.5).to(dt)
    x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
    dx, da = torch.empty(m, k, device=dev, dtype=dt), torch.empty(r, k, device=dev, dtype=dt)
    sms = L._sm_count(dev)
    tiles = L._tma_tiles(m, k)
    p = L._fewest_programs(tiles, sms) if args.programs == 0 else args.programs
    side = torch.cuda.Stream(dev)
    variants = {
        "gemm": lambda: _gemm(dy, w, dx, ds, a, sms),
        f"gemm_{p}": lambda: _gemm(dy, w, dx, ds, a, p),
        "da": lambda: _da(x, ds, da),
        "seq": lambda: (_gemm(dy, w, dx, ds, a, sms), _da(x, ds, da)),
        f"side_{p}": lambda: _forked(lambda: _gemm(dy, w, dx, ds, a, p), lambda: _da(x, ds, da), side),
        "side": lambda: _forked(lambda: _gemm(dy, w, dx, ds, a, sms), lambda: _da(x, ds, da), side),
    }
    want_dx = dy.float() @ w.float() + ds.float() @ a.float()
    want_da = ds.float().t() @ x.float()
    for name, fn in variants.items():
        dx.fill_(float("nan"))
        da.fill_(float("nan"))
        fn()
        torch.cuda.synchronize()
        e_dx = ((dx.float() - want_dx).abs().max() / want_dx.abs().max()).item()
        e_da = ((da.float() - want_da).abs().max() / want_da.abs().max()).item()
        uses_da = name == "da" or name.startswith(("seq", "side"))
        uses_dx = name != "da"
        assert (not uses_dx or e_dx < 2e-2) and (not uses_da or e_da < 2e-2), (name, e_dx, e_da)
    dev_t = Device(Settings())
    timers = {name: dev_t.graph_timer(fn, (), args.calls) for name, fn in variants.items()}
    med = {name: statistics.median(ms) * 1e3 for name, ms in interleaved(timers, args.rounds).items()}
    print(f"{shape}: {tiles} tiles on {sms} SMs, {triton.cdiv(tiles, sms)} waves; {p} programs keep them")
    for name, us in med.items():
        print(f"{shape} {name:10s} {us:8.1f} us  {us / med['gemm']:.3f}x gemm  {us / med['seq']:.3f}x seq",
              flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8192x6144x4096x48,2048x6144x4096x48,8192x14336x4096x16")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5, help="graph replays per timing")
    ap.add_argument("--programs", type=int, default=0, help="the narrow GEMM's programs (0: the fewest that keep "
                    "its wave count)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("probe_side.py needs a CUDA device")
    for shape in args.shapes.split(","):
        probe(shape, args)


if __name__ == "__main__":
    main()
