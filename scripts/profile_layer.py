"""GPU: device time of one lora_linear fwd+bwd (the fused path) next to the floor, for the cases the speed work
needs to understand: the fwd+bwd replayed from a CUDA graph (device time only, no host), then the device time
per kernel (torch.profiler, averaged over a few eager calls).

    python scripts/profile_layer.py [--cases 8192x4096x4096 2048x4096x4096] [--nf4 | --both] [--no-tables]

Also the eager loop of each, with the C++ launch path's host time by phase, and the timing helpers the other
profiling scripts share (loop_us, cprofile_calls, print_kernels, capture_graph, graph_ms, phases_line).
"""
import argparse
import cProfile
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import lora_ops

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is not installed with the package
    sys.path.insert(0, str(REPO))
from benchmarks import harness  # noqa: E402


def loop_us(fn, iters, warmup=3, host_only=False):
    """Microseconds per call of fn over a loop of iters calls (after warmup calls and a synchronize): up to the
    synchronize that ends the loop, or with host_only the host time of the calls alone (queued device work is
    waited for only after the clock stops)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if not host_only:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    return dt


def cprofile_calls(fn, iters):
    """The cProfile.Profile of ``iters`` calls of fn, synchronized at the end (the Python side of a step)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    return prof


def host_phases(fn, iters):
    """The C++ launch path's host time per call of fn by phase (csrc/lora_launch.cpp launch_timing: build,
    resolve, encode, launch, after; microseconds) and its runs per call, over ``iters`` calls; None without it."""
    from lora_ops import _launch
    mod = _launch.module()
    if mod is None or not hasattr(mod, "launch_timing"):
        return None
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    mod.launch_timing(True)
    try:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        st = mod.launch_stats()
    finally:
        mod.launch_timing(False)
    return {k: v / iters / 1e3 for k, v in st["host_ns"].items()}, st["timed_calls"] / iters


def phases_line(fn, iters) -> str:
    """host_phases as one line to print."""
    res = host_phases(fn, iters)
    if res is None:
        return "C++ launch path not loaded"
    us, runs = res
    return (f"C++ host per call {sum(us.values()):.1f} us over {runs:.1f} runs: "
            + ", ".join(f"{k} {v:.1f}" for k, v in us.items()))


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


def capture_graph(fn, grads):
    """A CUDA graph of one call of fn (benchmarks.harness.capture_graph: three warm-up calls on a side stream,
    which compile and autotune what is new, ``grads`` cleared), replayed three times."""
    g, _ = harness.capture_graph(fn, grads)
    for _ in range(3):
        g.replay()
    return g


def graph_ms(fn, grads, replays=50):
    """Device ms per call of fn replayed from one CUDA graph (``capture_graph``; no host time)."""
    g = capture_graph(fn, grads)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(replays):
            g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return sorted(times)[len(times) // 2]


def run(m, k, n, r=16, nf4=False, iters=5, tables=True):
    case = layer_case(m, k, n, r, nf4)
    tag = f"{m}x{k}->{n} r={r} {'nf4' if nf4 else 'dense'}"
    fl = graph_ms(case.floor, [case.x])
    fu = graph_ms(case.fused, [case.x, case.a, case.b])
    print(f"\n==== {tag}: CUDA-graph replay, device ms per fwd+bwd: floor {fl:.4f}, fused {fu:.4f} "
          f"({fu / fl:.3f}x) ====")
    el_fl, el_fu = loop_us(case.floor, 50), loop_us(case.fused, 50)
    print(f"==== {tag}: eager loop, us per fwd+bwd: floor {el_fl:.1f}, fused {el_fu:.1f} ({el_fu / el_fl:.3f}x); "
          f"{phases_line(case.fused, 50)}")
    if not tables:
        return
    for name, fn in (("floor", case.floor), ("fused", case.fused)):
        print_kernels(f"  {name}", fn, iters)


def print_kernels(title, fn, iters, top=10, cpu_top=0):
    """Print the device time per call of each kernel ``fn`` launches (torch.profiler over ``iters`` calls after
    3 warm-up calls), largest first, under ``title`` with their total and the host time per call (the wall time of
    ``iters`` calls queued without a synchronization); with ``cpu_top`` also the host ops with the most self CPU
    time. Also used by scripts/profile_block.py."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    # Host time: the calls are only queued (no synchronization inside), so the loop's wall time is the host's.
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    host_us = (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    # Kernel events only: a CPU op's self device time repeats its kernels' (aten::mm over its cuBLAS kernel,
    # the C++ autograd node over the Triton kernels it launches).
    rows = [(e.key, e.count // iters, e.self_device_time_total / iters) for e in prof.key_averages()
            if e.self_device_time_total > 0 and e.device_type == DeviceType.CUDA]
    rows.sort(key=lambda t: -t[2])
    print(f"{title}: {sum(t[2] for t in rows):.1f} us of kernels per fwd+bwd, host {host_us:.1f} us per call")
    for key, count, us in rows[:top]:
        print(f"    {us:9.1f} us  x{count}  {key[:90]}")
    if cpu_top:  # host side: the ops with the most self CPU time (the profiler's own overhead included)
        cpu = [(e.key, e.count // iters, e.self_cpu_time_total / iters) for e in prof.key_averages()
               if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0]
        cpu.sort(key=lambda t: -t[2])
        print(f"  host ops (profiled): {sum(t[2] for t in cpu):.1f} us self CPU per call")
        for key, count, us in cpu[:cpu_top]:
            print(f"    {us:9.1f} us  x{count}  {key[:90]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["8192x4096x4096", "2048x4096x4096"])
    ap.add_argument("--nf4", action="store_true", help="NF4 weights (default dense)")
    ap.add_argument("--both", action="store_true", help="dense and NF4")
    ap.add_argument("--no-tables", action="store_true", help="graph timings only")
    args = ap.parse_args()
    for c in args.cases:
        m, k, n = (int(v) for v in c.split("x"))
        for nf4 in ((False, True) if args.both else (args.nf4,)):
            run(m, k, n, nf4=nf4, tables=not args.no_tables)


if __name__ == "__main__":
    main()
