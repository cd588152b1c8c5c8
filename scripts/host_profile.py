"""GPU: where the host time of one lora_linear fwd+bwd goes (the M=2048 case is host-bound).

Prints, per case: the eager wall time per call of a steady loop (synchronised once at the end), the time of the
same loop with the CUDA work of each piece taken out (launchers called directly, autograd bypassed), and the
cProfile of the loop sorted by own time.

    python scripts/host_profile.py [--cases 2048x4096x4096] [--nf4] [--top 25]
    python scripts/host_profile.py --micro        # host us of each piece of one fwd+bwd, timed alone
"""
import argparse
import io
import pstats

import torch
import triton

import lora_ops
from lora_ops.triton_kernels import lora as tk

# scripts/profile_layer.py (this script's folder is on sys.path)
from profile_layer import cprofile_calls, layer_case, loop_us


def run(m, k, n, r, nf4, iters, top):
    case = layer_case(m, k, n, r, nf4)
    w, a, b, dy, wt, fused, floor = case.w, case.a, case.b, case.dy, case.wt, case.fused, case.floor
    wargs = wt.tensors() if nf4 else (w, None, None, None, None)
    bs = wt.blocksize if nf4 else 0
    xs = case.x.detach()
    y, s = tk.lora_forward(xs, *wargs, bs, a.detach(), b.detach(), 2.0, None, 0.0, None)

    def launchers():
        tk.lora_forward(xs, *wargs, bs, a.detach(), b.detach(), 2.0, None, 0.0, None)
        tk.lora_backward(dy, xs, *wargs, bs, a.detach(), b.detach(), s, 2.0, 0.0, None, True, True, True, False)

    def ops_only():
        torch.ops.lora_ops.lora_fwd(xs, *wargs, bs, a.detach(), b.detach(), 2.0, None, 0.0, None)
        torch.ops.lora_ops.lora_bwd(dy, xs, *wargs, bs, a.detach(), b.detach(), s, 2.0, 0.0, None,
                                    True, True, True, False)

    tag = f"{m}x{k}->{n} r={r} {'nf4' if nf4 else 'dense'}"
    print(f"\n==== {tag}: eager wall us per fwd+bwd ({iters} iterations) ====")
    for name, fn in (("floor", floor), ("fused (lora_linear + autograd)", fused), ("custom ops, no autograd", ops_only),
                     ("launchers only", launchers)):
        print(f"  {name:34s} {loop_us(fn, iters):9.1f}")
    before = dict(tk.LAUNCHES)
    fused()
    torch.cuda.synchronize()
    print("  launches per fwd+bwd:", {k2: v - before.get(k2, 0) for k2, v in tk.LAUNCHES.items()
                                      if v - before.get(k2, 0)})
    out = io.StringIO()
    pstats.Stats(cprofile_calls(fused, iters), stream=out).sort_stats("tottime").print_stats(top)
    print(out.getvalue())


def micro(m=2048, k=4096, n=4096, r=16, iters=2000):
    """Host microseconds of the pieces of one fused fwd+bwd, each timed alone in a loop (no profiler: cProfile
    inflates small calls several times). Device work is queued but the loops are host-bound."""
    from lora_ops import _backend, functional
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    a = torch.randn(r, k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, r, device=dev, dtype=torch.bfloat16)
    s = torch.empty(m, r, device=dev, dtype=torch.bfloat16)
    args = (x, a, tk._scratch(x.device), s, x.stride(0), x.stride(1), a.stride(0), a.stride(1), 0, s.stride(0),
            s.stride(1), m, k, r, k, 0, 1.0, tk._next_pow2(m))  # one K slice: S itself
    meta = dict(HAS_DROPOUT=False, BLOCK_R=16)
    grid = lambda mm: (triton.cdiv(m, mm["BLOCK_M"]), 1)  # noqa: E731
    tk._S_KERNEL(grid, *args, **meta)
    key = tk._S_KERNEL._launch_key(args, meta, True)
    kernel, named, tail = tk._S_KERNEL._launches[key]
    g = grid(named)
    full = args + tail
    stream = torch.cuda.current_stream().cuda_stream

    xr = x.clone().requires_grad_()
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    pieces = {
        "torch.empty (M, r)": lambda: torch.empty((m, r), dtype=x.dtype, device=x.device),
        "torch.zeros (N, r) fp32": lambda: torch.zeros((n, r), dtype=torch.float32, device=x.device),
        "_launch_key": lambda: tk._S_KERNEL._launch_key(args, meta, True),
        "kernel.run (compiled launcher only)": lambda: kernel.run(g[0], g[1], 1, stream, kernel.function,
                                                                  kernel.packed_metadata, None, None, None, *full),
        "_S_KERNEL(...) cached launch": lambda: tk._S_KERNEL(grid, *args, **meta),
        "validate_lora_args": lambda: functional.validate_lora_args(x, w, a, b, 2.0, None, 0.0),
        "_backend.eager_impl": lambda: _backend.eager_impl(x),
        "lora_forward launcher (S + fwd)": lambda: tk.lora_forward(x, w, None, None, None, None, 0, a, b, 2.0, None,
                                                                    0.0, None),
        "lora_backward launcher (dS, dX, dA)": lambda: tk.lora_backward(dy, x, w, None, None, None, None, 0, a,
                                                                        b, s, 2.0, 0.0, None, True, True, True,
                                                                        False),
        "lora_linear fwd (eager, grad)": lambda: lora_ops.lora_linear(xr, w, ar, br, 2.0),
    }
    print(f"\n==== host us per call, {m}x{k}->{n} r={r} (loops of {iters}) ====")
    for name, fn in pieces.items():
        print(f"  {name:40s} {loop_us(fn, iters, warmup=20, host_only=True):8.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["2048x4096x4096"])
    ap.add_argument("--nf4", action="store_true")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--micro", action="store_true", help="time each host-side piece alone instead (2048x4096->4096)")
    args = ap.parse_args()
    if args.micro:
        micro()
        return
    for c in args.cases:
        m, k, n = (int(v) for v in c.split("x"))
        run(m, k, n, args.rank, args.nf4, args.iters, args.top)


if __name__ == "__main__":
    main()
