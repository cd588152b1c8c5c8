"""GPU: per-kernel device time of one lora_linear fwd+bwd (the fused path) next to the floor, for the cases
the speed work needs to understand. Prints torch.profiler tables (device time per kernel, averaged).

    python scripts/profile_layer.py [--cases 8192x4096x4096 2048x4096x4096] [--nf4]
"""
import argparse
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

import lora_ops


def layer_case(m, k, n, r=16, nf4=False):
    """One bf16 layer on CUDA (seed 0; W, A, B scaled by 0.02) and its two timed steps, as attributes: x (M, K),
    w (N, K), a (r, K), b (N, r) (x, a, b require grad), dy (M, N), wt (w, or its NF4 quantization with nf4),
    fused() (lora_linear fwd+bwd, scaling 2) and floor() (x @ W^T fwd+bwd, the frozen layer alone).
    Also used by scripts/host_profile.py."""
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(n, k, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    a = (torch.randn(r, k, device=dev, generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    b = (torch.randn(n, r, device=dev, generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(m, n, device=dev, generator=g, dtype=torch.bfloat16)
    wt = lora_ops.quantize_nf4(w) if nf4 else w

    def fused():
        x.grad = a.grad = b.grad = None
        lora_ops.lora_linear(x, wt, a, b, 2.0).backward(dy)

    def floor():
        x.grad = None
        torch.nn.functional.linear(x, w).backward(dy)

    return SimpleNamespace(x=x, w=w, a=a, b=b, dy=dy, wt=wt, fused=fused, floor=floor)


def run(m, k, n, r=16, nf4=False, iters=5):
    case = layer_case(m, k, n, r, nf4)
    for name, fn in (("floor", case.floor), ("fused", case.fused)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        print(f"\n==== {name} {m}x{k}->{n} r={r} {'nf4' if nf4 else 'dense'} ({iters} iterations) ====")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["8192x4096x4096", "2048x4096x4096"])
    ap.add_argument("--nf4", action="store_true")
    args = ap.parse_args()
    for c in args.cases:
        m, k, n = (int(v) for v in c.split("x"))
        run(m, k, n, nf4=args.nf4)


if __name__ == "__main__":
    main()
