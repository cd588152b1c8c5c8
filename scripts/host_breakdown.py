"""GPU: host microseconds of each piece of one eager LoRA fwd+bwd on the C++ launch path (M=64, 1024->1024,
where the GPU work is a few microseconds), next to the frozen nn.Linear and PEFT.

    python scripts/host_breakdown.py [--m 64] [--k 1024] [--n 1024] [--iters 2000]

Each line: microseconds per call of a loop of ``iters`` calls, synchronized once at the end (median of 5 loops).
"""
import argparse
import time

import torch

import lora_ops
from lora_ops import _backend, _launch


def per_call(fn, iters, loops=5):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(loops):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / iters * 1e6)
    return sorted(out)[len(out) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--iters", type=int, default=2000)
    a = ap.parse_args()
    dt, dev = torch.bfloat16, "cuda"
    torch.manual_seed(0)
    x = torch.randn(a.m, a.k, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(a.m, a.n, device=dev, dtype=dt)
    W = torch.randn(a.n, a.k, device=dev, dtype=dt) / a.k ** 0.5
    A = (torch.randn(a.r, a.k, device=dev, dtype=dt) / a.k ** 0.5).requires_grad_(True)
    B = torch.randn(a.n, a.r, device=dev, dtype=dt).requires_grad_(True)
    w4 = lora_ops.quantize_nf4(W, blocksize=64, double_quant=True)
    lin = torch.nn.Linear(a.k, a.n, bias=False, device=dev, dtype=dt).requires_grad_(False)
    mod = _launch.module()
    print(f"C++ launch path: {'loaded' if mod is not None else 'NOT loaded'}; {a.m}x{a.k}->{a.n} r={a.r} bf16")

    def clear():
        x.grad = A.grad = B.grad = None

    def floor():
        clear()
        lin(x).backward(dy)

    def fused(w):
        def f():
            clear()
            lora_ops.lora_linear(x, w, A, B, 2.0).backward(dy)
        return f

    def fwd_only(w):
        return lambda: lora_ops.lora_linear(x, w, A, B, 2.0)

    rows = [("floor nn.Linear fwd+bwd", floor), ("lora_ops dense fwd+bwd", fused(W)),
            ("lora_ops nf4 fwd+bwd", fused(w4)), ("lora_ops dense fwd only (grad on)", fwd_only(W)),
            ("_backend.op_required()", _backend.op_required), ("_backend.requested_backend()", _backend.requested_backend)]
    for w in (W, w4):  # first calls: compile, tune, register with the C++ side
        for _ in range(2):
            fused(w)()
    torch.cuda.synchronize()
    y = lora_ops.lora_linear(x, w4, A, B, 2.0)
    print("grad_fn of lora_linear (dense / nf4):", lora_ops.lora_linear(x, W, A, B, 2.0).grad_fn.name(), "/",
          y.grad_fn.name())
    if mod is not None:
        xs, As, Bs = x.detach(), A.detach(), B.detach()
        y, s = mod.launch_fwd(xs, W, None, None, None, None, 0, As, Bs, 2.0, None, 0.0, None, [], False)
        rows += [
            ("C++ launch_linear dense (fwd, autograd node)",
             lambda: mod.launch_linear(x, W, None, None, None, None, 0, 0, 0, A, B, 2.0, None, 0.0, 0)),
            ("C++ launch_fwd dense (no autograd)",
             lambda: mod.launch_fwd(xs, W, None, None, None, None, 0, As, Bs, 2.0, None, 0.0, None, [], False)),
            ("C++ launch_bwd dense (dx, dA, dB)",
             lambda: mod.launch_bwd(dy, xs, W, None, None, None, None, 0, As, Bs, s, 2.0, 0.0, None, True, True,
                                    True, False, [], False)),
            ("torch.empty (64, 16)", lambda: torch.empty((64, 16), device=dev, dtype=dt)),
        ]
    try:
        from peft import LoraConfig, get_peft_model

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(a.k, a.n, bias=False, device=dev, dtype=dt)

            def forward(self, t):
                return self.proj(t)

        pm = get_peft_model(Wrap(), LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=["proj"]))
        layer = pm.base_model.model.proj.to(dt)

        def peft():
            clear()
            for p in layer.parameters():
                p.grad = None
            layer(x).backward(dy)
        rows.append(("peft LoRA fwd+bwd", peft))
    except Exception as e:  # noqa: BLE001
        print("peft unavailable:", e)
    for name, fn in rows:
        print(f"  {name:48s} {per_call(fn, a.iters):9.1f} us")
    if mod is not None:
        print("  C++ side:", mod.launch_stats())


if __name__ == "__main__":
    main()
