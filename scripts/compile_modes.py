"""GPU: one LoRA / QLoRA layer's fwd+bwd in each way a user can run it, ms per step and the ratio to the frozen
layer's eager step: eager, torch.compile (default), torch.compile(mode="reduce-overhead"), and the same fwd+bwd
captured once in a CUDA graph and replayed (device time only). Also the first call of a shape the process has not
seen (the kernels' autotuning; Triton's compiled binaries are cached on disk across processes, the tuning is not).

    python scripts/compile_modes.py [--shape 2048x4096x4096] [--r 16] [--steps 50] [--profile]

The frozen layer runs through the same modes (its own torch.compile cost is the baseline of the others);
--profile prints where the host time of the compiled (default mode) LoRA step goes (torch.profiler, CPU side).

The adapters' gradients are set to None before each step (as zero_grad(set_to_none=True) does).
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn

import lora_ops
from host_profile import _loop  # scripts/host_profile.py and profile_layer.py (this script's folder is on sys.path)
from profile_layer import graph_ms


def _wall_ms(step, steps):
    """Milliseconds per step: the median of 5 loops of ``steps`` steps, each ended by a synchronize."""
    return statistics.median(_loop(step, steps) for _ in range(5)) / 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="2048x4096x4096", help="M x K x N")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--profile", action="store_true", help="host-side profile of the compiled LoRA step")
    args = ap.parse_args()
    m, k, n = (int(v) for v in args.shape.split("x"))
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    base = nn.Linear(k, n, bias=False, device=dev, dtype=dt).requires_grad_(False)
    x = torch.randn(m, k, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(m, n, device=dev, dtype=dt)

    def stepper(layer):
        params = [p for p in layer.parameters() if p.requires_grad]

        def step():
            x.grad = None
            for p in params:
                p.grad = None
            layer(x).backward(dy)
        return step

    floor = _wall_ms(stepper(base), args.steps)
    floor_graph = graph_ms(stepper(base), [x])
    print(f"{args.shape} r={args.r} bf16; floor (frozen nn.Linear): eager {floor:.4f} ms, graph replay "
          f"{floor_graph:.4f} ms; ratios below are to the floor's eager step")
    print(f"{'layer':8s} {'first call s':>12s} {'eager':>14s} {'compile':>14s} {'reduce-overh.':>14s} "
          f"{'graph replay':>14s}")
    for name, cls in (("frozen", None), ("LoRA", lora_ops.LoRALinear), ("QLoRA", lora_ops.QLoRALinear)):
        if cls is None:
            layer = base
        else:
            layer = cls.from_linear(base, r=args.r, lora_alpha=2 * args.r)
            with torch.no_grad():
                layer.lora_B.normal_(0, 0.02)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stepper(layer)()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        cells = [f"{first:12.2f}"]
        for mode in ("eager", "default", "reduce-overhead"):
            run = layer if mode == "eager" else torch.compile(layer, mode=mode)
            try:
                ms = _wall_ms(stepper(run), args.steps)
                cells.append(f"{ms:7.4f} {ms / floor:5.2f}x")
            except Exception as e:  # noqa: BLE001 - report and go on to the next mode
                cells.append(f"failed: {type(e).__name__}")
        # The frozen layer's replay is the header's: captured again after torch.compile's CUDA-graph trees ran on
        # the same input, its capture fails (the input's gradient is accumulated on another stream).
        ms = floor_graph if cls is None else graph_ms(stepper(layer), [x])
        cells.append(f"{ms:7.4f} {ms / floor:5.2f}x")
        print(f"{name:8s} " + " ".join(f"{c:>14s}" for c in cells))
        if args.profile and name == "LoRA":
            _profile(stepper(torch.compile(layer)))


def _profile(step, steps=20):
    from torch.profiler import ProfilerActivity, profile
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    print(f"host time of the compiled LoRA step, per step ({steps} steps):")
    rows = sorted(prof.key_averages(), key=lambda e: -e.cpu_time_total)[:25]
    for e in rows:
        print(f"  total {e.cpu_time_total / steps:9.1f} us  self {e.self_cpu_time_total / steps:8.1f} us  "
              f"x{e.count // steps:<3d} {e.key[:80]}")


if __name__ == "__main__":
    main()
