"""CPU: the host cost of a projection group's C++ autograd Function (csrc/lora_launch.cpp GroupFunction) without
its kernel launches, per way of stacking B and passing dY (LORA_OPS_GROUP_B / LORA_OPS_GROUP_DY) and of finishing
the gradients (LORA_OPS_FINISH_KERNEL).

Builds the CPU test module of the launch path (tests/cpp/launch_dry_module.cpp, as tests/test_launch_path.py does)
and runs it with LORA_OPS_LAUNCH_NOOP=1: each forward and backward goes through its whole host path (plans,
allocations, the stacking, the tensor ops between launches, autograd) except the driver's launches, on small CPU
tensors, where an aten op costs its dispatch rather than its work. It prints, per way, the microseconds of one
fwd+bwd of a q/k/v-shaped group (median of --loops loops of --iters calls), the C++ runs' host phases
(launch_timing) and, with --ops, the aten ops of one call (torch.profiler). The H200 host's times differ, and its
CUDA ops also pay their launches; the op counts carry over.

    python scripts/host_group_cpu.py [--iters 300] [--loops 7] [--ops]
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# Each way: its environment, and whether the backward's gradients leave their fp32 buffers through the finish
# kernel (LORA_OPS_FINISH_KERNEL, on by default; lora.py _FINISH_KERNEL, a launcher setting the C++ side is sent).
WAYS = {"block_diag, cat(dY)": ({"LORA_OPS_GROUP_B": "blockdiag"}, False),
        "B_rows, cat(dY)": ({"LORA_OPS_GROUP_B": "rows", "LORA_OPS_GROUP_DY": "cat"}, False),
        "B_rows, dY segments": ({"LORA_OPS_GROUP_B": "rows", "LORA_OPS_GROUP_DY": "segments"}, False),
        "block_diag, finish kernel": ({"LORA_OPS_GROUP_B": "blockdiag"}, True),
        "B_rows, dY segments, finish kernel (the default)": ({"LORA_OPS_GROUP_B": "rows",
                                                              "LORA_OPS_GROUP_DY": "segments"}, True)}


def build():
    from torch.utils import cpp_extension

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora_ops"
    out = cache / ("launch_dry-" + torch.__version__.replace("+", "_"))
    out.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name="lora_ops_launch_dry",
                              sources=[str(REPO / "csrc" / "lora_launch.cpp"),
                                       str(REPO / "tests" / "cpp" / "launch_dry_module.cpp")],
                              extra_cflags=["-O1"], build_directory=str(out), verbose=False)


def set_way(mod, env: dict, finish: bool) -> None:
    """Make one way the current one: its group switches in the environment (read per call by the C++ side) and
    the finish kernel (a launcher setting, sent to ``mod``)."""
    from lora_ops import _launch
    from lora_ops.triton_kernels import lora as L

    for key in ("LORA_OPS_GROUP_B", "LORA_OPS_GROUP_DY"):
        os.environ.pop(key, None)
    os.environ.update(env)
    L._FINISH_KERNEL = finish
    _launch._sync_settings(mod)


def median_us(step, loops: int, iters: int, warmup: int) -> float:
    """Median over ``loops`` loops of the microseconds per call of ``iters`` calls of step(), after ``warmup``."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(loops):
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        times.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--loops", type=int, default=7)
    ap.add_argument("--ops", action="store_true", help="also list the aten ops of one fwd+bwd per way")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from lora_ops import _launch

    mod = build()
    _launch.use_module(mod)
    _launch._ensure_device(torch.device("cpu"))
    os.environ["LORA_OPS_LAUNCH_NOOP"] = "1"
    os.environ["LORA_OPS_GROUP_FWD"] = os.environ["LORA_OPS_GROUP_BWD"] = "concat"
    # q/k/v of a GQA layer at 1/16 scale (N_i multiples of the interpreter's 64-column unit), rank 4, bf16.
    m, k, sizes, r, dt = 64, 256, (256, 64, 64), 4, torch.bfloat16
    g = torch.Generator().manual_seed(0)
    w = torch.randn(sum(sizes), k, generator=g).to(dt)
    x = torch.randn(m, k, generator=g).to(dt).requires_grad_()
    As = [torch.randn(r, k, generator=g).to(dt).requires_grad_() for _ in sizes]
    Bs = [torch.randn(n, r, generator=g).to(dt).requires_grad_() for n in sizes]
    dys = [torch.randn(m, n, generator=g).to(dt) for n in sizes]
    leaves = [x, *As, *Bs]

    def step():
        for t in leaves:
            t.grad = None
        ys = mod.launch_group_call(x, w, None, None, None, None, 0, 0, 0, As, Bs, [2.0] * 3, None, 0.0, 0, True)
        torch.autograd.backward(list(ys), dys)

    for name, (env, finish) in WAYS.items():
        set_way(mod, env, finish)
        us = median_us(step, args.loops, args.iters, 20)
        print(f"{name:22s} {us:7.1f} us per fwd+bwd (host path without launches)")
        mod.launch_timing(True)  # the C++ runs' own phases (csrc/lora_launch.cpp launch_timing)
        try:
            for _ in range(args.iters):
                step()
            st = mod.launch_stats()
        finally:
            mod.launch_timing(False)
        print("    C++ runs per fwd+bwd: " + ", ".join(f"{k} {v / args.iters / 1e3:.1f} us"
                                                       for k, v in st["host_ns"].items()))
        if args.ops:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
            print(f"    {sum(e.count for e in ops)} aten ops: "
                  + ", ".join(f"{e.key[6:]} x{e.count}" for e in sorted(ops, key=lambda e: -e.count)))


if __name__ == "__main__":
    main()
