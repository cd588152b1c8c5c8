"""GPU: where the device time of one block-preset case goes, provider by provider (grouped against ungrouped).

Builds the ``block`` preset's case (benchmarks/presets.py ``block_case``: the whole block or one group alone) and,
for each provider, profiles ``--steps`` fwd+bwd calls with torch.profiler: the device time per call of each kernel
(summed by name, largest first), the total, the host time per call, lora_ops' launches per call (from C++ or,
after a miss, from the Python launchers) and the fwd+bwd replayed from a CUDA graph.

    python scripts/profile_block.py [--part gate_up] [--m 2048] [--providers floor_grouped,fused,fused_grouped]
                                    [--cpu-top 25] [--py-top 25]
"""
import argparse
import sys
from pathlib import Path

import torch

# scripts/profile_layer.py (this script's folder is on sys.path)
from profile_layer import cprofile_calls, graph_ms, loop_us, phases_line, print_kernels

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is not installed with the package
    sys.path.insert(0, str(REPO))

from benchmarks import block, presets  # noqa: E402


def block_step(data, built):
    """One eager fwd+bwd of a built block provider on ``data`` (its inputs' and trainable tensors' .grad cleared
    first), as the block preset times it."""
    params = list(built.params or ())

    def step():
        for t in list(data.x) + params:
            t.grad = None
        torch.autograd.backward(built.forward(data.x), data.dy)
    return step


def _launch_totals():
    """(launches made by the C++ launch path, launches made by the Python launchers) since import."""
    from lora_ops import _launch
    from lora_ops.triton_kernels import records
    cpp = sum(_launch.launch_counts().values())
    return cpp, sum(records.LAUNCHES.values()) - cpp


def _sync_check(step):
    """Run one call with torch's sync debug mode raising: a call that waits for the GPU (an ``.item()``, a
    pageable copy) makes the host time and the device time add up instead of overlapping."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        print("    synchronizing calls: none")
    except RuntimeError as e:
        print(f"    synchronizing call: {str(e).splitlines()[0][:120]}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def _py_profile(step, steps, top):
    """cProfile of ``steps`` calls: the Python functions with the most own time per call."""
    import pstats

    stats = pstats.Stats(cprofile_calls(step, steps))
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    print(f"    Python, own time per call (cProfile, {steps} calls):")
    for (file, line, name), (_, calls, own, cum, _) in rows:
        print(f"      {own / steps * 1e6:8.1f} us own {cum / steps * 1e6:8.1f} us cum  x{calls // steps:<3d} "
              f"{Path(file).name}:{line} {name}"[:140])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="gate_up", choices=list(presets.BLOCK_PARTS))
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--providers", default="floor_grouped,fused,fused_grouped,fused_qlora,fused_qlora_grouped")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--cpu-top", type=int, default=0, help="also list this many host ops by self CPU time")
    ap.add_argument("--py-top", type=int, default=0, help="also list this many Python functions by own time "
                    "(cProfile of --steps calls)")
    args = ap.parse_args()
    case = presets.block_case("block", "llama3-8b", args.m, "bfloat16", part=args.part)
    data = block.make_block_data(case, torch.device("cuda"))
    for provider in args.providers.split(","):
        built = block.BUILDERS[provider](case, data.sets[0])
        params = list(built.params or ())
        step = block_step(data, built)

        cpp0, py0 = _launch_totals()
        print_kernels(f"\n==== {case.name} {provider}", step, args.steps, args.top, args.cpu_top)
        cpp1, py1 = _launch_totals()
        calls = 3 + 2 * args.steps  # print_kernels' warm-up, host-timed and profiled calls
        # Launches from the Python launchers after warm-up mean the C++ path missed (a plan it could not use).
        print(f"    lora_ops launches per call: C++ {(cpp1 - cpp0) / calls:.1f}, Python launchers "
              f"{(py1 - py0) / calls:.1f}")
        print(f"    eager loop: {loop_us(step, 20, warmup=1):.1f} us per call (20 calls, one synchronize)")
        # The host's own time (the clock stops before the queued kernels are waited for): against the kernels'
        # sum it says whether the step is host- or device-bound, and the forward's share of it.
        fwd = lambda built=built: built.forward(data.x)  # noqa: E731
        print(f"    host alone: fwd+bwd {loop_us(step, 20, warmup=1, host_only=True):.1f} us, forward "
              f"{loop_us(fwd, 20, warmup=1, host_only=True):.1f} us per call")
        if cpp1 > cpp0:
            print(f"    {phases_line(step, 20)}")
        _sync_check(step)
        if args.py_top:
            _py_profile(step, args.steps, args.py_top)
        try:  # device time alone, for host-bound cases
            print(f"    CUDA-graph replay: {graph_ms(step, params) * 1e3:.1f} us per fwd+bwd")
        except RuntimeError as e:
            print(f"    CUDA-graph replay failed: {str(e).splitlines()[0][:100]}")
        built = step = None  # free the provider's weights before the next one is built
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
